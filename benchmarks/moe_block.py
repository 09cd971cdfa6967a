"""Training-step time of one sparse MoE layer per top-k K: UB-SMoE vs transformers' OLMoE block + peft LoRA.

For every K in 1..K_max this times one step = forward + backward (of a fixed random output gradient) +
`apply_pseudo_gradient()` (UB-SMoE only) + zeroing the grads, on OLMoE-1B-7B proportions scaled to a CPU
(OLMoE: hidden 2048, intermediate 1024, 64 experts, top-8). Only LoRA (and UB-SMoE's phi) are trainable; the
input requires grad as it would inside a network. Contenders, all fp32 and sharing the same frozen weights:

  hf_peft_grouped_mm  OlmoeSparseMoeBlock, experts_implementation="grouped_mm" (what a transformers model picks by
                      default), with peft `target_parameters` LoRA on experts.gate_up_proj and experts.down_proj
  hf_peft_eager       the same with the per-expert loop (a standalone block's default); slow, so only at --hf-eager-ks
  ubsmoe_eager        UBSMoEBlock(implementation="eager")
  ubsmoe_fast         UBSMoEBlock(implementation="auto"), i.e. grouped_mm for these shapes

Contenders are interleaved within every repeat (so machine noise hits all of them) and the median over repeats
is reported. FLOPs per K come from torch's FlopCounterMode over the eager UB-SMoE step (matmuls only) and are
checked against an analytic formula. One JSON document goes to stdout, progress to stderr:

    python benchmarks/moe_block.py > moe_block.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import OlmoeConfig, OlmoeModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_contenders import (  # noqa: E402  (beside this script; benchmarks/ is not a package)
    FLOPS_FORMULA,
    analytic_step_flops,
    copy_peft_lora,
    hf_olmoe_block,
    hf_step,
    only_adapters_train,
    ub_step,
    ubsmoe_block,
)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch 4 x tokens/4)")
parser.add_argument("--hidden", type=int, default=512)
parser.add_argument("--intermediate", type=int, default=256)
parser.add_argument("--experts", type=int, default=64)
parser.add_argument("--top-k", type=int, default=8, help="K_max, the native top-k")
parser.add_argument("--rank", type=int, default=8)
parser.add_argument("--alpha", type=float, default=16.0)
parser.add_argument("--repeats", type=int, default=7)
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--hf-eager-ks", default=None, help="comma-separated K to time hf_peft_eager at (default 2,K_max)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

H, I, M, K_MAX, R = args.hidden, args.intermediate, args.experts, args.top_k, args.rank
KS = list(range(1, K_MAX + 1))
HF_EAGER_KS = {int(k) for k in (args.hf_eager_ks or f"{min(2, K_MAX)},{K_MAX}").split(",") if k.strip()}
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
transformers.logging.set_verbosity_error()
t_start = time.perf_counter()
load_start = os.getloadavg()


def log(*a):
    print(f"[{time.perf_counter() - t_start:6.1f}s]", *a, file=sys.stderr, flush=True)


# ---- contenders (benchmarks/moe_contenders.py) --------------------------------------------------------------
hf = hf_olmoe_block(H, I, M, K_MAX, R, args.alpha)
hf_peft = hf.peft_model
ub = {impl: ubsmoe_block(hf, R, args.alpha, impl) for impl in ("eager", "auto")}
for module in (hf_peft, *ub.values()):
    assert only_adapters_train(module)
# transformers models resolve experts_implementation=None to this (a bare block has None: the eager loop)
tiny = OlmoeConfig(hidden_size=16, intermediate_size=8, num_experts=4, num_hidden_layers=1, num_attention_heads=2)
hf_model_default = OlmoeModel(tiny).config._experts_implementation

x = torch.randn(4, args.tokens // 4, H, requires_grad=True)
grad_out = torch.randn_like(x)  # a fixed dense grad: grouped_mm's CPU backward rejects expanded stride-0 grads


contenders = {
    "hf_peft_grouped_mm": lambda k: hf_step(hf, x, grad_out, k, "grouped_mm"),
    "hf_peft_eager": lambda k: hf_step(hf, x, grad_out, k, "eager"),
    "ubsmoe_eager": lambda k: ub_step(ub["eager"], x, grad_out, k),
    "ubsmoe_fast": lambda k: ub_step(ub["auto"], x, grad_out, k),
}


# ---- equivalence at K_max: same weights, same routing -> same output ------------------------------------------
def max_diff(implementation):
    hf.config._experts_implementation, hf.wrapper.mlp.gate.top_k = implementation, K_MAX
    outs, grads = [], []
    for fn in (hf_peft, ub["auto"], ub["eager"]):
        if fn is not hf_peft:
            fn.top_k = K_MAX
        outs.append(fn(x))
        grads.append(torch.autograd.grad(outs[-1], x, grad_out)[0])
    return {
        "out": max((o - outs[0]).abs().max().item() for o in outs[1:]),
        "x_grad": max((g - grads[0]).abs().max().item() for g in grads[1:]),
        "out_scale": outs[0].abs().max().item(),
    }


equivalence = {"zero_lora_b": {impl: max_diff(impl) for impl in ("grouped_mm", "eager")}}
# map peft's fused LoRA onto UB-SMoE's (gate and up share peft's A; B splits) and compare with non-zero B too
copy_peft_lora(hf, list(ub.values()))
equivalence["mapped_lora"] = {impl: max_diff(impl) for impl in ("grouped_mm", "eager")}
for block in ub.values():
    block.apply_pseudo_gradient()  # clear the routing masses the checks recorded
equivalence_max_abs_diff = equivalence["zero_lora_b"]["grouped_mm"]["out"]
log("equivalence", json.dumps(equivalence))


# ---- FLOPs: counted over the eager UB-SMoE step, plus the analytic count --------------------------------------
def count_flops(fn, k):
    with FlopCounterMode(display=False) as counter:
        fn(k)
    return counter.get_total_flops()


flops = {k: count_flops(contenders["ubsmoe_eager"], k) for k in KS}
fast_counted = count_flops(contenders["ubsmoe_fast"], K_MAX)
analytic = {k: analytic_step_flops(args.tokens, H, I, M, k, R) for k in KS}
log("flops", flops)

# ---- timing -------------------------------------------------------------------------------------------------
times = {name: {k: [] for k in KS} for name in contenders}
names = list(contenders)
for rep in range(args.warmup + args.repeats):
    for k in KS:
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate who goes first
        for name in order:
            if name == "hf_peft_eager" and k not in HF_EAGER_KS:
                continue
            t0 = time.perf_counter()
            contenders[name](k)
            if rep >= args.warmup:
                times[name][k].append(time.perf_counter() - t0)
    log(f"repeat {rep + 1}/{args.warmup + args.repeats}", "(warm-up)" if rep < args.warmup else "")

median = {name: {k: statistics.median(v) for k, v in per_k.items() if v} for name, per_k in times.items()}
spread = max((max(v) - min(v)) / statistics.median(v) for per_k in times.values() for v in per_k.values() if v)
per_k = []
for k in KS:
    row = {"k": k, "flops": flops[k], "flops_analytic": analytic[k], "flop_ratio": flops[k] / flops[K_MAX]}
    row["time_s"] = {name: m[k] for name, m in median.items() if k in m}
    row["time_ratio"] = {name: m[k] / m[K_MAX] for name, m in median.items() if k in m and K_MAX in m}
    row["ratio_of_ratios"] = row["time_ratio"]["ubsmoe_fast"] / row["flop_ratio"]
    row["speedup_vs_hf"] = median["hf_peft_grouped_mm"][k] / median["ubsmoe_fast"][k]
    if k in median["hf_peft_eager"]:
        row["speedup_vs_hf_eager"] = median["hf_peft_eager"][k] / median["ubsmoe_fast"][k]
    per_k.append(row)

worst = max(per_k, key=lambda r: r["ratio_of_ratios"])
k2 = per_k[min(2, K_MAX) - 1]
with open("/proc/cpuinfo") as f:
    cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
result = {
    "benchmark": "moe_block forward+backward per step",
    "shapes": {
        "tokens": args.tokens,
        "batch": 4,
        "seq": args.tokens // 4,
        "hidden": H,
        "intermediate": I,
        "experts": M,
        "top_k_max": K_MAX,
        "lora_rank": R,
        "lora_alpha": args.alpha,
        "dtype": "float32",
    },
    "timing": {
        "repeats": args.repeats,
        "warmup": args.warmup,
        "statistic": "median",
        "interleaved": True,
        "step": "forward + out.backward(fixed grad) + apply_pseudo_gradient (UB-SMoE) + zero_grad(set_to_none)",
        "hf_peft_eager_ks": sorted(HF_EAGER_KS),
        "max_relative_spread": spread,  # max over contenders and K of (max - min) / median
    },
    "environment": {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    },
    "contenders": {
        "hf_peft_grouped_mm": "OlmoeSparseMoeBlock, experts_implementation='grouped_mm' + peft target_parameters LoRA",
        "hf_peft_eager": "OlmoeSparseMoeBlock, experts_implementation='eager' (per-expert loop) + peft LoRA",
        "ubsmoe_eager": "UBSMoEBlock(implementation='eager')",
        "ubsmoe_fast": f"UBSMoEBlock(implementation='auto' -> {ub['auto'].implementation_for(x.dtype)!r})",
    },
    "hf_experts_implementation": {"model_default": hf_model_default, "bare_block_default": "eager (config value None)"},
    "flops": {
        "counter": "torch.utils.flop_counter.FlopCounterMode over the ubsmoe_eager step (matmuls only)",
        "analytic_formula": FLOPS_FORMULA,
        "counted_on_fast_path_at_k_max": fast_counted,
        "grouped_mm_counted": fast_counted > 0.5 * flops[K_MAX],
    },
    "equivalence_max_abs_diff": equivalence_max_abs_diff,
    "equivalence": equivalence,
    "per_k": per_k,
    "targets": {
        "speedup_vs_hf_at_k2": {
            "value": k2["speedup_vs_hf"],
            "threshold": 2.0,
            "met": k2["speedup_vs_hf"] >= 2.0,
            "baseline": "hf_peft_grouped_mm",
            "vs_hf_peft_eager": k2.get("speedup_vs_hf_eager"),
        },
        "time_ratio_within_1.2x_of_flop_ratio": {
            "max_ratio_of_ratios": worst["ratio_of_ratios"],
            "at_k": worst["k"],
            "threshold": 1.2,
            "met": worst["ratio_of_ratios"] <= 1.2,
        },
    },
    "wall_time_s": time.perf_counter() - t_start,
}
print(json.dumps(result, indent=2))
