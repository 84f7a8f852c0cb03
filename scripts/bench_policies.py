"""Benchmark of issue 10: decode speed of the level policies at 50/25/12.5% expert caches
and 1/4/16 concurrent requests, cold, each next to exact streaming.

Every configuration runs in a fresh subprocess (its own peak RSS; the store's expert
files dropped from the page cache and read uncached, so every miss costs a disk read)
and decodes through mlx-lm's ``BatchGenerator`` (prefill first, then timed decode
steps). All configurations of a cache size get the same memory budget: the one that
gives exact streaming that fraction of the experts at the load level.

Policies (``--policies``, names below): ``exact`` (every pair at the load level),
``fixed-floor`` (every pair at the level below: fixed-level LRU), ``hobbit`` (a miss of
an unimportant expert runs at the floor), ``smoe-A`` (SMoE substitution with alpha A,
no level mixing), ``dual`` (dual routing: importance + hotness, HEBF load order),
``dual-fifo`` (the same, loads first come first served), ``dual-stall`` (dual routing
with the profile's stall budget), ``balanced`` / ``fast`` (the presets: everything
combined). Routing: the synthetic store's own router; with ``--trace`` the id-only
policies (exact, fixed-floor) also run on a real trace's expert ids (DeepSeek-V2-Lite:
64 experts, top-6, so the default store has that geometry).

    python scripts/bench_policies.py --out docs/bench/policies-cpu.json
    python scripts/bench_policies.py --gpu --hidden 2048 --inter 1408 --out docs/bench/policies-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (quality, overrides, load order, level offset below the load level)
POLICIES = {
    "exact": ("exact", {}, "hebf", 0),
    "fixed-floor": ("exact", {}, "hebf", 1),
    "hobbit": ("balanced", dict(tau=0.5, hot=1.0, alpha=0.0, stall=None), "hebf", 0),
    "dual": ("balanced", dict(tau=0.5, hot=0.25, alpha=0.0, stall=None), "hebf", 0),
    "dual-fifo": ("balanced", dict(tau=0.5, hot=0.25, alpha=0.0, stall=None), "fifo", 0),
    "dual-stall": ("balanced", dict(alpha=0.0), "hebf", 0),
    "balanced": ("balanced", {}, "hebf", 0),
    "fast": ("fast", {}, "hebf", 0),
}
for _a in (0.1, 0.25, 0.35, 0.6):
    POLICIES[f"smoe-{_a}"] = ("balanced", dict(floor="ceiling", alpha=_a, stall=None), "hebf", 0)

CHILD = r"""
import json, sys, time
import mlx.core as mx
import numpy as np
job = json.loads(sys.argv[1])
mx.set_default_device(mx.gpu if job["gpu"] else mx.cpu)
if job["gpu"]:
    mx.set_memory_limit(job["gpu_limit_gb"] << 30)
from mlx_lm.generate import BatchGenerator
import d2moe_mlx.model as d2model
from d2moe_mlx import mwq, system
from d2moe_mlx.budget import budget_for_slots
from d2moe_mlx.engine import choose_layout, engine_of
from d2moe_mlx.layout import make_layout
from d2moe_mlx.memory import peak_rss_bytes
from d2moe_mlx.store.reader import Store

dtype, itemsize = ("bfloat16", 2) if job["gpu"] else ("float32", 4)
store = Store.open(job["store"])
spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
level = job["level"] - job["drop"]
opts = dict(context=job["prompt"] + job["tokens"] + 64, batch=job["requests"],
            prefill_step=job["prompt"] * job["requests"])
d2model._start_device()
kind = choose_layout("auto", spec, store.manifest, True)
slots = max(int(round(job["fraction"] * store.num_experts)), store.config["num_experts_per_tok"])
budget = budget_for_slots(slots, store, make_layout(kind, spec), job["level"], itemsize,
                          system.current_rss_bytes(), **opts)
for layer in store.moe_layers:
    for c in range(spec.num_levels):
        system.drop_file_cache(store.expert_file(layer, c))
overrides = dict(job["overrides"])
if overrides.get("floor") == "ceiling":
    overrides["floor"] = job["level"]
model, config = d2model.load_model(job["store"], level=level, dtype=dtype, memory_budget=budget,
                                   io_mode="nocache", quality=job["quality"],
                                   quality_options=overrides or None,
                                   load_order=job["load_order"], **opts)
engine = engine_of(model)
if job.get("trace"):
    sys.path.insert(0, job["scripts"])
    from bench_streaming import _wrap_trace
    ids = np.load(job["trace"])["topk_ids"].astype(np.int64)  # [tokens, layers, k]
    _wrap_trace(model, ids.transpose(1, 0, 2)[:len(store.moe_layers)])
