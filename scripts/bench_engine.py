"""Benchmark the expert engine (issue 9): streaming overhead, mixed levels, packed levels, TTFT.

Every configuration runs in a fresh subprocess (clean memory, cold page cache where
it says so) and is compared with its baseline from the same run:

1. decode tok/s of the resident engine vs streaming with every expert cached (the
   budget holds them all: runs as resident), with every expert cached but the
   scheduled path forced (one sync per layer: the cost of streaming's machinery), and
   at 50/25/12.5% caches (the synthetic model's own routing); host time per MoE layer
   call (Python: neither computing nor waiting), hit rate, bytes read per token;
2. per-pair mixed levels (half the pairs at level 0, half at level 1) vs every pair at
   level 1, both through the scheduled path;
3. a nested store at level 1 (one packed 4-bit pass) vs the same store in the planes
   layout (two 2-bit passes) vs a single-level 4-bit store of the same model;
4. time to first token of a long prompt at a 25% cache, cold, vs its bound: bytes of
   every expert at the running level / the disk's sustained read rate (measured cold,
   4 threads of 8 MiB reads over at least --disk-gb) + resident prefill time.

    python scripts/bench_engine.py --out docs/bench/engine-cpu.json
    python scripts/bench_engine.py --gpu --layers 6 --hidden 2048 --inter 768 --experts 128 \\
        --prompt 2048 --out docs/bench/engine-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
import mlx.core as mx
import numpy as np
job = json.loads(sys.argv[1])
mx.set_default_device(mx.gpu if job["gpu"] else mx.cpu)
if job["gpu"]:
    mx.set_memory_limit(job["gpu_limit_gb"] << 30)
from mlx_lm.models.cache import make_prompt_cache
import d2moe_mlx.model as d2model
from d2moe_mlx import mwq, system
from d2moe_mlx.budget import budget_for_slots
from d2moe_mlx.engine import choose_layout, engine_of
from d2moe_mlx.layout import make_layout
from d2moe_mlx.levels import PerPair
from d2moe_mlx.memory import peak_rss_bytes
from d2moe_mlx.store.reader import Store

dtype = "bfloat16" if job["gpu"] else "float32"
itemsize = 2 if job["gpu"] else 4


def load(cfg):
    store = Store.open(cfg["store"])
    spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
    if cfg.get("cold"):
        for layer in store.moe_layers:
            for c in range(spec.num_levels):
                system.drop_file_cache(store.expert_file(layer, c))
    kw = dict(level=cfg["level"], dtype=dtype, layout=cfg.get("layout", "auto"))
    opts = dict(context=job["prompt"] + job["rounds"] * job["block"] + 64)
    if cfg.get("fraction") is not None:
        d2model._start_device()
        kind = choose_layout(kw["layout"], spec, store.manifest, True)
        slots = max(int(round(cfg["fraction"] * store.num_experts)), store.config["num_experts_per_tok"])
        budget = budget_for_slots(slots, store, make_layout(kind, spec), cfg["level"], itemsize,
                                  system.current_rss_bytes(), **opts)
        kw.update(memory_budget=budget, io_mode="nocache" if cfg.get("cold") else "random", **opts)
    model, config = d2model.load_model(cfg["store"], **kw)
    engine = engine_of(model)
    if cfg.get("scheduled"):
        engine.scheduler.fast_path = False
    if cfg.get("mixed") is not None:
        k = config["num_experts_per_tok"]
        pattern = np.array([cfg["mixed"][j % len(cfg["mixed"])] for j in range(k)])
        engine.set_policy(PerPair(lambda layer, ids, scores: np.broadcast_to(pattern, ids.shape),
                                  tuple(sorted(set(cfg["mixed"])))))
    return model, config, engine


# Every configuration decodes from the same prompt; blocks of tokens alternate between
# them, so a drift of the machine's speed hits all alike.
def warm_kernels(cfg):
    # Run the prompt once through a resident model of the store and free it: kernels
    # compiled on first use (MLX's CUDA backend JIT-compiles them) are not timed.
    model, config = d2model.load_model(cfg["store"], level=cfg["level"], dtype=dtype)
    prompt = mx.array(np.random.default_rng(0).integers(3, config["vocab_size"], job["prompt"]))[None]
    mx.eval(model(prompt, cache=make_prompt_cache(model)))
    del model
    import gc
    gc.collect()
    mx.clear_cache()


runs = []
for cfg in job["configs"]:
    if cfg.get("warm"):
        warm_kernels(cfg)
    model, config, engine = load(cfg)
    prompt = mx.array(np.random.default_rng(0).integers(3, config["vocab_size"], job["prompt"]))[None]
    cache = make_prompt_cache(model)
    t0 = time.perf_counter()
    y = model(prompt, cache=cache)[0, -1].argmax()
    mx.eval(y)
    runs.append(dict(cfg=cfg, model=model, engine=engine, cache=cache, y=y, ttft=time.perf_counter() - t0,
                     times=[], start=engine.stats.snapshot()))
for r in range(job["rounds"]):
    for run in runs:
        for i in range(job["block"]):
            t0 = time.perf_counter()
            run["y"] = run["model"](run["y"].reshape(1, 1), cache=run["cache"])[0, -1].argmax()
            mx.eval(run["y"])
            if r > 0:  # the first round warms caches and kernels
                run["times"].append(time.perf_counter() - t0)
out = []
for run in runs:
    d = run["engine"].stats.delta(run["start"])
    t = float(np.median(run["times"])) if run["times"] else float("nan")
    pct = (lambda q: 1e3 * float(np.percentile(run["times"], q))) if run["times"] else (lambda q: None)
    out.append(dict(name=run["cfg"]["name"], ttft_s=run["ttft"], decode_ms=1e3 * t, decode_tps=1 / t,
                    p10_ms=pct(10), p90_ms=pct(90),
                    host_ms_per_call=1e3 * d.host_seconds / max(d.calls, 1),
                    syncs_per_token=d.syncs / max(d.tokens, 1), hit_rate=d.hit_rate,
                    bytes_per_token=d.bytes_read / max(d.tokens, 1), layers=len(run["engine"].layers),
                    layout=run["engine"].layout.kind,
                    plan=run["engine"].plan.describe() if run["engine"].plan is not None else None))
print(json.dumps(dict(results=out, peak_rss=peak_rss_bytes())))
"""


