"""Streaming benchmark: experts from SSD under a memory budget, against its baselines, in one run.

For each store and routing regime, every configuration runs in a fresh
subprocess (so peak RSS is that configuration's own) over the same prompt:

* ``mlx-lm``: fully resident mlx-lm with the same bits (each expert's MWQ level
  dequantized and re-quantized with ``mx.quantize``): the upper bound;
* ``resident``: d2moe with every expert in memory at the same level;
* per budget (fraction of the expert bytes at that level): ``stream`` (overlap,
  LRU), ``stream+prefetch``, ``lru-sync`` (LRU cache at one fixed level, loads
  waited for: mixtral-offloading style) and ``naive`` (no cache: every needed
  expert read each layer call, nothing overlaps); at 25% also the ``lfu`` and
  ``score`` (SMoE) policies.

``cold`` drops the store's page cache first and reads with ``io_mode=nocache``
(every miss is a disk read: the model does not fit in RAM); ``warm`` reads the
store into the page cache first. Routing regimes: ``own`` (the model's router)
and ``trace`` (expert ids replayed from a trace the bundled trained model
recorded on held-out text, mapped onto the store's geometry by ``map_trace``).

Usage:
  python scripts/bench_streaming.py --synthetic /tmp/synth --tiny /tmp/tiny-store \\
      --json bench.json --plots docs/img [--device gpu] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

TINY_ASSET = REPO / "d2moe_mlx" / "assets" / "tiny-moe"
TEXT = REPO / "d2moe_mlx" / "assets" / "calib.txt"
BUDGETS = (1.0, 0.5, 0.25, 0.125)


# -- inputs --------------------------------------------------------------------
def budget_for_slots(slots: int, store, level: int, act_itemsize: int, baseline: int,
                     layout: str = "auto", **options) -> int:
    """A budget whose plan gives ``slots`` expert slots per layer (d2moe_mlx.budget's
    inverse of plan_budget, for the store's ``layout``)."""
    from d2moe_mlx import budget, mwq
    from d2moe_mlx.engine import choose_layout
    from d2moe_mlx.layout import make_layout

    spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
    lay = make_layout(choose_layout(layout, spec, store.manifest, True), spec)
    return budget.budget_for_slots(slots, store, lay, level, act_itemsize, baseline, **options)


def prompt_ids(n: int, offset: int = 0) -> list[int]:
    """``n`` token ids of held-out text (the bundled tokenizer; synthetic stores share it)."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(TINY_ASSET)
    ids = tok.encode(TEXT.read_text())
    return ids[offset:offset + n]


def record_tiny_trace(tiny_store: Path, n: int) -> np.ndarray:
    """Expert ids [layers, n, k] the trained tiny model picks on held-out text."""
    import mlx.core as mx

    from d2moe_mlx.model import load_model
    from d2moe_mlx.trace import record_trace

    mx.set_default_device(mx.cpu)
    model, _ = load_model(tiny_store, dtype="float32")

    class Ids:
        @staticmethod
        def encode(_):
            return prompt_ids(n, offset=20000)

    return record_trace(model, Ids(), "")["ids"].astype(np.int64)


def map_trace(ids: np.ndarray, layers: int, experts: int, k: int) -> np.ndarray:
    """Map a [L, T, k0] trace of an E0-expert model onto ``layers`` x ``experts``/top-``k``.

    Synthetic layer l combines tiny layers a = l % L and b = (l + 1) % L: pick i of
    a's top-k0 becomes expert e_a + E0 * (e_b mod r) and pick i of b becomes
    e_b + E0 * ((e_a + 1) mod r), r = experts / E0, so popularity and token-to-token
    reuse of the trained model carry over; collisions move to the next copy."""
    L, T, k0 = ids.shape
    e0 = int(ids.max()) + 1
    r = max(experts // e0, 1)
    out = np.zeros((layers, T, k), dtype=np.int64)
    for li in range(layers):
        a, b = ids[li % L], ids[(li + 1) % L]
        for t in range(T):
            picks: list[int] = []
            cands = [(x, y) for x, y in zip(a[t], b[t])] + [(y, x + 1) for x, y in zip(a[t], b[t])]
            for base, sel in cands:
                e = int(base + e0 * (sel % r)) % experts
                while e in picks:
                    e = (e + e0) % experts
                picks.append(e)
                if len(picks) == k:
                    break
            out[li, t, :len(picks)] = picks
    return out


# -- one configuration (runs in a subprocess) ----------------------------------------
def _wrap_trace(model, trace: np.ndarray) -> None:
    """Make every MoE block dispatch the trace's expert ids at the current positions."""
    import mlx.core as mx
    import mlx.nn as nn

    from d2moe_mlx.families import family_of
    from d2moe_mlx.hooks import replace_experts

    state = {"start": 0, "next": 0}
    family = family_of(model)
    blocks = family.blocks(model)
    first = blocks[0][0]

    class TraceSwitch(nn.Module):
        def __init__(self, inner, row):
            super().__init__()
            self.inner = inner
            self._row = row

        def __call__(self, x, indices):
            n = int(np.prod(indices.shape[:-1]))
            if self._row == first:
                state["start"], state["next"] = state["next"], state["next"] + n
            s = state["start"]
            ids = trace[self._row % trace.shape[0], s:s + n] if s + n <= trace.shape[1] else None
            if ids is None:
                raise RuntimeError("trace shorter than the benchmark's tokens")
            return self.inner(x, mx.array(ids.astype(np.uint32)).reshape(indices.shape))

    replace_experts(blocks, family, lambda li, block, experts: TraceSwitch(experts, li))


def _mlx_lm_resident(store: str, level: int, dtype: str):
    """mlx-lm QuantizedSwitchLinear experts with the bits of MWQ level ``level``: our
    resident model's level-``level`` weights, dequantized and quantized again by MLX."""
    import mlx.core as mx
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

    from d2moe_mlx.engine import engine_of
    from d2moe_mlx.families import family_of
    from d2moe_mlx.hooks import replace_experts
    from d2moe_mlx.model import load_model

    model, _ = load_model(store, level=level, dtype=dtype)
    engine = engine_of(model)
    bits = engine.spec.level_bits(level)
    gs = engine.spec.group_size
    parts = engine.layout.cover(level)

    def rebuild(layer, block, el):
        pools = [el.cache.pools[p] for p in parts]
        experts = engine.store.num_experts
        w0 = pools[0].compute["up_proj.weight"]
        glu = SwitchGLU(w0.shape[-1] * 32 // pools[0].bits, w0.shape[1], experts)
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = None
            for pool in pools:
                weight, scales, biases = pool.arrays(name)
                d = mx.dequantize(weight[:experts], scales[:experts], biases[:experts],
                                  group_size=gs, bits=pool.bits)
                w = d if w is None else w + d
            q = QuantizedSwitchLinear(w.shape[-1], w.shape[-2], experts, bias=False, group_size=gs,
                                      bits=bits)
            q.weight, q.scales, q.biases = mx.quantize(w, group_size=gs, bits=bits)
            mx.eval(q.parameters())
            setattr(glu, name, q)
        return glu

    replace_experts(family_of(model).blocks(model), family_of(model), rebuild)
    engine.close()
    return model


def worker(cfg: dict) -> dict:
    """Load one configuration, prefill the prompt, decode greedily; return measurements."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from d2moe_mlx import system
    from d2moe_mlx.memory import peak_rss_bytes
    from d2moe_mlx.model import _start_device, load_model
    from d2moe_mlx.store.reader import Store
    from d2moe_mlx.engine import streaming_of

    gpu = cfg["device"] == "gpu"
    mx.set_default_device(mx.gpu if gpu else mx.cpu)
    if gpu:
        mx.set_memory_limit(40 << 30)
    dtype = "bfloat16" if gpu else "float32"
    store = Store.open(cfg["store"])
    files = [store.expert_file(layer, c) for layer in store.moe_layers
             for c in range(cfg["level"] + 1)]
    if cfg["temp"] == "cold":
        for f in files:
            system.drop_file_cache(f)
    else:
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    t0 = time.perf_counter()
    budget = None
    if cfg["kind"] == "mlx-lm":
        model = _mlx_lm_resident(cfg["store"], cfg["level"], dtype)
    elif cfg["kind"] == "resident":
        model, _ = load_model(cfg["store"], level=cfg["level"], dtype=dtype)
    else:
        slots = max(int(round(cfg["fraction"] * store.num_experts)), int(store.config.get("num_experts_per_tok", 1)))
        opts = dict(context=cfg["context"], prefill_step=cfg["prefill_step"])
        itemsize = 2 if gpu else 4
        _start_device()  # as load_model does before it measures the baseline
        budget = budget_for_slots(slots, store, cfg["level"], itemsize, system.current_rss_bytes(),
                                  **opts)
        model, _ = load_model(cfg["store"], level=cfg["level"], dtype=dtype, memory_budget=budget,
                              cache_policy=cfg["policy"], prefetch=cfg["prefetch"], mode=cfg["mode"],
                              io_mode="nocache" if cfg["temp"] == "cold" else "random", **opts)
    load_s = time.perf_counter() - t0
    if cfg.get("trace"):
        _wrap_trace(model, np.load(cfg["trace"]))
    streaming = streaming_of(model)
    prompt = mx.array(cfg["prompt"])[None]
    cache = make_prompt_cache(model)
    t0 = time.perf_counter()
    logits = model(prompt, cache=cache)
    y = logits[0, -1].argmax()
    mx.eval(y)
    prefill_s = time.perf_counter() - t0
    before = streaming.stats.snapshot() if streaming else None
    out, times = [int(y)], []
    for _ in range(cfg["decode"]):
        t0 = time.perf_counter()
        y = model(y.reshape(1, 1), cache=cache)[0, -1].argmax()
        mx.eval(y)
        times.append(time.perf_counter() - t0)
        out.append(int(y))
    res = {"load_s": load_s, "prefill_tps": len(cfg["prompt"]) / prefill_s,
           "decode_s_per_token": float(np.mean(times[1:] if len(times) > 2 else times)),
           "tokens": out, "peak_rss": peak_rss_bytes(), "mlx_peak": mx.get_peak_memory(),
           "budget": budget}
    res["decode_tps"] = 1 / res["decode_s_per_token"]
    if streaming:
        d = streaming.stats.delta(before)
        res.update(hit_rate=d.hit_rate, bytes_per_token=d.bytes_read / max(d.tokens, 1),
                   wait_s_per_token=d.wait_seconds / max(d.tokens, 1),
                   prefetch_accuracy=d.prefetch_accuracy if cfg["prefetch"] else None,
                   slots=streaming.plan.slots[0], budget_plan=streaming.plan.describe())
    return res


# -- the disk ------------------------------------------------------------------------------
def disk_gbps(store_path: str, level: int, threads: int, cold: bool, reads: int = 192) -> float:
    """GB/s of random expert-block reads from the store with ``threads`` readers."""
    from concurrent.futures import ThreadPoolExecutor

    from d2moe_mlx import system
    from d2moe_mlx.store.reader import Store

    store = Store.open(store_path)
    store.io_mode = "nocache" if cold else "random"
    rng = np.random.default_rng(0)
    keys = [(int(rng.choice(store.moe_layers)), int(rng.integers(level + 1)),
             int(rng.integers(store.num_experts))) for _ in range(reads)]
    if cold:
        for layer in store.moe_layers:
            for c in range(level + 1):
                system.drop_file_cache(store.expert_file(layer, c))
    local = threading.local()

    def one(key):
        size = max(store.block_bytes(key[0], c) for c in range(level + 1))
        if getattr(local, "buf", None) is None:
            local.buf = np.empty(size, np.uint8)
        buf = local.buf[:store.block_bytes(key[0], key[1])]
        store.read_block_into(*key, buf, verify=False)
        return buf.nbytes

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(one, keys))
    return total / (time.perf_counter() - t0) / 1e9


# -- orchestration ----------------------------------------------------------------------------
def run_config(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configs(store: str, args, regime: str, trace: str | None, prompt: list[int]) -> list[dict]:
    base = dict(store=store, level=args.level, device=args.device, decode=args.decode,
                prompt=prompt, trace=trace, regime=regime, context=512, prefill_step=128,
                policy="lru", prefetch=False, mode="stream", fraction=None)
    out = [dict(base, kind="mlx-lm", name="mlx-lm resident", temp="warm"),
           dict(base, kind="resident", name="d2moe resident", temp="warm"),
           dict(base, kind="resident", name="d2moe resident (repeat)", temp="warm")]
    for temp in args.temps:
        for f in args.budgets:
            for name, extra in (("stream", {}), ("stream+prefetch", {"prefetch": True}),
                                ("lru-sync", {"mode": "sync"}), ("naive", {"mode": "naive"})):
                out.append(dict(base, kind="stream", name=name, temp=temp, fraction=f, **extra))
            if f == 0.25 and not args.quick:
                for pol in ("lfu", "score"):
                    out.append(dict(base, kind="stream", name=f"stream {pol}", temp=temp, fraction=f,
                                    policy=pol))
    return [c for c in out if c["name"] not in args.skip]


def summarize(rows: list[dict], disk: dict) -> None:
    """Ratios to the baselines of the same regime and budget, and the roofline."""
    for r in rows:
        if "error" in r:
            continue
        same = [x for x in rows if x["regime"] == r["regime"] and x["store"] == r["store"] and "error" not in x]
        ref = {x["name"]: x for x in same if x["kind"] != "stream"}
        if "d2moe resident (repeat)" in ref and "d2moe resident" in ref:
            ref["d2moe resident (repeat)"]["identical_to_resident"] = \
                ref["d2moe resident (repeat)"]["tokens"] == ref["d2moe resident"]["tokens"]
        peers = {x["name"]: x for x in same if x["kind"] == "stream" and x["fraction"] == r["fraction"]
                 and x["temp"] == r["temp"]}
        tps = r["decode_tps"]
        if "mlx-lm resident" in ref:
            r["vs_mlx_lm"] = tps / ref["mlx-lm resident"]["decode_tps"]
        if "d2moe resident" in ref:
            r["identical_to_resident"] = r["tokens"] == ref["d2moe resident"]["tokens"]
            if r["kind"] == "stream":
                gbps = disk[(r["store"], r["temp"])]
                roof = max(ref["d2moe resident"]["decode_s_per_token"], r["bytes_per_token"] / (gbps * 1e9))
                r["roofline_s_per_token"] = roof
                r["vs_roofline"] = roof / r["decode_s_per_token"]
                r["read_gbps"] = r["bytes_per_token"] / r["decode_s_per_token"] / 1e9
                r["disk_gbps"] = gbps
        for base in ("naive", "lru-sync"):
            if r["kind"] == "stream" and base in peers:
                r[f"vs_{base}"] = tps / peers[base]["decode_tps"]


def table(rows: list[dict]) -> str:
    head = ("| store | regime | cache | config | decode tok/s | s/token | prefill tok/s | x mlx-lm | "
            "x naive | x lru-sync | hit | MB/token | read GB/s (disk) | x roofline | peak RSS / budget | exact |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {Path(r['store']).name} | {r['regime']} | {r['temp']} | {r['name']} | "
                         f"error: {r['error']} |")
            continue
        frac = f"{100 * r['fraction']:g}% {r['temp']}" if r["fraction"] else "all"
        f = lambda k, fmt: (fmt % r[k]) if r.get(k) is not None else "-"  # noqa: E731
        rss = f"{r['peak_rss'] / 2**30:.2f} / {r['budget'] / 2**30:.2f} GiB" if r.get("budget") else \
            f"{r['peak_rss'] / 2**30:.2f} GiB"
        gb = f"{r['read_gbps']:.2f} ({r['disk_gbps']:.2f})" if r.get("read_gbps") is not None else "-"
        lines.append(
            f"| {Path(r['store']).name} | {r['regime']} | {frac} | {r['name']} | {r['decode_tps']:.2f} | "
            f"{r['decode_s_per_token']:.3f} | {r['prefill_tps']:.1f} | {f('vs_mlx_lm', '%.2f')} | "
            f"{f('vs_naive', '%.2f')} | {f('vs_lru-sync', '%.2f')} | {f('hit_rate', '%.2f')} | "
            f"{(r.get('bytes_per_token') or 0) / 1e6:.1f} | {gb} | {f('vs_roofline', '%.2f')} | {rss} | "
            f"{_exact(r)} |")
    return "\n".join(lines)


def _exact(r: dict) -> str:
    if r["kind"] == "mlx-lm" or "identical_to_resident" not in r:
        return "n/a"
    return "yes" if r["identical_to_resident"] else "NO"


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """decode tok/s against the cache fraction per configuration (one PNG per store x regime x temp)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    groups = sorted({(Path(r["store"]).name, r["regime"], r["temp"]) for r in rows if r.get("fraction")})
    for store, regime, temp in groups:
        fig, ax = plt.subplots(figsize=(6, 4))
        sel = [r for r in rows if Path(r["store"]).name == store and r["regime"] == regime and "error" not in r]
        for name in sorted({r["name"] for r in sel if r.get("fraction") and r["temp"] == temp}):
            pts = sorted((r["fraction"], r["decode_tps"]) for r in sel if r["name"] == name and r["temp"] == temp)
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for r in sel:
            if not r.get("fraction"):
                ax.axhline(r["decode_tps"], linestyle="--", color="gray" if r["kind"] == "resident" else "black",
                           label=r["name"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([12.5, 25, 50, 100], ["12.5", "25", "50", "100"])
        ax.set_xlabel("expert cache, % of expert bytes")
        ax.set_ylabel("decode tokens/s")
        device = sel[0]["device"] if sel else "cpu"
        ax.set_title(f"{store}, {regime} routing, {temp} ({device})")
        ax.legend(fontsize=7)
        path = out_dir / f"bench_{device}_{store}_{regime}_{temp}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--synthetic", help="synthetic store (made with make_synthetic_store if missing)")
    p.add_argument("--synthetic-layers", type=int, default=6)
    p.add_argument("--tiny", help="store of the bundled trained model (converted if missing)")
    p.add_argument("--level", type=int, default=1)
    p.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=list(BUDGETS))
    p.add_argument("--temps", type=lambda s: s.split(","), default=["cold", "warm"])
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--decode", type=int, default=12, help="decoded tokens")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=int, default=4, help="loader threads (disk speed measured with as many)")
    p.add_argument("--quick", action="store_true", help="skip the lfu/score policy runs")
    p.add_argument("--regimes", type=lambda s: s.split(","), default=["own", "trace"])
    p.add_argument("--tiny-trace-only", action="store_true",
                   help="use the tiny store only to record the trace, do not benchmark it")
    p.add_argument("--skip", type=lambda s: s.split(","), default=[],
                   help="configuration names to leave out, e.g. 'mlx-lm resident'")
    p.add_argument("--merge", type=Path, nargs="+", help="merge JSON results of earlier runs")
    p.add_argument("--json", type=Path, default=Path("bench_streaming.json"))
    p.add_argument("--plots", type=Path, default=None)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.merge:
        return merge(args)
    stores = []
    prompt = prompt_ids(args.prompt)
    if args.tiny:
        if not Path(args.tiny).exists():
            from d2moe_mlx.convert.convert import convert
            convert(TINY_ASSET, args.tiny)
        if not args.tiny_trace_only and "own" in args.regimes:
            stores.append((args.tiny, "own", None))
    if args.synthetic:
        if not Path(args.synthetic).exists():
            from make_synthetic_store import make_synthetic_store
            make_synthetic_store(args.synthetic, layers=args.synthetic_layers)
        if "own" in args.regimes:
            stores.append((args.synthetic, "own", None))
        if args.tiny and "trace" in args.regimes:
            from d2moe_mlx.store.reader import Store
            s = Store.open(args.synthetic)
            trace = map_trace(record_tiny_trace(Path(args.tiny), args.prompt + args.decode + 8),
                              len(s.moe_layers), s.num_experts, int(s.config["num_experts_per_tok"]))
            tpath = args.json.with_suffix(".trace.npy")
            np.save(tpath, trace)
            stores.append((args.synthetic, "trace", str(tpath)))
    disk = {}
    for store, _, _ in stores:
        for temp in args.temps:
            if (store, temp) not in disk:
                disk[(store, temp)] = disk_gbps(store, args.level, args.threads, temp == "cold")
    meta = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
            "device": args.device, "argv": sys.argv[1:],
            "disk_gbps": [[s, t, v] for (s, t), v in disk.items()]}
    rows = []
    for store, regime, trace in stores:
        for cfg in configs(store, args, regime, trace, prompt):
            t0 = time.perf_counter()
            res = run_config(cfg)
            row = {k: v for k, v in cfg.items() if k != "prompt"} | res
            rows.append(row)
            print(f"{Path(store).name} {regime} {cfg['temp']} {cfg['name']} {cfg['fraction']}: "
                  f"{res.get('decode_tps', res.get('error'))} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # partial
    report(rows, disk, meta, args)


def report(rows: list[dict], disk: dict, meta, args) -> None:
    """Ratios and roofline into the rows; JSON, markdown table on stdout, PNG plots."""
    summarize(rows, disk)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))
    if args.plots:
        for path in plot(rows, args.plots):
            print(f"wrote {path}", file=sys.stderr)


def merge(args) -> None:
    """Join the rows of several result files (e.g. one per regime) into one table."""
    rows, disk, metas = [], {}, []
    for path in args.merge:
        data = json.loads(Path(path).read_text())
        rows += data["rows"]
        metas.append(data["meta"])
        disk.update({(s, t): v for s, t, v in data["meta"]["disk_gbps"]})
    report(rows, disk, metas, args)


if __name__ == "__main__":
    main()
