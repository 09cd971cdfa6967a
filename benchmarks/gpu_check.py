"""GPU check of the UB-SMoE block: its fast path against the eager reference, and its step time per K against peft.

1. Correctness. `UBSMoEBlock(implementation="auto")`, the fast path (`grouped_mm` expert matmuls wherever the
   device, dtype and shapes allow them), against `UBSMoEBlock(implementation="eager")`, the per-expert loop that
   is the reference, over the same frozen router and expert tensors, the same LoRA (random non-zero B) and the same
   phi, with both LoRA projections (`rows`, the native-model default, and `tokens`), at K = 1, K_max / 2 and
   K_max, in float32 and bfloat16. Compared per tensor: the output, the input gradient, and every trainable
   parameter's gradient (each expert LoRA after the pseudo-gradient, phi). A tensor passes when
   max |fast - eager| <= tol * max |eager|, with tol = 1e-4 in float32 and 2e-2 in bfloat16. For scale: two
   computations of the same block in different orders (the eager path with `rows` against `tokens` LoRA
   projections, H 512, I 256, 64 experts, rank 16, on a CPU) differ by at most 4e-7 in float32 and 7e-3 in
   bfloat16 (an 8-bit mantissa: a rounding step is 4e-3, and a few lie between the input and each gradient);
   a fast path that quietly ran TF32 in float32 would show about 1e-3 and fail.
2. Step time. One training step (forward, backward of a fixed output gradient, zeroed gradients; plus
   `apply_pseudo_gradient` for UB-SMoE) at OLMoE-1B-7B's layer dimensions (hidden 2048, expert intermediate 1024,
   64 experts, native top-8; random weights) in bfloat16, per K in 1, 2, 4, 8: UB-SMoE against transformers'
   `OlmoeSparseMoeBlock` with its `grouped_mm` experts kernel and peft `target_parameters` LoRA on the fused
   experts, the same rank and alpha (the contenders of benchmarks/moe_block.py, from benchmarks/moe_contenders.py).
   The two are interleaved within every repeat, each step is bracketed by device synchronisations, and the
   median over repeats is reported with the time ratio to K_max, the speed-up over transformers + peft, the
   analytic FLOP ratio and (CUDA) the peak memory of each step. Timing stops starting new repeats after
   --budget-s seconds, so a run ends in a few minutes whatever the GPU.

One JSON document goes to stdout (machine, versions, both parts), progress to stderr; the exit status is 1 when a
correctness case fails. Without CUDA (and --device cuda, the default) it prints a JSON with the skip reason and
exits 0. The same functions run on a CPU with small dimensions (tests/test_gpu_check.py):

    python benchmarks/gpu_check.py > gpu_check.json          # one GPU, under 5 minutes
    python benchmarks/gpu_check.py --device cpu --hidden 64 --intermediate 32 --experts 8 --top-k 4 --ks 1,2,4 \\
        --rank 8 --tokens 256 --check-tokens 64 --repeats 3     # the same code on a CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_contenders import (  # noqa: E402  (beside this script; benchmarks/ is not a package)
    FLOPS_FORMULA,
    analytic_step_flops,
    environment,
    hf_olmoe_block,
    hf_step,
    only_adapters_train,
    ub_step,
    ubsmoe_block,
)

from ubsmoe.moe import UBSMoEBlock, UBSMoEConfig  # noqa: E402

BENCHMARK = "gpu_check: UB-SMoE block fast path vs eager reference, and step time per K vs transformers + peft"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
"""max |fast - eager| / max |eager| allowed per tensor (see the module docstring)."""
T_START = time.perf_counter()


def log(*parts: Any) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f}s]", *parts, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- 1. correctness: fast path vs the eager reference ------------------------------------------------------------
def random_layer(
    hidden: int,
    intermediate: int,
    experts: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    init_std: float = 0.02,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen gate_up (M, 2I, H), down (M, H, I) and router (M, H) weights ~ N(0, init_std) (OLMoE's initialiser)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device) * init_std).to(dtype)

    return draw(experts, 2 * intermediate, hidden), draw(experts, hidden, intermediate), draw(experts, hidden)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference| (in float32; the denominator kept above the smallest normal)."""
    difference = (value.float() - reference.float()).abs().max()
    scale = reference.float().abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float(difference / scale)