BEFORE = r"""
import sys
sys.path.insert(0, sys.argv[2])
import d2moe_mlx
d2moe_mlx.__path__.append(sys.argv[2])  # the checkout's convert/ as d2moe_mlx.convert
import json, time
import mlx.core as mx
import numpy as np
job = json.loads(sys.argv[1])
mx.set_default_device(mx.gpu if job["gpu"] else mx.cpu)
if job["gpu"]:
    mx.set_memory_limit(job["gpu_limit_gb"] << 30)
from mlx_lm.models.cache import make_prompt_cache
import d2moe_mlx.model as d2model
from d2moe_mlx.budget import plan_budget
from d2moe_mlx.store.reader import Store
from d2moe_mlx.system import current_rss_bytes


def budget(path, fraction, level):
    with Store.open(path) as s:  # that version's plan_budget(total, store, config, level, ...)
        p = plan_budget(1 << 50, s, s.config, level, 4, current_rss_bytes(), context=200,
                        prefill_step=64)
        slots = max(int(fraction * s.num_experts), s.config["num_experts_per_tok"])
    one = p.layers * sum(p.slot_bytes.values())
    return p.total - p.cache + (slots + 1) * one + one // 2


runs = []
for cfg in job["configs"]:
    kw = dict(level=cfg["level"], dtype="bfloat16" if job["gpu"] else "float32")
    if cfg.get("fraction"):
        kw.update(memory_budget=budget(cfg["store"], cfg["fraction"], cfg["level"]), context=200,
                  prefill_step=64)
    model, config = d2model.load_model(cfg["store"], **kw)
    cache = make_prompt_cache(model)
    y = model(mx.array(np.random.default_rng(0).integers(3, config["vocab_size"], 16))[None],
              cache=cache)[0, -1].argmax()
    mx.eval(y)
    runs.append(dict(name=cfg["name"], model=model, cache=cache, y=y, times=[]))
for r in range(job["rounds"]):
    for run in runs:
        for i in range(job["block"]):
            t0 = time.perf_counter()
            run["y"] = run["model"](run["y"].reshape(1, 1), cache=run["cache"])[0, -1].argmax()
            mx.eval(run["y"])
            if r:
                run["times"].append(time.perf_counter() - t0)
print(json.dumps([dict(name=run["name"], decode_ms=1e3 * float(np.median(run["times"])),
                       decode_tps=1 / float(np.median(run["times"]))) for run in runs]))
"""