rng = np.random.default_rng(0)
prompts = [rng.integers(3, config["vocab_size"], job["prompt"]).tolist() for _ in range(job["requests"])]
gen = BatchGenerator(model, max_tokens=job["tokens"], completion_batch_size=job["requests"],
                     prefill_batch_size=job["requests"], prefill_step_size=opts["prefill_step"])
gen.insert(prompts, [job["tokens"]] * job["requests"])
times, tokens, start = [], 0, None
while True:
    t0 = time.perf_counter()
    out = gen.next_generated()
    dt = time.perf_counter() - t0
    if not out:
        break
    if start is None:  # the prefill step: decode is timed from here
        start = engine.stats.snapshot()
        continue
    times.append(dt)
    tokens += len(out)
gen.close()
s = engine.stats.delta(start)
steps = len(times)
print(json.dumps(dict(
    decode_tps=tokens / sum(times), per_request_tps=steps / sum(times),
    ms_per_output_token=1e3 * sum(times) / steps, hit_rate=s.hit_rate,
    bytes_per_token=s.bytes_read / max(tokens, 1), wait_s=s.wait_seconds,
    level_mix={str(k): v for k, v in s.level_mix.items()}, substitution_rate=s.substitution_rate,
    peak_rss_mb=peak_rss_bytes() / 2**20, budget_mb=budget / 2**20, tokens=tokens)))
"""


def run_one(job: dict) -> dict:
    """One configuration in a fresh process; its measurements."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True,
                         text=True, env=env)
    if out.returncode:
        if "BudgetError" in out.stderr:  # the policy's pools do not fit exact's budget: a result
            return dict(fits=False, error=out.stderr.strip().splitlines()[-1][-400:])
        raise RuntimeError(f"{job['name']}: {out.stderr[-3000:]}")
    return dict(fits=True, **json.loads(out.stdout.strip().splitlines()[-1]))


