"""A UB-SMoE run's expert LoRA as a peft LoRA adapter of the ORIGINAL transformers model.

`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), directory)` loads what this
module writes, with no ubsmoe code: `adapter_model.safetensors` and `adapter_config.json`, as peft's
`save_pretrained` writes them (`LoraConfig.to_dict()`, `inference_mode` true, `task_type`
CAUSAL_LM), plus a short README.md that says where the adapter comes from.

Native MoE models (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE; transformers 5.x fused experts)
    Each block's expert LoRA becomes a peft `target_parameters` LoRA on the 3D parameters
    `<block>.experts.gate_up_proj` (M, 2I, H) and `<block>.experts.down_proj` (M, H, I). peft's
    `lora.ParamWrapper` stores, for a 3D parameter of M experts and rank R, lora_A as (M*R, in) (expert
    e's A is rows e*R .. (e+1)*R) and lora_B as (out, R*M) (expert e's B is columns e, e+M, e+2M, ...),
    and adds scaling * B_e @ A_e to expert e's (out, in) matrix. Gate and up share the fused
    gate_up_proj, so there they are one LoRA of rank 2r per expert: A_e = [A_gate; A_up] and a
    block-diagonal B_e = [[B_gate, 0], [0, B_up]], whose product is exactly [B_gate A_gate; B_up A_up].
    `rank_pattern` / `alpha_pattern` give gate_up_proj rank 2r and alpha 2*alpha, so every scaling is
    ubsmoe's alpha / r. A trainable router is saved whole (`modules_to_save`). The peft model routes
    as the base router at the model's native top-k: it equals the UB-SMoE model at K = K_max with
    phi = 0 (a warning says when phi is not zero; see `ubsmoe.models.state` for what phi means).
MoEfied dense models (the embedded default, any dense Llama/Mistral/Qwen2/Qwen3)
    At K = M a MoEfied block runs every expert with gate 1 (unit gates), and expert e's gate/up rows
    and down columns are the original FFN's neurons `neuron_groups[e]`: the block is exactly the dense
    FFN (`ubsmoe.models.moefication`). So the per-expert LoRA is exactly a dense LoRA of rank M*r on
    the original `mlp.gate_proj`, `mlp.up_proj` and `mlp.down_proj`: for gate/up, A = [A_1; ...; A_M]
    and B puts B_e on the rows of expert e's neurons (zero on the shared group's); for down, A puts A_e
    on the columns of expert e's neurons and B = [B_1 ... B_M]. With lora_alpha = M*alpha the scaling is
    alpha / r. The peft model is the UB-SMoE model at K = M whatever phi and the router hold (every
    expert is selected at K = M). Lower tiers are not reproduced: a peft user running the dense model
    runs every expert (K = M); the K_c < M tiers need the UB-SMoE model. A MoEfied model made with
    the recovery stage is refused: its experts were trained away from the dense FFN, so no LoRA of the
    original model reproduces them.

What is left out: A3SMoE's output scales are client-local (the server keeps one per client, none is
global); the adapter holds the global expert LoRA, i.e. the model with unit output scales (a warning
says so when the model holds other scales). Tensors that are neither expert LoRA, phi, an output
scale nor a native router are refused.

Entry points: `native_peft_adapter` and `moefied_peft_adapter` (pure: adapter tensors in, a
`PeftAdapter` out), `write_peft_adapter` (atomic), `export_peft` (an in-memory UB-SMoE model),
`export_run` (a finished run's folder, what `ubsmoe export` calls) and `export_run_adapters` (what a
run writes to `OUT/adapters/peft/` at its end).

The subpackage: `layout` (the tensors and config), `writing` (the folder, atomically), `runs` (from a
model in memory or a finished run).
"""

from ubsmoe.models.peft_export.layout import (
    EXPORT_FORMATS,
    PEFT_CONFIG,
    PEFT_FOLDER,
    PEFT_WEIGHTS,
    NeuronGroups,
    PeftAdapter,
    PeftExportError,
    moefied_peft_adapter,
    native_peft_adapter,
)
from ubsmoe.models.peft_export.runs import (
    base_model_of_run,
    base_model_path,
    export_peft,
    export_refusal,
    export_run,
    export_run_adapters,
    model_peft_adapter,
)
from ubsmoe.models.peft_export.writing import write_peft_adapter

__all__ = [
    "EXPORT_FORMATS",
    "NeuronGroups",
    "PEFT_CONFIG",
    "PEFT_FOLDER",
    "PEFT_WEIGHTS",
    "PeftAdapter",
    "PeftExportError",
    "base_model_of_run",
    "base_model_path",
    "export_peft",
    "export_refusal",
    "export_run",
    "export_run_adapters",
    "model_peft_adapter",
    "moefied_peft_adapter",
    "native_peft_adapter",
    "write_peft_adapter",
]