def _training_tensors(block: UBSMoEBlock, x: torch.Tensor, grad_out: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The output, the input gradient and every trainable gradient (after PG) of one step at K = k."""
    block.top_k = k
    x = x.detach().clone().requires_grad_()
    out = block(x)
    out.backward(grad_out)
    block.apply_pseudo_gradient()
    tensors = {"output": out.detach(), "input_grad": x.grad}
    for name, parameter in block.trainable_parameters().items():
        if parameter.grad is not None:
            tensors[f"grad.{name}"] = parameter.grad.detach().clone()
    block.zero_grad(set_to_none=True)
    return tensors


def check_correctness(
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    hidden: int,
    intermediate: int,
    experts: int,
    top_k: int,
    rank: int,
    alpha: float,
    tokens: int,
    ks: Sequence[int] | None = None,
    projections: Sequence[str] = ("rows", "tokens"),
    seed: int = 0,
) -> dict[str, Any]:
    """The fast UB-SMoE block against the eager reference in `dtype` on `device` (see the module docstring)."""
    device = torch.device(device)
    tolerance = TOLERANCE[dtype]
    ks = sorted({1, max(1, top_k // 2), top_k} if ks is None else set(ks))
    gate_up, down, router = random_layer(hidden, intermediate, experts, dtype=dtype, device=device, seed=seed)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(tokens, hidden, generator=generator, device=device).to(dtype)
    grad_out = torch.randn(tokens, hidden, generator=generator, device=device).to(dtype)
    cases = []
    for projection in projections:
        blocks = {
            name: UBSMoEBlock(
                gate_up,
                down,
                router,
                top_k,
                UBSMoEConfig(lora_rank=rank, lora_alpha=alpha, implementation=name, lora_projection=projection),
            )
            for name in ("auto", "eager")
        }
        fast, eager = blocks["auto"], blocks["eager"]
        with torch.no_grad():  # non-zero LoRA B (every LoRA gradient is then non-zero) and phi, the same in both
            for target in fast.lora.targets:
                fast.lora.lora_B[target].normal_(0.0, 0.02, generator=generator)
            fast.phi.uniform_(-0.5, 0.5, generator=generator)
            reference = fast.trainable_parameters()
            for name, parameter in eager.trainable_parameters().items():
                parameter.copy_(reference[name])
        fast_path = fast.implementation_for(dtype)
        for k in ks:
            case: dict[str, Any] = {"lora_projection": projection, "k": k, "fast_path": fast_path}
            try:
                got = _training_tensors(fast, x, grad_out, k)
                want = _training_tensors(eager, x, grad_out, k)
                if set(got) != set(want):
                    raise AssertionError(f"different gradients: fast {sorted(got)}, eager {sorted(want)}")
                errors = {name: relative_error(got[name], want[name]) for name in want}
                finite = all(bool(torch.isfinite(t).all()) for t in got.values())
                worst = max(errors, key=errors.__getitem__)
                case.update(
                    max_relative_error=errors[worst],
                    worst_tensor=worst,
                    relative_errors={name: float(f"{error:.3g}") for name, error in errors.items()},
                    finite=finite,
                    passed=finite and errors[worst] <= tolerance,
                )
            except Exception as error:  # report and carry on: one JSON for every case
                case.update(error=f"{type(error).__name__}: {error}", passed=False)
            cases.append(case)
            log(
                f"correctness {dtype_name(dtype)} {projection} K={k}: "
                + (case["error"] if "error" in case else f"max relative error {case['max_relative_error']:.2e}")
            )
    return {
        "dtype": dtype_name(dtype),
        "device": str(device),
        "tolerance": tolerance,
        "tokens": tokens,
        "compared": "fast (implementation='auto') vs eager per-expert reference: output, input gradient, "
        "every trainable gradient after the pseudo-gradient",
        "cases": cases,
        "passed": all(case["passed"] for case in cases),
    }


# ---- 2. step time per K vs transformers + peft -------------------------------------------------------------------
def time_steps(
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    hidden: int,
    intermediate: int,
    experts: int,
    top_k: int,
    ks: Sequence[int],
    rank: int,
    alpha: float,
    tokens: int,
    repeats: int,
    warmup: int,
    budget_s: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Median step time per K of UB-SMoE and of transformers' grouped_mm OLMoE block + peft LoRA."""
    device = torch.device(device)
    ks = sorted(set(ks) | {top_k})
    torch.manual_seed(seed)
    hf = hf_olmoe_block(hidden, intermediate, experts, top_k, rank, alpha, dtype=dtype, device=device)
    block = ubsmoe_block(hf, rank, alpha, "auto")
    if not (only_adapters_train(hf.peft_model) and only_adapters_train(block)):
        raise AssertionError("only LoRA (and phi) may train")
    x = torch.randn(4, max(1, tokens // 4), hidden, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)  # a fixed dense gradient (grouped_mm's CPU backward rejects stride-0 ones)
    contenders: dict[str, Callable[[int], None]] = {
        "ubsmoe": lambda k: ub_step(block, x, grad_out, k),
        "hf_peft_grouped_mm": lambda k: hf_step(hf, x, grad_out, k, "grouped_mm"),
    }
    names = list(contenders)
    times: dict[str, dict[int, list[float]]] = {name: {k: [] for k in ks} for name in names}
    peak: dict[str, dict[int, int]] = {name: dict.fromkeys(ks, 0) for name in names}
    started, done = time.perf_counter(), 0
    for rep in range(warmup + repeats):
        if rep > warmup and budget_s is not None and time.perf_counter() - started > budget_s:
            log(f"timing: stopping after {rep - warmup} timed repeats (--budget-s {budget_s})")
            break
        for k in ks:
            for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate who goes first
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                synchronize(device)
                t0 = time.perf_counter()
                contenders[name](k)
                synchronize(device)
                elapsed = time.perf_counter() - t0
                if rep >= warmup:
                    times[name][k].append(elapsed)
                    if device.type == "cuda":
                        peak[name][k] = max(peak[name][k], torch.cuda.max_memory_allocated(device))
        done += 1
        log(f"timing repeat {rep + 1}/{warmup + repeats}" + (" (warm-up)" if rep < warmup else ""))
    median = {name: {k: statistics.median(v) for k, v in per_k.items()} for name, per_k in times.items()}
    flops = {k: analytic_step_flops(x.shape[0] * x.shape[1], hidden, intermediate, experts, k, rank) for k in ks}
    per_k = []
    for k in ks:
        row: dict[str, Any] = {
            "k": k,
            "time_s": {name: median[name][k] for name in names},
            "time_ratio_to_k_max": {name: median[name][k] / median[name][top_k] for name in names},
            "speedup_vs_hf_peft": median["hf_peft_grouped_mm"][k] / median["ubsmoe"][k],
            "flops_ubsmoe": flops[k],
            "flop_ratio_to_k_max": flops[k] / flops[top_k],
        }
        if device.type == "cuda":
            row["peak_memory_gib"] = {name: round(peak[name][k] / 2**30, 3) for name in names}
        per_k.append(row)
    return {
        "dtype": dtype_name(dtype),
        "device": str(device),
        "tokens": x.shape[0] * x.shape[1],
        "batch": x.shape[0],
        "seq": x.shape[1],
        "statistic": "median",
        "repeats": min(repeats, done - warmup) if done > warmup else 0,
        "warmup": warmup,
        "interleaved": True,
        "step": "forward + out.backward(fixed grad) + apply_pseudo_gradient (UB-SMoE) + zero_grad(set_to_none)",
        "contenders": {
            "ubsmoe": f"UBSMoEBlock(implementation='auto' -> {block.implementation_for(dtype)!r}), "
            f"LoRA rank {rank} on gate/up/down of every expert, DMR and PG on",
            "hf_peft_grouped_mm": "transformers OlmoeSparseMoeBlock, experts_implementation='grouped_mm', "
            f"+ peft target_parameters LoRA rank {rank} on experts.gate_up_proj and experts.down_proj",
        },
        "flops": {"analytic_formula": FLOPS_FORMULA, "counts": "ubsmoe step only (matmuls, 2 per multiply-add)"},
        "per_k": per_k,
    }


# ---- the script --------------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--hidden", type=int, default=2048, help="H (OLMoE-1B-7B: 2048)")
    parser.add_argument("--intermediate", type=int, default=1024, help="expert intermediate I (OLMoE-1B-7B: 1024)")
    parser.add_argument("--experts", type=int, default=64, help="M (OLMoE-1B-7B: 64)")
    parser.add_argument("--top-k", type=int, default=8, help="K_max, the native top-k (OLMoE-1B-7B: 8)")
    parser.add_argument("--ks", type=_ints, default=[1, 2, 4, 8], help="K values to time (K_max is always timed)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of both contenders")
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha of both contenders")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per timed step (batch 4 x tokens/4)")
    parser.add_argument("--check-tokens", type=int, default=1024, help="tokens of each correctness case")
    parser.add_argument(
        "--check-dtypes", default="float32,bfloat16", help="dtypes of the correctness check (float32, bfloat16)"
    )
    parser.add_argument("--timing-dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repeats first")
    parser.add_argument("--budget-s", type=float, default=150.0, help="start no new timed repeat after this long")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = [d for d in args.check_dtypes.split(",") if d.strip() and d.strip() not in DTYPES]
    if unknown:
        parser.error(f"--check-dtypes: unknown {unknown}; use {sorted(DTYPES)}")
    if not 1 <= args.top_k <= args.experts or not all(1 <= k <= args.top_k for k in args.ks):
        parser.error("need 1 <= K <= --top-k <= --experts for every K of --ks")
    if args.repeats < 1 or args.warmup < 0 or args.tokens < 4 or args.check_tokens < 1:
        parser.error("--repeats >= 1, --warmup >= 0, --tokens >= 4 and --check-tokens >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = (
            f"CUDA is not available (torch {torch.__version__}, built with CUDA {torch.version.cuda}); run this on a "
            "machine with an NVIDIA GPU, or pass --device cpu (with small dimensions) to exercise the same code"
        )
        result = {"benchmark": BENCHMARK, "skipped": True, "reason": reason, "environment": environment()}
        print(json.dumps(result, indent=2))
        return 0
    shapes = {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "experts": args.experts,
        "top_k_max": args.top_k,
        "lora_rank": args.rank,
        "lora_alpha": args.alpha,
    }
    dims = {k: shapes[k] for k in ("hidden", "intermediate", "experts")}
    log(f"correctness on {device}: {json.dumps(shapes)}")
    correctness = [
        check_correctness(
            device,
            DTYPES[name.strip()],
            **dims,
            top_k=args.top_k,
            rank=args.rank,
            alpha=args.alpha,
            tokens=args.check_tokens,
            seed=args.seed,
        )
        for name in args.check_dtypes.split(",")
        if name.strip()
    ]
    log(f"timing K = {sorted(set(args.ks) | {args.top_k})} in {args.timing_dtype}, {args.tokens} tokens per step")
    timing = time_steps(
        device,
        DTYPES[args.timing_dtype],
        **dims,
        top_k=args.top_k,
        ks=args.ks,
        rank=args.rank,
        alpha=args.alpha,
        tokens=args.tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        budget_s=args.budget_s,
        seed=args.seed,
    )
    passed = all(check["passed"] for check in correctness)
    result = {
        "benchmark": BENCHMARK,
        "skipped": False,
        "passed": passed,
        "shapes": shapes,
        "correctness": correctness,
        "timing": timing,
        "summary": {
            "max_relative_error": {
                check["dtype"]: max((c.get("max_relative_error", float("inf")) for c in check["cases"]), default=None)
                for check in correctness
            },
            "ubsmoe_time_ratio_to_k_max": {row["k"]: row["time_ratio_to_k_max"]["ubsmoe"] for row in timing["per_k"]},
            "speedup_vs_hf_peft": {row["k"]: row["speedup_vs_hf_peft"] for row in timing["per_k"]},
        },
        "environment": environment(device),
        "arguments": vars(args),
        "wall_time_s": time.perf_counter() - T_START,
    }
    print(json.dumps(result, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