def make_store(a) -> Path:
    """The synthetic store (made once per geometry) and its profile for the stall budget."""
    sys.path.insert(0, str(REPO / "scripts"))
    from make_synthetic_store import make_synthetic_store, parse_spec

    path = Path(a.work) / f"policies-{a.layers}x{a.experts}-k{a.top_k}-h{a.hidden}-i{a.inter}"
    if not (path / "manifest.json").exists():
        make_synthetic_store(path, layers=a.layers, hidden=a.hidden, moe_intermediate=a.inter,
                             experts=a.experts, top_k=a.top_k, spec=parse_spec("2,2,4"),
                             dense_bits=8, seed=0, overwrite=True)
    import mlx.core as mx

    from d2moe_mlx.profile import profile

    if a.gpu:
        mx.set_memory_limit(a.gpu_limit_gb << 30)
    mx.set_default_device(mx.gpu if a.gpu else mx.cpu)
    profile(path, dtype="bfloat16" if a.gpu else "float32")  # cached per store and device
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/d2moe-bench", help="where the synthetic store is made")
    p.add_argument("--layers", type=int, default=8, help="MoE layers of the synthetic model")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size")
    p.add_argument("--inter", type=int, default=512, help="intermediate size of each expert")
    p.add_argument("--experts", type=int, default=64, help="routed experts per layer")
    p.add_argument("--top-k", type=int, default=6, help="experts each token uses")
    p.add_argument("--level", type=int, default=1, help="load level (the ceiling)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--tokens", type=int, default=24, help="tokens each request decodes")
    p.add_argument("--fractions", default="0.5,0.25,0.125", help="expert cache sizes")
    p.add_argument("--requests", default="1,4,16", help="concurrent requests")
    p.add_argument("--policies", default=",".join(POLICIES), help="policies to run (see above)")
    p.add_argument("--batch-policies", default="exact,dual,balanced",
                   help="policies also run with more than one request")
    p.add_argument("--trace", default=None, help="a routing trace (npz) for the id-only policies")
    p.add_argument("--gpu", action="store_true", help="MLX's GPU backend (bfloat16)")
    p.add_argument("--gpu-limit-gb", type=int, default=48, help="mx.set_memory_limit on the GPU")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--plot", nargs="+", metavar="JSON", default=None,
                   help="only draw earlier results (JSON files written by --out) as a PNG "
                        "(needs matplotlib) and exit; where files repeat a point, the first "
                        "file's is drawn; see --plot-out")
    p.add_argument("--plot-out", default="docs/img/policies.png", help="the PNG --plot writes")
    a = p.parse_args(argv)
    if a.plot:
        print(f"wrote {plot([r for f in a.plot for r in json.loads(Path(f).read_text())['rows']], Path(a.plot_out))}")
        return
    unknown = set(a.policies.split(",")) - set(POLICIES)
    if unknown:
        p.error(f"unknown policies {sorted(unknown)}; choose from {', '.join(POLICIES)}")
    if a.trace:
        a.trace = str(Path(a.trace).resolve())
        if not Path(a.trace).is_file():
            p.error(f"--trace {a.trace}: no such file")
    store = make_store(a)
    rows = []
    for fraction in map(float, a.fractions.split(",")):
        for requests in map(int, a.requests.split(",")):
            names = a.policies.split(",") if requests == 1 else a.batch_policies.split(",")
            runs = [(n, None) for n in names]
            if a.trace and requests == 1:
                runs += [(n, a.trace) for n in ("exact", "fixed-floor") if n in names]
            for name, trace in runs:
                quality, overrides, order, drop = POLICIES[name]
                job = dict(name=name, store=str(store), level=a.level, drop=drop, quality=quality,
                           overrides=overrides, load_order=order, fraction=fraction,
                           requests=requests, prompt=a.prompt, tokens=a.tokens, gpu=a.gpu,
                           gpu_limit_gb=a.gpu_limit_gb, trace=trace, scripts=str(REPO / "scripts"))
                r = dict(policy=name, routing="trace" if trace else "own", cache_fraction=fraction,
                         requests=requests, **run_one(job))
                rows.append(r)
                if not r["fits"]:
                    print(f"{fraction:>6.3f} {requests:>3} {name:<12} {r['routing']:<5} does not fit "
                          f"the budget: {r['error']}", flush=True)
                    continue
                print(f"{fraction:>6.3f} {requests:>3} {name:<12} {r['routing']:<5} "
                      f"{r['decode_tps']:8.2f} tok/s  {r['per_request_tps']:7.2f} /req  "
                      f"hit {r['hit_rate']:.2f}  {r['bytes_per_token'] / 1e6:6.2f} MB/tok  "
                      f"mix {r['level_mix']}  subst {r['substitution_rate']:.2f}  "
                      f"rss {r['peak_rss_mb']:.0f} MB", flush=True)
    for r in rows:  # each next to exact streaming of the same cache, requests and routing
        if not r["fits"]:
            continue
        base = next((b for b in rows if b["fits"] and b["policy"] == "exact" and b["routing"] == r["routing"]
                     and b["cache_fraction"] == r["cache_fraction"]
                     and b["requests"] == r["requests"]), None)
        one = next((b for b in rows if b["fits"] and b["policy"] == r["policy"] and b["routing"] == r["routing"]
                    and b["cache_fraction"] == r["cache_fraction"] and b["requests"] == 1), None)
        r["vs_exact"] = r["decode_tps"] / base["decode_tps"] if base else None
        r["per_request_vs_one"] = r["per_request_tps"] / one["per_request_tps"] if one else None
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(args=vars(a), rows=rows), indent=1))
        print(f"wrote {a.out}")


def plot(rows: list[dict], out: Path) -> Path:
    """Decode speed over exact streaming per policy, one request, own routing, one bar
    group per cache size (left); tok/s per request against concurrent requests (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen, kept = set(), []
    for r in rows:  # the first of each (policy, cache, requests): one run per point
        key = (r["policy"], r["cache_fraction"], r["requests"])
        if r.get("fits", True) and r["routing"] == "own" and key not in seen:
            seen.add(key)
            kept.append(r)
    rows = kept
    if not rows:
        raise SystemExit("no rows with the model's own routing to plot")
    one = [r for r in rows if r["requests"] == 1]
    fractions = sorted({r["cache_fraction"] for r in one}, reverse=True)
    names = [n for n in POLICIES if any(r["policy"] == n for r in one)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(len(fractions), 1)
    for i, fraction in enumerate(fractions):
        speed = {r["policy"]: r["vs_exact"] for r in one if r["cache_fraction"] == fraction}
        xs = [j + i * width for j, n in enumerate(names) if n in speed]
        left.bar(xs, [speed[n] for n in names if n in speed], width, label=f"{fraction:.1%} cache")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set_xticks([j + width * (len(fractions) - 1) / 2 for j in range(len(names))], names,
                    rotation=30, ha="right")
    left.set_ylabel("decode tok/s over exact streaming")
    left.set_title("one request")
    left.legend()
    for name in sorted({r["policy"] for r in rows if r["requests"] > 1}):
        mine = sorted((r["requests"], r["per_request_tps"]) for r in rows if r["policy"] == name
                      and r["cache_fraction"] == 0.25)
        if len(mine) > 1:
            right.plot(*zip(*mine), marker="o", label=name)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("concurrent requests")
    right.set_ylabel("tok/s per request")
    right.set_title("25% cache")
    right.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    main()
