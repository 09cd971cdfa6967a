"""MoEfication: dense SwiGLU language models turned into UB-SMoE models (DESIGN section 3).

Each feed-forward network (FFN) `down(act(gate x) * up x)` is separable over its I intermediate
neurons, so it equals the sum of the FFNs over any partition of the neurons. `moefy` partitions every
FFN of a dense model into

- an always-on **shared group**: the `shared_fraction` of neurons with the highest mean |activation|
  on calibration tokens (a `ubsmoe.moe.SwiGLU`, frozen, no LoRA), and
- **M routed experts** of equal size, found by balanced k-means over the remaining neurons
  (`grouping`): on each neuron's |act(gate x) * (up x)| profile over the calibration tokens
  ("coactivation", default), on the neuron's gate row ("gate_kmeans"), or in index order
  ("contiguous"). When the routed count does not divide by M, the remainder (the next neurons by
  mean |activation|) joins the shared group, so no neuron is dropped;

and fits a router W_r (M, H): by default a ridge regression from the FFN input to each expert's output
L2 norm on the calibration tokens ("ridge"), or the mean gate row of each expert ("centroid"). The
dense FFN is replaced by a `MoEfiedBlock` (a `UBSMoEBlock` with unit gates and K_max = M). With K = M
it computes exactly the dense FFN; with K < M only the shared group and the K selected experts run.

Design notes (see also docs/decisions.md):

- Calibration streams sufficient statistics instead of keeping activations: pass 1 accumulates each
  neuron's sum |a| and, for co-activation grouping, the Gram matrix |A|^T |A| (I x I), on which
  balanced k-means runs in kernel form (distances need only the Gram matrix, so memory does not grow
  with the number of calibration tokens); pass 2, once the groups are known, accumulates X^T X and
  X^T Y (Y = per-expert output norms) for the ridge router. Layers are processed in chunks sized to
  `max_statistics_bytes`; the forward stops after the chunk's last layer.
- The router has no bias, because the UB-SMoE block's router has none: the ridge fit goes through the
  origin. (Top-k of the softmax is shift-invariant per token, but a per-expert bias is not.) On
  SmolLM2-135M (layers 3/10/17/24, M = 8) fitting an intercept changed the held-out layer error at
  K = 2/4/6 by less than 0.3%: the FFN input carries a near-constant direction that plays its part.
- The router is rescaled so that its logits spread with a standard deviation of `router_logit_std`
  across the experts of a token (on average over calibration tokens). The ranking does not change;
  the scale matters because DMR's phi (range [-1, 1]) is added to these logits.
- The optional recovery stage (`recovery=True`, off by default) trains each layer's routed experts
  (and, by default, the shared group) to reproduce the dense FFN output on cached calibration inputs
  at K sampled from `recovery_top_ks`, with the router fixed. It breaks the exact K = M identity
  (K = M is one of the sampled values, so it stays close).

`save_moefied` / `load_moefied` write and read a MoEfied model as safetensors plus a JSON file (no
recalibration, no base checkpoint needed); `moefy_cached` calibrates once per machine and caches the
result under a key derived from the base model, the config and the calibration tokens.

The subpackage, lowest first: `config` (MoEficationConfig, format constants), `block` (MoEfiedBlock),
`grouping` (neuron grouping and router fitting, pure functions), `calibration` (inspection, calibration
data and passes, diagnostics), `convert` (`moefy`, recovery), `storage` (save / load, the cache).
"""

from ubsmoe.models.moefication.block import MoEfiedBlock, dense_layout, moefied_blocks
from ubsmoe.models.moefication.calibration import (
    calibration_batches,
    calibration_fingerprint,
    dense_mlps,
    expert_outputs,
    reconstruction_error,
)
from ubsmoe.models.moefication.config import CONFIG_FILE, DENSE_FAMILIES, GROUPINGS, ROUTERS, MoEficationConfig
from ubsmoe.models.moefication.convert import moefy, recover_block
from ubsmoe.models.moefication.grouping import (
    balanced_assignment,
    balanced_kmeans,
    centroid_router,
    fit_ridge_router,
    group_neurons,
    scale_router,
    split_shared,
)
from ubsmoe.models.moefication.storage import (
    load_moefied,
    model_fingerprint,
    moefication_cache_key,
    moefy_cached,
    save_moefied,
)

__all__ = [
    "CONFIG_FILE",
    "DENSE_FAMILIES",
    "GROUPINGS",
    "MoEficationConfig",
    "MoEfiedBlock",
    "ROUTERS",
    "balanced_assignment",
    "balanced_kmeans",
    "calibration_batches",
    "calibration_fingerprint",
    "centroid_router",
    "dense_layout",
    "dense_mlps",
    "expert_outputs",
    "fit_ridge_router",
    "group_neurons",
    "load_moefied",
    "model_fingerprint",
    "moefication_cache_key",
    "moefied_blocks",
    "moefy",
    "moefy_cached",
    "reconstruction_error",
    "recover_block",
    "save_moefied",
    "scale_router",
    "split_shared",
]