def run_before(checkout: str, job: dict) -> list[dict]:
    """The same side-by-side decode loop against an older checkout of this project
    (e.g. ``git worktree add /tmp/before 7fb3d02``), on the same device."""
    out = subprocess.run([sys.executable, "-c", BEFORE, json.dumps(job), checkout],
                         capture_output=True, text=True, cwd="/")
    if out.returncode:
        raise RuntimeError(f"before ({checkout}): {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(job: dict) -> list[dict]:
    """One process running ``job``'s configurations side by side; their results."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
    if out.returncode:
        raise RuntimeError(f"{job}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["results"]


def disk_rate(files: list[Path], min_bytes: int, threads: int = 4, chunk: int = 8 << 20) -> float:
    """Sustained cold read rate (bytes/s): the files read cold, in ``chunk`` reads on
    ``threads`` threads, again and again until at least ``min_bytes`` were read."""
    from concurrent.futures import ThreadPoolExecutor

    from d2moe_mlx.system import drop_file_cache

    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, chunk)]
    total, seconds = 0, 0.0
    while total < min_bytes:
        for f in files:
            drop_file_cache(f)

        def read(job):
            f, off = job
            with open(f, "rb", buffering=0) as fh:
                return len(os.pread(fh.fileno(), chunk, off))

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total += sum(pool.map(read, jobs))
        seconds += time.perf_counter() - start
    return total / seconds


def make_stores(args) -> dict[str, Path]:
    """The nested synthetic store and a single-level 4-bit store of the same model."""
    sys.path.insert(0, str(REPO / "scripts"))
    from make_synthetic_store import make_synthetic_store, parse_spec

    geometry = dict(layers=args.layers, hidden=args.hidden, moe_intermediate=args.inter,
                    experts=args.experts, top_k=args.top_k)
    stores = {}
    for name, spec in (("nested", "2,2,4"), ("single4", "4")):
        path = Path(args.work) / f"{name}-{args.layers}x{args.experts}x{args.hidden}"
        if not path.exists():
            make_synthetic_store(path, spec=parse_spec(spec), **geometry)
        stores[name] = path
    return stores


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/d2moe-bench", help="where the synthetic stores are made")
    p.add_argument("--layers", type=int, default=4, help="MoE layers of the synthetic model")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the synthetic model")
    p.add_argument("--inter", type=int, default=512, help="intermediate size of each expert")
    p.add_argument("--experts", type=int, default=64, help="routed experts per layer")
    p.add_argument("--top-k", type=int, default=8, help="experts each token uses")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (TTFT)")
    p.add_argument("--rounds", type=int, default=8, help="rounds of decode blocks (the first warms up)")
    p.add_argument("--block", type=int, default=4, help="tokens each configuration decodes per round")
    p.add_argument("--disk-gb", type=float, default=2.0, help="cold bytes read for the disk rate")
    p.add_argument("--gpu", action="store_true", help="MLX's GPU backend (bfloat16)")
    p.add_argument("--before", default=None, metavar="CHECKOUT",
                   help="also run sections 1 and 3's decode loop against an older checkout "
                        "on the same device, e.g. one of commit 7fb3d02, the code before the engine")
    p.add_argument("--gpu-limit-gb", type=int, default=48, help="mx.set_memory_limit on the GPU")
    p.add_argument("--only", default="1,2,3,4", help="sections to run, e.g. 1,3")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    a = p.parse_args(argv)
    stores = make_stores(a)
    base = dict(gpu=a.gpu, gpu_limit_gb=a.gpu_limit_gb, prompt=16, rounds=a.rounds, block=a.block)
    results: dict[str, dict] = {}

    def side_by_side(title, configs, **job):
        print(f"== {title}")
        for r in run({**base, **job, "configs": configs}):
            results[r["name"]] = r
            print(f"{r['name']:36s} {r['decode_tps']:8.2f} tok/s (p10-p90 {1e3 / r['p90_ms']:.2f}-"
                  f"{1e3 / r['p10_ms']:.2f})  host {r['host_ms_per_call']:.3f} ms/call  syncs/token "
                  f"{r['syncs_per_token']:.1f}  hit {r['hit_rate']:.2f}  read "
                  f"{r['bytes_per_token'] / 1e6:.1f} MB/token  ttft {r['ttft_s']:.2f} s", flush=True)

    nested, single4 = str(stores["nested"]), str(stores["single4"])
    only = set(a.only.split(","))
    summary = {}
    r = results
    if "1" in only:
        side_by_side("1. decode: resident vs streaming (one process, alternating)", [
            dict(name="resident", store=nested, level=1),
            dict(name="stream 100% (held: resident-like)", store=nested, level=1, fraction=1.0),
            dict(name="stream 100%, scheduled path", store=nested, level=1, fraction=1.0, scheduled=True),
            *[dict(name=f"stream {f:.1%}", store=nested, level=1, fraction=f) for f in (0.5, 0.25, 0.125)]])
        res, sched = r["resident"], r["stream 100%, scheduled path"]
        summary.update(
            stream_100_vs_resident=r["stream 100% (held: resident-like)"]["decode_tps"] / res["decode_tps"],
            scheduled_100_vs_resident=sched["decode_tps"] / res["decode_tps"],
            overhead_ms_per_layer=(sched["decode_ms"] - res["decode_ms"]) / res["layers"],
            host_ms_per_layer_scheduled=sched["host_ms_per_call"])
    if "2" in only:
        side_by_side("2. mixed per-pair levels (scheduled path, resident)", [
            dict(name="all pairs level 1", store=nested, level=1, mixed=[1]),
            dict(name="half level 0, half level 1", store=nested, level=1, mixed=[0, 1])])
        summary["mixed_vs_level1_time"] = (r["half level 0, half level 1"]["decode_ms"]
                                           / r["all pairs level 1"]["decode_ms"])
    if "3" in only:
        side_by_side("3. packed levels vs passes vs a single-level store (resident)", [
            dict(name="nested store level 1, levels layout", store=nested, level=1),
            dict(name="nested store level 1, planes layout", store=nested, level=1, layout="planes"),
            dict(name="single-level 4-bit store", store=single4, level=0)])
        s4 = r["single-level 4-bit store"]["decode_tps"]
        summary.update(levels_vs_single4=r["nested store level 1, levels layout"]["decode_tps"] / s4,
                       planes_vs_single4=r["nested store level 1, planes layout"]["decode_tps"] / s4)
    if "4" in only:
        summary.update(ttft(a, nested, results))
    if a.before:
        print(f"== before: {a.before} (one process, alternating)")
        before = run_before(a.before, {**base, "configs": [
            dict(name="resident", store=nested, level=1),
            dict(name="stream 100%", store=nested, level=1, fraction=1.0),
            dict(name="stream 25%", store=nested, level=1, fraction=0.25),
            dict(name="single-level 4-bit store", store=single4, level=0)]})
        for b in before:
            print(f"{b['name']:36s} {b['decode_tps']:8.2f} tok/s")
        results["before"] = {b["name"]: b for b in before}
        bb = results["before"]
        summary.update(before_stream_100_vs_resident=bb["stream 100%"]["decode_tps"] / bb["resident"]["decode_tps"],
                       before_level1_vs_single4=bb["resident"]["decode_tps"] / bb["single-level 4-bit store"]["decode_tps"],
                       before_overhead_ms_per_layer=(bb["stream 100%"]["decode_ms"] - bb["resident"]["decode_ms"])
                       / results["resident"]["layers"] if "resident" in results else None)
    results["summary"] = summary
    print(json.dumps(summary, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))


def ttft(a, nested: str, results: dict) -> dict:
    """Section 4: time to first token at a 25% cache, cold, against its bound (each in a
    process of its own: the streaming one starts with the page cache dropped)."""
    print("== 4. time to first token, 25% cache, cold")
    from d2moe_mlx.store.reader import Store

    with Store.open(nested) as s:
        files = [s.expert_file(layer, c) for layer in s.moe_layers for c in range(2)]
        level_bytes = sum(s.block_stride(layer, c) * s.num_experts for layer in s.moe_layers
                          for c in range(2))
    rate = disk_rate(files, int(a.disk_gb * 1e9))
    job = dict(gpu=a.gpu, gpu_limit_gb=a.gpu_limit_gb, prompt=a.prompt, rounds=0, block=0)
    # Both warm their kernels first (a resident pass of the same prompt, freed): only the
    # cold run's expert reads are cold, not the first-use compilation of kernels.
    warm = run({**job, "configs": [dict(name="resident prefill", store=nested, level=1,
                                        warm=True)]})[0]
    cold = run({**job, "configs": [dict(name="stream 25% prefill, cold", store=nested, level=1,
                                        fraction=0.25, cold=True, warm=True)]})[0]
    results.update({warm["name"]: warm, cold["name"]: cold})
    bound = level_bytes / rate + warm["ttft_s"]
    results["ttft"] = dict(disk_gbps=rate / 1e9, level_bytes=level_bytes, bound_s=bound,
                           ttft_s=cold["ttft_s"], ratio=cold["ttft_s"] / bound)
    print(f"disk {rate / 1e9:.2f} GB/s cold; experts at level 1: {level_bytes / 1e9:.2f} GB; "
          f"TTFT {cold['ttft_s']:.2f} s vs bound {bound:.2f} s = {cold['ttft_s'] / bound:.2f}x")
    return {"ttft_vs_bound": cold["ttft_s"] / bound}


if __name__ == "__main__":
    main()
