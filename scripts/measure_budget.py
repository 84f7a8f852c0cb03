"""Measure how well the memory budget's plan matches what a process actually holds.

For each prefill step, a fresh process loads STORE with a budget that gives the
expert cache ``--fraction`` of the experts (plan_budget's own numbers for the
rest), runs a ``--prompt``-token prompt through mlx-lm's stream_generate (its
default prefill step of 2048: the model holds its planned step itself) and
decodes ``--decode`` tokens. It reports the plan's parts, the process's peak RSS
and MLX's peak, and the ratio the issue asks about:

    plan non-cache = budget - expert cache   (baseline + dense + KV + working memory)
    held non-cache = peak RSS - expert cache

    python scripts/measure_budget.py STORE --steps 128,512 --prompt 600 [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys
import mlx.core as mx
import numpy as np
cfg = json.loads(sys.argv[1])
mx.set_default_device(mx.gpu if cfg["gpu"] else mx.cpu)
if cfg["gpu"]:
    mx.set_memory_limit(48 << 30)
from mlx_lm.generate import stream_generate
import d2moe_mlx.model as d2model
from d2moe_mlx import mwq
from d2moe_mlx.budget import budget_for_slots
from d2moe_mlx.engine import choose_layout, streaming_of
from d2moe_mlx.layout import make_layout
from d2moe_mlx.memory import peak_rss_bytes
from d2moe_mlx.store.reader import Store
from d2moe_mlx.system import current_rss_bytes

dtype = "bfloat16" if cfg["gpu"] else "float32"
itemsize = 2 if cfg["gpu"] else 4
opts = dict(context=cfg["prompt"] + cfg["decode"] + 8, prefill_step=cfg["step"])
d2model._start_device()
with Store.open(cfg["store"]) as store:
    spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
    lay = make_layout(choose_layout("auto", spec, store.manifest, True), spec)
    slots = max(int(round(cfg["fraction"] * store.num_experts)), store.config["num_experts_per_tok"])
    budget = budget_for_slots(slots, store, lay, spec.num_levels - 1, itemsize, current_rss_bytes(),
                              **opts)
model, tokenizer = d2model.load(cfg["store"], memory_budget=budget, dtype=dtype, **opts)
plan = streaming_of(model).plan
prompt = np.random.default_rng(0).integers(3, 6000, cfg["prompt"]).tolist()
tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=cfg["decode"])]
print(json.dumps(dict(step=cfg["step"], budget=budget, baseline=plan.baseline, dense=plan.dense,
                      kv=plan.kv, working=plan.working, cache=plan.cache_used,
                      peak_rss=peak_rss_bytes(), mlx_peak=mx.get_peak_memory(), tokens=len(tokens),
                      describe=plan.describe())))
"""


def measure(store: str, step: int, prompt: int, decode: int, fraction: float, gpu: bool) -> dict:
    """One fresh process; returns the plan's parts and the measured peaks (bytes)."""
    cfg = dict(store=store, step=step, prompt=prompt, decode=decode, fraction=fraction, gpu=gpu)
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True,
                         text=True)
    if run.returncode:
        raise RuntimeError(f"step {step}: {run.stderr[-3000:]}")
    r = json.loads(run.stdout.strip().splitlines()[-1])
    r["plan_non_cache"] = r["budget"] - r["cache"]
    r["held_non_cache"] = r["peak_rss"] - r["cache"]
    r["ratio"] = r["plan_non_cache"] / r["held_non_cache"]
    r["peak_over_budget"] = r["peak_rss"] / r["budget"]
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--steps", default="128,512", help="prefill steps the budget plans for")
    p.add_argument("--prompt", type=int, default=600, help="prompt tokens")
    p.add_argument("--decode", type=int, default=8, help="decoded tokens")
    p.add_argument("--fraction", type=float, default=0.25, help="expert cache, fraction of the experts")
    p.add_argument("--gpu", action="store_true", help="MLX's GPU backend, bfloat16")
    p.add_argument("--json", action="store_true", help="print one JSON object per step")
    a = p.parse_args(argv)
    for step in (int(s) for s in a.steps.split(",")):
        r = measure(a.store, step, a.prompt, a.decode, a.fraction, a.gpu)
        if a.json:
            print(json.dumps(r))
            continue
        mib = 2**20
        print(f"step {step}: {r['describe']}")
        print(f"  peak RSS {r['peak_rss'] / mib:.1f} MiB = {r['peak_over_budget']:.3f} x budget; "
              f"non-cache planned {r['plan_non_cache'] / mib:.1f} MiB, held {r['held_non_cache'] / mib:.1f} "
              f"MiB: plan/held = {r['ratio']:.3f}; MLX peak {r['mlx_peak'] / mib:.1f} MiB")


if __name__ == "__main__":
    main()
