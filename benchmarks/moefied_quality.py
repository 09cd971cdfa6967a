"""Quality and step time of the MoEfied embedded default (SmolLM2-135M-Instruct) per K.

For the dense model and the MoEfied model at each K this measures held-out perplexity (BIG-bench
text disjoint from the calibration text), zero-shot `loglik` accuracy on real multiple-choice tasks
(BIG-bench social_iqa; ARC-Easy and PIQA from ../shared/data/commonsense where present), and the
time of one LoRA training step (forward + backward + pseudo-gradient). With --recovery it also
builds the MoEfied model with the recovery stage and measures it the same way. One JSON document
goes to stdout, progress to stderr:

    python benchmarks/moefied_quality.py > moefied_quality.json
    python benchmarks/moefied_quality.py --recovery > moefied_quality_recovery.json
"""

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from ubsmoe.data.bigbench import load_bigbench_task
from ubsmoe.data.calibration import CALIBRATION_TASKS, HELDOUT_TASKS, task_texts, token_blocks
from ubsmoe.data.multiple_choice import from_bigbench, from_llm_adapters
from ubsmoe.metrics.evaluation import loglik_accuracy, perplexity
from ubsmoe.models.embedded import embedded_default_path, load_embedded_default
from ubsmoe.models.moefication import MoEficationConfig, moefy_cached
from ubsmoe.moe import apply_pseudo_gradients, set_top_k
from ubsmoe.paths import cache_dir

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--experts", type=int, default=8)
parser.add_argument("--ks", default="2,4,6,8")
parser.add_argument("--calibration-tokens", type=int, default=8192)
parser.add_argument("--heldout-tokens", type=int, default=8192)
parser.add_argument("--mc-examples", type=int, default=150, help="examples per multiple-choice task")
parser.add_argument("--recovery", action="store_true", help="MoEfy with the recovery stage")
parser.add_argument("--step-batch", type=int, default=4)
parser.add_argument("--step-seq", type=int, default=256)
parser.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.set_num_threads(args.threads)
t_start = time.perf_counter()
COMMONSENSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"


def log(*a):
    print(f"[{time.perf_counter() - t_start:7.1f}s]", *a, file=sys.stderr, flush=True)


model, tokenizer = load_embedded_default()
log("dense model loaded")
calibration = token_blocks(tokenizer, task_texts(CALIBRATION_TASKS), 256, args.calibration_tokens, args.seed)
heldout = token_blocks(tokenizer, task_texts(HELDOUT_TASKS), 256, args.heldout_tokens, args.seed)

mc_tasks = {"bigbench/social_iqa": from_bigbench(load_bigbench_task("social_iqa"), "social_iqa")}
for name in ("ARC-Easy", "piqa"):
    path = COMMONSENSE / name / "test.json"
    if path.is_file():
        mc_tasks[name] = [from_llm_adapters(r, name) for r in json.loads(path.read_text())]
    else:
        log(f"{path} absent: {name} skipped")
for name, examples in mc_tasks.items():
    mc_tasks[name] = random.Random(args.seed).sample(examples, min(args.mc_examples, len(examples)))


def quality(m):
    result = {"heldout_perplexity": perplexity(m, heldout)}
    for name, examples in mc_tasks.items():
        result[name] = loglik_accuracy(m, tokenizer, examples)
    result["mean_accuracy"] = statistics.mean(result[n]["accuracy"] for n in mc_tasks)
    return result


def step_time(m, repeats=3):
    ids = torch.randint(
        0, tokenizer.vocab_size, (args.step_batch, args.step_seq), generator=torch.Generator().manual_seed(0)
    )
    params = [p for p in m.parameters() if p.requires_grad]
    times = []
    m.train()
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        m(input_ids=ids, labels=ids).loss.backward()
        apply_pseudo_gradients(m)
        for p in params:
            p.grad = None
        times.append(time.perf_counter() - t0)
    m.eval()
    return statistics.median(times[1:])


dense = None if args.skip_dense else {"quality": quality(model)}
for p in model.parameters():
    p.requires_grad_(False)
log("dense", json.dumps(dense))

config = MoEficationConfig(
    num_experts=args.experts, calibration_tokens=args.calibration_tokens, seed=args.seed, recovery=args.recovery
)
start = time.perf_counter()
moefied = moefy_cached(
    cache_dir() / "moefied",
    model,
    [torch.tensor(calibration)],
    config,
    base_identity=str(embedded_default_path()),
    progress=lambda stage, done, total: log(f"{stage} {done}/{total}"),
)
moefy_s = time.perf_counter() - start
log(f"moefied in {moefy_s:.0f} s (cache {moefied.moefication_cache})")
per_k = []
for k in [int(k) for k in args.ks.split(",")]:
    set_top_k(moefied, k)
    row = {"k": k, "quality": quality(moefied), "train_step_s": step_time(moefied)}
    per_k.append(row)
    log(json.dumps(row))

result = {
    "benchmark": "MoEfied SmolLM2-135M-Instruct quality and step time per K",
    "moefication": config.to_dict(),
    "calibration": {"tasks": CALIBRATION_TASKS, "tokens": sum(len(b) for b in calibration)},
    "heldout": {"tasks": HELDOUT_TASKS, "tokens": sum(len(b) for b in heldout)},
    "multiple_choice": {name: len(ex) for name, ex in mc_tasks.items()},
    "protocol": "loglik",
    "step": {"batch": args.step_batch, "seq": args.step_seq, "what": "forward + backward + PG, LoRA trainable"},
    "moefy_s": moefy_s,
    "moefication_cache_hit": moefied.moefication_cache["hit"],
    "dense": dense,
    "per_k": per_k,
    "environment": {"torch": torch.__version__, "threads": args.threads, "platform": platform.platform()},
    "wall_time_s": time.perf_counter() - t_start,
}
print(json.dumps(result, indent=2))
