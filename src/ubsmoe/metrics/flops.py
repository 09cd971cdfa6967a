"""Analytic FLOPs per token of a transformer with (UB-S)MoE layers, for training and inference.

`flops_per_token(dims, top_k, lora_rank)` counts, per token, the matmuls of one forward pass (and,
for training, of the backward pass) of a decoder-only transformer described by `ModelDims`: a native
MoE model (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE), a dense Llama-style model, or any model whose MoE
layers are UB-SMoE blocks (`ModelDims.from_model`). It is a pure function of plain dimensions.

Counting conventions (the same as `torch.utils.flop_counter.FlopCounterMode`, which the tests
compare against exactly):

- 2 FLOPs per multiply-add; matmuls only (mm, addmm, bmm, baddbmm). Norms, activations, softmax,
  rotary embeddings, biases, residual adds, gathers/scatters of the routing and the loss are not
  counted (they are O(hidden) per token, negligible next to the O(hidden^2) matmuls). The rotary
  embedding's tiny `inv_freq @ positions` product is not a counted matmul either (the counter sees
  none).
- A linear layer (in -> out) costs 2 * in * out per token; an expert SwiGLU of width I costs
  2 * H * 2I (fused gate/up) + 2 * I * H (down) = 6 * H * I per token and per routed expert, and a
  LoRA of rank r on a projection (in -> out) costs 2 * r * (in + out).
- Attention scores: Q K^T and (softmax) V are counted as full S x S products even though attention is
  causal, i.e. 4 * heads * head_dim * S per token (query heads: grouped K/V are broadcast to every
  query head), which is what the counter gives for transformers' eager attention (plain matmuls) and
  for `scaled_dot_product_attention` on GPU (flash/efficient/cuDNN kernels). On CPU, PyTorch runs
  SDPA as `_scaled_dot_product_flash_attention_for_cpu`, which the counter does not know: it counts
  0 there, so a measured count on CPU with SDPA equals this count minus `attention_scores`.
  Backward of the attention scores is counted as 2 x forward (gradients of both operands of both
  products, no recomputation); the GPU flash-attention formula adds one recomputation of Q K^T
  (2.5 x forward).
- Training = forward + backward, where backward is what autograd actually runs when only the
  expert LoRA (and phi, and optionally the router) are trainable:
  * gradients w.r.t. inputs for every matmul between the loss and the first trainable parameter:
    the LM head and every layer above the first MoE layer (attention, router, experts, shared
    expert, dense FFNs). Layers below the first MoE layer (and the first MoE layer's attention)
    get no backward at all: nothing below them needs a gradient. In the first MoE layer only the
    parts downstream of a trainable tensor are differentiated: the LoRA paths, the down projection
    (its input depends on the gate/up LoRA and the gates, which depend on phi), but not the frozen
    fused gate/up projection nor the router (their inputs need no gradient);
  * gradients w.r.t. weights only for the trainable ones: each LoRA A and B (2 * r * in and
    2 * r * out per routed token), the router when `router_trainable`. Frozen base weights get no
    weight-gradient GEMM (so training costs about 2x the forward pass, not the 3x of full
    fine-tuning).
  The LM head runs where logits are used: at every position by default (`head_share` = 1), only at
  the labelled answer positions in training with the answer-only loss (`head_share` = their share
  of the tokens; `ubsmoe.models.answer_loss`).
  The pseudo-gradient, the range regulariser and the optimizer step are O(parameters) per step, not
  per token, and are not counted.
- Per-token figures are the totals for B sequences of length S divided by B * S; every term is
  linear in the number of tokens except the attention scores, which depend on S (`seq_len`).
- Routed experts cost exactly top_k experts per token, whatever the routing (UB-SMoE only runs the
  chosen experts; load imbalance does not change the total).
- MoEfied blocks (`ModelDims.dense_at_full_k`) run a plain dense FFN at K = M: no router matmul in
  the forward (training with PG still routes once without gradient, for PG's bookkeeping) and no
  gradient through the gates; the count follows that.
- Below K = M (the routed path) the gate and up LoRA B run as one block-diagonal (2I, t*r) matmul
  per row, zero blocks included; with `ModelDims.token_lora` (MoEfied blocks' default) the LoRA A
  of gate/up and the LoRA B of down run once per token for all M experts (`ubsmoe.moe.experts`).

`olmoe_1b_7b_table()` applies this to the paper's OLMoE-1B-7B at K = 2, 4, 6, 8
(`python -m ubsmoe.metrics.flops` prints it as JSON).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

LORA_TARGETS = ("gate", "up", "down")
COMPONENTS = (
    "attention_projections",
    "attention_scores",
    "router",
    "routed_experts",
    "expert_lora",
    "shared_expert",
    "dense_ffn",
    "lm_head",
)
MOE_COMPONENTS = ("router", "routed_experts", "expert_lora", "shared_expert")


@dataclass(frozen=True)
class ModelDims:
    """The dimensions that determine a decoder-only transformer's matmul FLOPs.

    Attributes:
        hidden: model width H.
        layers: number of decoder layers.
        heads / kv_heads / head_dim: attention query heads, key/value heads and head size.
        vocab: vocabulary size (LM head H -> vocab).
        experts: routed experts M per MoE layer (0 for a dense model).
        expert_intermediate: SwiGLU width I of one routed expert.
        shared_intermediate: width of an always-on shared SwiGLU expert in MoE layers (0 if none).
        shared_expert_gate: whether the shared expert is scaled by a sigmoid gate (H -> 1; Qwen2-MoE).
        native_top_k: the model's own experts per token K_max.
        dense_intermediate: SwiGLU width of the FFN of non-MoE layers (0 if there are none).
        moe_layer_indices: indices of the MoE layers; None means every layer is an MoE layer
            (when `experts` > 0) or none is (dense model).
        dense_at_full_k: at K = M the MoE layers run as one dense FFN without routing (MoEfied
            blocks do): no router matmul in the forward (except the pseudo-gradient's bookkeeping
            pass in training) and no gradient through the gates.
        token_lora: below K = M the hidden-side expert LoRA (A of gate/up, B of down) runs per token
            over all M experts instead of per routed row (`UBSMoEConfig.lora_projection`; MoEfied blocks).
        seq_len: default sequence length S for the attention-score term.
        name: a label.
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    shared_expert_gate: bool = False
    native_top_k: int = 0
    dense_intermediate: int = 0
    moe_layer_indices: tuple[int, ...] | None = None
    dense_at_full_k: bool = False
    token_lora: bool = False
    seq_len: int = 512
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.moe_layer_indices is not None:
            indices = tuple(sorted(int(i) for i in self.moe_layer_indices))
            # canonical form: None when the indices say what the default says (every layer / none)
            default = tuple(range(self.layers)) if self.experts else ()
            object.__setattr__(self, "moe_layer_indices", None if indices == default else indices)
        problems = []
        for key in ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab", "seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{key} must be a positive integer, got {value!r}")
        for key in ("experts", "expert_intermediate", "shared_intermediate", "native_top_k", "dense_intermediate"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{key} must be an integer >= 0, got {value!r}")
        if self.experts and not (self.expert_intermediate and 1 <= self.native_top_k <= self.experts):
            problems.append(
                f"an MoE model needs expert_intermediate > 0 and 1 <= native_top_k <= experts "
                f"(got {self.expert_intermediate}, {self.native_top_k}, {self.experts})"
            )
        indices = self.moe_layer_indices
        if indices is not None:
            if len(set(indices)) != len(indices) or any(not 0 <= i < self.layers for i in indices):
                problems.append(
                    f"moe_layer_indices must be distinct layer indices in [0, {self.layers}), got {indices}"
                )
            if indices and not self.experts:
                problems.append("moe_layer_indices given for a model with no experts")
        if self.num_dense_layers and not self.dense_intermediate:
            problems.append(f"{self.num_dense_layers} dense layer(s) need dense_intermediate > 0")
        if problems:
            raise ValueError("invalid ModelDims: " + "; ".join(problems))

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers."""
        if self.moe_layer_indices is not None:
            return self.moe_layer_indices
        return tuple(range(self.layers)) if self.experts else ()

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def num_dense_layers(self) -> int:
        if self.moe_layer_indices is not None:
            return self.layers - len(self.moe_layer_indices)
        return 0 if self.experts else self.layers

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.moe_layer_indices is not None:
            data["moe_layer_indices"] = list(self.moe_layer_indices)
        return data

    # ---- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any, *, seq_len: int = 512) -> ModelDims:
        """Dimensions of a transformers config: olmoe, mixtral, qwen2_moe, qwen3_moe or llama."""
        model_type = getattr(config, "model_type", None)
        hidden = int(config.hidden_size)
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        common: dict[str, Any] = {
            "hidden": hidden,
            "layers": layers,
            "heads": heads,
            "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(config, "head_dim", None) or hidden // heads),
            "vocab": int(config.vocab_size),
            "seq_len": seq_len,
            "name": str(getattr(config, "name_or_path", "") or model_type),
        }
        if model_type == "olmoe":
            return cls(
                **common,
                experts=int(config.num_experts),
                expert_intermediate=int(config.intermediate_size),
                native_top_k=int(config.num_experts_per_tok),
            )
        if model_type == "mixtral":
            return cls(
                **common,
                experts=int(config.num_local_experts),
                expert_intermediate=int(config.intermediate_size),
                native_top_k=int(config.num_experts_per_tok),
            )
        if model_type in ("qwen2_moe", "qwen3_moe"):
            experts = int(config.num_experts)
            step = int(getattr(config, "decoder_sparse_step", 1) or 1)
            skipped = set(getattr(config, "mlp_only_layers", None) or ())
            moe = tuple(i for i in range(layers) if i not in skipped and experts > 0 and (i + 1) % step == 0)
            shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0) if model_type == "qwen2_moe" else 0
            return cls(
                **common,
                experts=experts if moe else 0,
                expert_intermediate=int(config.moe_intermediate_size) if moe else 0,
                shared_intermediate=shared if moe else 0,
                shared_expert_gate=bool(shared and moe),
                native_top_k=int(config.num_experts_per_tok) if moe else 0,
                dense_intermediate=int(config.intermediate_size) if len(moe) < layers else 0,
                moe_layer_indices=moe,
            )
        if model_type == "llama":
            return cls(**common, dense_intermediate=int(config.intermediate_size))
        raise ValueError(
            f"ModelDims.from_hf_config: unsupported model_type {model_type!r}; "
            "supported: olmoe, mixtral, qwen2_moe, qwen3_moe, llama (or build ModelDims directly)"
        )

    @classmethod
    def from_model(cls, model: Any, *, seq_len: int = 512) -> ModelDims:
        """Dimensions of a transformers model, reading its MoE layers from its UB-SMoE blocks.

        Attention, vocabulary and depth come from `model.config`; experts, their width, the shared
        expert and K_max from the blocks (which must all have the same shapes), and the MoE layers'
        positions from the blocks' module paths (`...layers.<i>...`). Works for adapted native MoE
        models and MoEfied dense models alike; a model without blocks is read from its config.
        """
        from ubsmoe.moe import UBSMoEBlock  # torch-only import, kept out of the pure-dimension path

        config = model.config
        base = cls.from_hf_config(config, seq_len=seq_len) if _known(config) else None
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, UBSMoEBlock)]
        if not named:
            if base is None:
                raise ValueError(
                    f"model of type {type(model).__name__} has no UB-SMoE blocks and an unsupported config"
                )
            return base
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        layers = int(config.num_hidden_layers)
        shapes = {_block_shape(block, hidden) for _, block in named}
        if len(shapes) != 1:
            raise ValueError(f"UB-SMoE blocks of different shapes are not supported: {sorted(shapes)}")
        experts, inner, shared, shared_gate, top_k = shapes.pop()
        indices = tuple(_layer_index(name, position, len(named), layers) for position, (name, _) in enumerate(named))
        dense = 0
        if len(indices) < layers:
            dense = int(getattr(config, "intermediate_size", 0) or 0)
        return cls(
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
            vocab=int(config.vocab_size),
            experts=experts,
            expert_intermediate=inner,
            shared_intermediate=shared,
            shared_expert_gate=shared_gate,
            native_top_k=top_k,
            dense_intermediate=dense,
            moe_layer_indices=indices,
            dense_at_full_k=all(bool(getattr(block, "dense_at_full_k", False)) for _, block in named),
            token_lora=all(bool(block.lora_on_tokens) for _, block in named),
            seq_len=seq_len,
            name=str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "")),
        )


def _known(config: Any) -> bool:
    return getattr(config, "model_type", None) in ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "llama")


def _block_shape(block: Any, hidden: int) -> tuple[int, int, int, bool, int]:
    """(M, I, shared width, shared gate?, K_max) of a UB-SMoE block."""
    shared = 0
    if block.shared_expert is not None:
        # a SwiGLU H -> Is -> H holds three H x Is matrices, whatever its attribute names
        weights = sum(p.numel() for p in block.shared_expert.parameters() if p.dim() == 2)
        if weights % (3 * hidden):
            raise ValueError(f"cannot read the shared expert's width: {weights} weights is not 3 x {hidden} x width")
        shared = weights // (3 * hidden)
    return (
        int(block.num_experts),
        int(block.intermediate_size),
        shared,
        block.shared_expert_gate is not None,
        int(block.native_top_k),
    )


def _layer_index(name: str, position: int, count: int, layers: int) -> int:
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", name)
    if numbers:
        return int(numbers[-1])
    if count == layers:
        return position
    raise ValueError(f"cannot tell which layer the UB-SMoE block {name!r} belongs to")


# ---- counting --------------------------------------------------------------------------------------
class _Tally:
    """FLOPs per component, split into forward, backward w.r.t. inputs and backward w.r.t. weights."""

    def __init__(self) -> None:
        self.parts = {c: [0, 0, 0] for c in COMPONENTS}

    def add(self, component: str, forward: int, input_grad: int = 0, weight_grad: int = 0) -> None:
        part = self.parts[component]
        part[0] += forward
        part[1] += input_grad
        part[2] += weight_grad


def flops_per_token(
    dims: ModelDims,
    top_k: int | None = None,
    lora_rank: int = 0,
    lora_targets: Iterable[str] = LORA_TARGETS,
    training: bool = True,
    seq_len: int | None = None,
    *,
    dmr: bool = True,
    router_trainable: bool = False,
    pseudo_gradient: bool = True,
    head_share: float = 1.0,
) -> dict[str, float]:
    """Matmul FLOPs per token of a model with `top_k` experts per token and expert LoRA of `lora_rank`.

    Args:
        dims: the model's dimensions.
        top_k: experts per token K (default: the native K_max).
        lora_rank: rank r of each expert's LoRA (0: no adapters).
        lora_targets: which expert projections carry a LoRA (gate, up, down).
        training: forward + backward (see the module docstring) if True, else the forward only.
        seq_len: sequence length for the attention scores (default: `dims.seq_len`).
        dmr: phi is trainable (it makes the first MoE layer's gates, hence its down projection,
            need a gradient even when only the down projection has a LoRA).
        router_trainable: the router weight trains (adds its weight gradient, and the gates need one).
        pseudo_gradient: PG is on; it only matters for `dims.dense_at_full_k` at K = M, where the
            routing probabilities are still computed (without gradient) for PG's bookkeeping.
        head_share: the share of positions at which the LM head runs. 1 computes logits everywhere
            (a plain forward); training with `ubsmoe.models.answer_loss` applies the head only at
            the labelled (answer) positions, so there it is labelled tokens / tokens.

    Returns a dict of numbers (integers when `head_share` is 1): one entry per component of `COMPONENTS` (forward + backward when
    training), `moe` (router, routed experts, expert LoRA and shared expert: the MoE layers' FFN part),
    `forward`, `backward_inputs`, `backward_weights` and `total`.
    """
    targets = tuple(lora_targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or len(set(targets)) != len(targets):
        raise ValueError(f"lora_targets must be distinct names from {LORA_TARGETS}, got {targets}")
    if not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an integer >= 0, got {lora_rank!r}")
    k = dims.native_top_k if top_k is None else top_k
    if dims.num_moe_layers and not (isinstance(k, int) and 1 <= k <= dims.experts):
        raise ValueError(f"top_k must be an integer in [1, {dims.experts}], got {top_k!r}")
    s = dims.seq_len if seq_len is None else seq_len
    if not isinstance(s, int) or s < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not 0.0 <= head_share <= 1.0:
        raise ValueError(f"head_share must be in [0, 1], got {head_share!r}")
    r = lora_rank
    if r == 0:
        targets = ()

    h = dims.hidden
    q_width, kv_width = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    projections = 2 * h * q_width + 2 * 2 * h * kv_width + 2 * q_width * h
    scores = 4 * dims.heads * dims.head_dim * s
    moe_indices = set(dims.moe_layers)
    dense_path = dims.dense_at_full_k and k == dims.experts
    # does the block's output depend on a trainable tensor? (the dense path does not use the gates)
    block_trains = bool(targets) or (not dense_path and (dmr or router_trainable))

    tally = _Tally()
    needs_grad = False  # does the residual stream entering this layer need a gradient?
    for layer in range(dims.layers):
        back = training and needs_grad
        tally.add("attention_projections", projections, projections if back else 0)
        tally.add("attention_scores", scores, 2 * scores if back else 0)
        if layer not in moe_indices:
            ffn = 6 * h * dims.dense_intermediate
            tally.add("dense_ffn", ffn, ffn if back else 0)
            continue
        _moe_layer(tally, dims, k, r, targets, training, needs_grad, dmr, router_trainable, pseudo_gradient)
        shared = 6 * h * dims.shared_intermediate + (2 * h if dims.shared_expert_gate else 0)
        tally.add("shared_expert", shared, shared if back else 0)
        needs_grad = needs_grad or block_trains
    lm_head = 2 * h * dims.vocab * (1 if head_share == 1 else head_share)
    tally.add("lm_head", lm_head, lm_head if training and needs_grad else 0)

    result = {c: sum(tally.parts[c]) for c in COMPONENTS}
    result["moe"] = sum(result[c] for c in MOE_COMPONENTS)
    result["forward"] = sum(p[0] for p in tally.parts.values())
    result["backward_inputs"] = sum(p[1] for p in tally.parts.values())
    result["backward_weights"] = sum(p[2] for p in tally.parts.values())
    result["total"] = result["forward"] + result["backward_inputs"] + result["backward_weights"]
    return result


def _moe_layer(
    tally: _Tally,
    dims: ModelDims,
    k: int,
    r: int,
    targets: tuple[str, ...],
    training: bool,
    x_grad: bool,
    dmr: bool,
    router_trainable: bool,
    pseudo_gradient: bool,
) -> None:
    """Router, routed experts and expert LoRA of one MoE layer, following autograd's requires-grad flow."""
    h, i, m = dims.hidden, dims.expert_intermediate, dims.experts
    t = training
    router = 2 * h * m
    if dims.dense_at_full_k and k == m:
        # dense path: no routing in the forward; PG's bookkeeping routes without gradient in training
        tally.add("router", router if t and pseudo_gradient and targets else 0)
        gates_grad = False
    else:
        tally.add("router", router, router if t and x_grad else 0, router if t and router_trainable else 0)
        gates_grad = x_grad or dmr or router_trainable
    dense = dims.dense_at_full_k and k == m
    # [forward, input gradient, weight gradient] per routed (token, expert) row; times k below
    experts = [4 * h * i, 4 * h * i if t and x_grad else 0, 0]  # fused gate/up: H -> 2I
    lora = [0, 0, 0]
    per_token = [0, 0, 0]  # hidden-side LoRA run once per token over all M experts (token_lora)
    inputs = [target for target in ("gate", "up") if target in targets]
    if inputs:
        width = len(inputs) * r
        # A: H -> t*r for the input targets at once (its input needs a gradient only above the first MoE layer)
        a = [2 * h * width, 2 * h * width if t and x_grad else 0, 2 * h * width if t else 0]
        if dims.token_lora and not dense:
            per_token = [v * m for v in a]
        else:
            lora = a
        # B: t*r -> I per target on the dense path (a bmm per expert and target); on the routed path one
        # block-diagonal (2I, t*r) weight over the fused gate/up rows (its zero blocks are multiplied too)
        b = 2 * width * i if dense else 2 * width * 2 * i
        lora = [lora[0] + b, lora[1] + (b if t else 0), lora[2] + (b if t else 0)]
    inner_grad = x_grad or gates_grad or bool(inputs)
    experts[0] += 2 * i * h  # down: I -> H
    experts[1] += 2 * i * h if t and inner_grad else 0
    if "down" in targets:
        # A: I -> r per row; B: r -> H per row, or per token over all M experts (token_lora)
        lora[0] += 2 * r * i
        if t:
            lora[1] += 2 * r * i if inner_grad else 0
            lora[2] += 2 * r * i
        b = [2 * r * h, 2 * r * h if t else 0, 2 * r * h if t else 0]
        if dims.token_lora and not dense:
            per_token = [u + v * m for u, v in zip(per_token, b, strict=True)]
        else:
            lora = [u + v for u, v in zip(lora, b, strict=True)]
    tally.add("routed_experts", *(k * v for v in experts))
    tally.add("expert_lora", *(k * u + v for u, v in zip(lora, per_token, strict=True)))


def count_flops(step: Callable[[], Any]) -> int:
    """Matmul FLOPs that `torch.utils.flop_counter.FlopCounterMode` measures while `step()` runs.

    Use it for measured counts next to the analytic ones (e.g. a forward, or a forward and backward
    of a training step). Note the counter's limits: it does not see `grouped_mm` (run UB-SMoE blocks
    with `implementation="eager"` to measure them) nor CPU SDPA attention (see the module docstring).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


# ---- the paper's model -------------------------------------------------------------------------------
# OLMoE-1B-7B, published config (allenai/OLMoE-1B-7B-0924 config.json): hidden_size 2048, intermediate_size 1024 per
# expert, num_hidden_layers 16, num_attention_heads 16 (num_key_value_heads 16, head_dim 128),
# num_experts 64, num_experts_per_tok 8, vocab_size 50304; no shared expert, every layer is MoE.
OLMOE_1B_7B = ModelDims(
    hidden=2048,
    layers=16,
    heads=16,
    kv_heads=16,
    head_dim=128,
    vocab=50304,
    experts=64,
    expert_intermediate=1024,
    native_top_k=8,
    seq_len=512,
    name="OLMoE-1B-7B",
)


def olmoe_1b_7b_table(
    seq_len: int = 512,
    lora_rank: int = 16,
    tiers: tuple[int, ...] = (2, 4, 6, 8),
    lora_targets: tuple[str, ...] = LORA_TARGETS,
) -> dict[str, Any]:
    """Per-token training and inference FLOPs of OLMoE-1B-7B at each K of `tiers`.

    Returns the dimensions, one row per K (total model and MoE layers only, training and
    inference, plus the training breakdown) and the relative reduction of the lowest tier against
    the highest one (the paper's low tier K = 2 against the native K = 8 by default).
    """
    rows = []
    for k in tiers:
        train = flops_per_token(OLMOE_1B_7B, k, lora_rank, lora_targets, training=True, seq_len=seq_len)
        infer = flops_per_token(OLMOE_1B_7B, k, lora_rank, lora_targets, training=False, seq_len=seq_len)
        rows.append(
            {
                "top_k": k,
                "training_total": train["total"],
                "training_moe": train["moe"],
                "inference_total": infer["total"],
                "inference_moe": infer["moe"],
                "training_breakdown": {c: train[c] for c in COMPONENTS},
            }
        )
    low, high = min(rows, key=lambda row: row["top_k"]), max(rows, key=lambda row: row["top_k"])

    def reduction(key: str) -> float:
        return round(1.0 - low[key] / high[key], 4)

    return {
        "model": OLMOE_1B_7B.name,
        "dims": OLMOE_1B_7B.to_dict() | {"seq_len": seq_len},
        "lora_rank": lora_rank,
        "lora_targets": list(lora_targets),
        "units": "FLOPs per token (2 per multiply-add, matmuls only)",
        "rows": rows,
        f"reduction_k{low['top_k']}_vs_k{high['top_k']}": {
            key: reduction(key) for key in ("training_total", "training_moe", "inference_total", "inference_moe")
        },
        "paper_reported_reduction": 0.45,
    }


if __name__ == "__main__":
    print(json.dumps(olmoe_1b_7b_table(), indent=2))
