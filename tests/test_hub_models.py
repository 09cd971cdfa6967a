"""`model.name` as a Hugging Face hub id: resolved through the Hugging Face cache like `from_pretrained`.

No hub is reachable here, so every test runs with HF_HUB_OFFLINE and an HF_HOME of its own, into which
the tests write snapshots laid out as `huggingface_hub` does (`hub/models--owner--name/snapshots/<commit>/`
and `refs/<branch or tag>` holding the commit). huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it
is imported, so its `constants` are patched along with the environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

from huggingface_hub import constants  # noqa: E402
from test_moefication import tiny_llama  # noqa: E402

from ubsmoe.config import ConfigError, load_config  # noqa: E402
from ubsmoe.models import loading  # noqa: E402
from ubsmoe.models.loading import load_experiment_model, looks_like_hub_id, resolve_model_directory  # noqa: E402
from ubsmoe.models.native import ModelLoadError, ModelNotFoundError  # noqa: E402
from ubsmoe.models.tiny import char_tokenizer, save_tiny_model  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
MISSING = "some-org/missing-model"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in offline mode; returns its hub folder (HF_HOME/hub)."""
    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path / "ubsmoe-cache"))  # the MoEfication cache
    return cache


def snapshot(cache: Path, repo_id: str, commit: str = COMMIT, refs: tuple[str, ...] = ("main",)) -> Path:
    """The snapshot folder of `repo_id` at `commit` in the hub cache, with `refs` pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    model = tiny_llama(torch.float32)
    if seed:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def _config(*sets: str):
    return load_config(None, list(sets))


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert len(text.splitlines()) == 1, text
    return text


def test_hub_ids_and_paths_are_told_apart():
    assert looks_like_hub_id("allenai/OLMoE-1B-7B-0924") and looks_like_hub_id("gpt2")
    assert looks_like_hub_id("Qwen/Qwen1.5-MoE-A2.7B")
    for path in ("/models/olmoe", "./olmoe", "~/olmoe", "a/b/c", "a--b/c", "a/../b", "a\\b", "a/", "-a/b"):
        assert not looks_like_hub_id(path), path


def test_an_uncached_model_offline_is_one_line(hub):
    with pytest.raises(ModelNotFoundError) as info:
        load_experiment_model(_config(f"model.name={MISSING}"))
    text = _one_line(info.value)
    assert text.startswith(f"model.name = {MISSING!r}: no such local directory, not in the Hugging Face cache ")
    assert f"({hub}), and HF_HUB_OFFLINE is set; " in text
    assert f"`hf download {MISSING}`" in text and "set model.name to the model's local folder" in text


def test_a_path_that_is_no_hub_id_keeps_the_local_message(hub, tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        load_experiment_model(_config(f"model.name={tmp_path / 'nowhere'}"))
    assert "no such local directory" in _one_line(info.value) and "Hugging Face cache" not in str(info.value)


def test_the_cli_prints_the_error_as_one_line(hub, tmp_path):
    from typer.testing import CliRunner

    from ubsmoe.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--set", f"model.name={MISSING}", "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"error: model.name = {MISSING!r}: no such local directory, not in the Hugging Face cache" in text
    assert "HF_HUB_OFFLINE is set" in text and "Traceback" not in result.output
    assert not (out / "config.yaml").exists()  # nothing left behind: the same --out can be used again


def test_a_cached_native_model_loads_by_its_hub_id(hub):
    folder = save_tiny_model(snapshot(hub, "tiny-org/tiny-olmoe", refs=("main", "v1")), "olmoe")
    loaded = load_experiment_model(_config("model.name=tiny-org/tiny-olmoe"))
    assert loaded.kind == "native" and loaded.k_max == 2
    info = loaded.info
    assert info["hub_id"] == "tiny-org/tiny-olmoe" and info["revision"] == "main" and info["commit"] == COMMIT
    assert Path(info["path"]) == folder
    json.dumps(info)  # it goes into summary.json

    by_commit = load_experiment_model(_config("model.name=tiny-org/tiny-olmoe", f"model.revision={COMMIT}"))
    assert (by_commit.info["revision"], by_commit.info["commit"]) == (COMMIT, COMMIT)
    by_tag = load_experiment_model(_config("model.name=tiny-org/tiny-olmoe", "model.revision=v1"))
    assert (by_tag.info["revision"], by_tag.info["commit"]) == ("v1", COMMIT)
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(by_commit.model.state_dict()[name], value)


def test_an_unknown_revision_is_one_line(hub):
    save_tiny_model(snapshot(hub, "tiny-org/tiny-olmoe"), "olmoe")
    with pytest.raises(ModelNotFoundError) as info:
        load_experiment_model(_config("model.name=tiny-org/tiny-olmoe", "model.revision=no-such-branch"))
    text = _one_line(info.value)
    assert text.startswith("model.name = 'tiny-org/tiny-olmoe' at revision 'no-such-branch': ")
    assert "HF_HUB_OFFLINE is set" in text and "hf download tiny-org/tiny-olmoe --revision no-such-branch" in text


def test_a_cached_dense_model_is_moefied_and_revisions_do_not_share_a_cache_entry(hub, monkeypatch):
    """The MoEfication cache key hashes the loaded weights and config: another revision is another entry."""
    save_tiny_llama(snapshot(hub, "tiny-org/tiny-llama", COMMIT, refs=("main",)))
    save_tiny_llama(snapshot(hub, "tiny-org/tiny-llama", OTHER_COMMIT, refs=("v2",)), seed=1)
    ids = torch.randint(4, 100, (4, 128), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(loading, "_calibration", lambda *args: [ids])  # not the BIG-bench text
    sets = (
        "model.name=tiny-org/tiny-llama",
        "model.moefication.num_experts=4",
        "model.moefication.calibration_tokens=512",
    )

    first = load_experiment_model(_config(*sets))
    assert first.kind == "moefied" and first.k_max == first.num_experts == 4
    assert first.info["commit"] == COMMIT and first.info["moefication_cache"]["hit"] is False
    again = load_experiment_model(_config(*sets, "model.revision=main"))
    assert again.info["moefication_cache"] == {**first.info["moefication_cache"], "hit": True}
    other = load_experiment_model(_config(*sets, "model.revision=v2"))
    assert other.info["commit"] == OTHER_COMMIT and other.info["moefication_cache"]["hit"] is False
    assert other.info["moefication_cache"]["key"] != first.info["moefication_cache"]["key"]


def test_the_checks_run_before_the_weights_are_needed(hub):
    """Config and tokenizer are checked first: an impossible rank is refused although no weights are cached."""
    folder = save_tiny_model(snapshot(hub, "tiny-org/no-weights"), "olmoe")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ConfigError, match=r"^lora.rank = 1000000000: training the expert adapters"):
        load_experiment_model(_config("model.name=tiny-org/no-weights", "lora.rank=1000000000"))
    with pytest.raises(ModelLoadError) as info:
        load_experiment_model(_config("model.name=tiny-org/no-weights"))
    text = _one_line(info.value)
    assert text.startswith(f"model.name = 'tiny-org/no-weights' (commit {COMMIT}): its snapshot {folder} lacks ")
    assert "model.safetensors; ubsmoe takes only safetensors weights from the hub" in text


def test_a_revision_with_a_local_folder_or_the_embedded_model_is_refused(tmp_path):
    folder = save_tiny_model(tmp_path / "olmoe", "olmoe")
    with pytest.raises(ModelLoadError) as info:
        resolve_model_directory(str(folder), "main")
    assert _one_line(info.value).startswith("model.revision = 'main': model.name = ")
    with pytest.raises(ConfigError, match="model.revision = 'main': must be null for the embedded model"):
        _config("model.revision=main")
    with pytest.raises(ConfigError, match="model.revision = 'a b': must be a branch, tag or commit"):
        _config("model.name=org/model", "model.revision=a b")
    with pytest.raises(ConfigError, match="model.revision = 7: must be a string"):
        _config("model.name=org/model", "model.revision=7")


def test_the_np_ablation_reads_a_hub_model_s_config(hub):
    from ubsmoe.compare import variant_config

    save_tiny_model(snapshot(hub, "tiny-org/tiny-olmoe"), "olmoe")
    base = _config("model.name=tiny-org/tiny-olmoe")
    assert variant_config(base, "ubsmoe-np1x", 0).moe.num_candidates == 2  # tiny OLMoE: top-2 of 4 experts
    with pytest.raises(ConfigError, match="N_p ablation needs K_max and M of the model: model.name = "):
        variant_config(_config(f"model.name={MISSING}"), "ubsmoe-np1x", 0)


def test_missing_weight_shards_are_named(tmp_path):
    from ubsmoe.models.loading import missing_weights

    assert missing_weights(tmp_path) == ["model.safetensors"]
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert missing_weights(tmp_path) == ["model-00002-of-00002.safetensors"]
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert missing_weights(tmp_path) == []


def _http_error(kind: type[Exception], status: int) -> Exception:
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return kind(f"{status} Client Error", response=response)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("repository", "no such local directory, and no such model on the Hugging Face hub (a private one needs"),
        ("gated", "a gated model; accept its conditions on huggingface.co and log in"),
        ("revision", None),
        ("network", "could not get it from the Hugging Face hub (ConnectError: boom); download it with `hf download"),
    ],
)
def test_hub_errors_online_are_one_line(hub, monkeypatch, error, message):
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    raised = {
        "repository": lambda: _http_error(errors.RepositoryNotFoundError, 404),
        "gated": lambda: _http_error(errors.GatedRepoError, 403),
        "revision": lambda: _http_error(errors.RevisionNotFoundError, 404),
        "network": lambda: httpx2.ConnectError("boom"),
    }[error]()

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ModelLoadError) as info:
        load_experiment_model(_config("model.name=org/model", "model.revision=v3"))
    text = _one_line(info.value)
    if error == "revision":
        assert text == "model.revision = 'v3': 'org/model' has no such branch, tag or commit on the Hugging Face hub"
    else:
        assert text.startswith("model.name = 'org/model'") and message in text, text
