"""Does the expert predictor pay? Decode with prefetch off / router-gate / predictor, side by side.

On the bundled trained tiny MoE (``d2moe_mlx.demo.demo_store()``, copied into --work and
calibrated there with ``d2moe calibrate`` unless it already has predictors) or --store,
with expert caches of each --fractions of the experts: one model per configuration in
one process, decoding blocks of --tokens greedy tokens from held-out prompts, the
configurations alternating block by block for --rounds rounds (so a drift of the machine
hits all alike). Per configuration: decode tok/s (median block), main-thread wait on
loads per token, bytes read per token, hit rate, prefetch accuracy (of the top-k
experts a step used, the share that had been prefetched) and prefetch loads per token.

Configurations: ``off`` (no prefetch), ``gate`` (the next layer's router on this layer's
input, top-k), ``pred`` (the store's predictor, top-k) and ``pred+2`` (its top k+2).

The budget fixes the slot count (the baseline RSS the budget plans with is pinned, as in
the tests, so that several models fit in one process): memory is not what is measured.

    python scripts/bench_predictor.py --out docs/bench/predictor-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

BASELINE = 64 << 20


def prepare(args) -> Path:
    """The store to measure: --store, or a calibrated copy of the demo store."""
    from d2moe_mlx.calibration import calibrate_store
    from d2moe_mlx.predictor import KEY
    from d2moe_mlx.store.extras import read_extra

    if args.store:
        path = Path(args.store)
    else:
        from d2moe_mlx.demo import demo_store

        path = Path(args.work) / "tiny-moe"
        if not path.exists():
            shutil.copytree(demo_store(echo=print), path)
    if read_extra(path, KEY) is None or args.recalibrate:
        print(f"calibrating {path} ...", flush=True)
        calibrate_store(path, tokens=args.calib_tokens)
    return path


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens from the held-out end of the calibration text."""
    from d2moe_mlx.convert.calibrate import default_calibration_text

    text = default_calibration_text()
    ids = [i for part in text.split("\n\n") if part.strip() for i in tokenizer.encode(part + "\n\n")]
    tail = ids[int(len(ids) * 0.8):]
    step = max(length, len(tail) // max(n, 1))
    return [tail[i * step:i * step + length] for i in range(n)]


def decode(model, engine, prompt: list[int], n: int):
    """Greedy decode ``n`` tokens after ``prompt``; returns (seconds, stats) of the decode
    steps alone (the prompt's pass excluded)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    y = model(mx.array(prompt)[None], cache=cache)[0, -1].argmax()
    mx.eval(y)
    engine.scheduler.drain()
    before = engine.stats.snapshot()
    t0 = time.perf_counter()
    for _ in range(n):
        y = model(y.reshape(1, 1), cache=cache)[0, -1].argmax()
        mx.eval(y)
    return time.perf_counter() - t0, engine.stats.delta(before)


def measure(path: Path, fraction: float, args) -> list[dict]:
    import numpy as np

    import d2moe_mlx.model as d2model
    from d2moe_mlx import mwq
    from d2moe_mlx.budget import budget_for_slots
    from d2moe_mlx.engine import streaming_of
    from d2moe_mlx.layout import make_layout
    from d2moe_mlx.store.reader import Store

    d2model.current_rss_bytes = lambda: BASELINE
    with Store.open(path) as s:
        spec = mwq.MWQSpec.from_dict(s.manifest["mwq"])
        k = s.config["num_experts_per_tok"]
        slots = max(round(fraction * s.num_experts), k)
        budget = budget_for_slots(slots, s, make_layout("levels", spec), spec.num_levels - 1, 4,
                                  BASELINE, context=args.context)
    configs = {"off": (False, None), "gate": (True, None), "pred": (True, k), "pred+2": (True, k + 2)}
    runs = {}
    tokenizer = None
    for name, (prefetch, top) in configs.items():
        model, tokenizer = d2model.load(path, dtype="float32", memory_budget=budget,
                                       context=args.context, prefetch=prefetch, io_mode=args.io_mode)
        engine = streaming_of(model)
        if prefetch and top is None:
            engine.scheduler.predict = None  # the router-gate prefetch
        engine.scheduler.prefetch_top = top
        if prefetch and top is not None and engine.scheduler.predict is None:
            raise SystemExit(f"{path} has no predictors: run d2moe calibrate {path}")
        runs[name] = dict(model=model, engine=engine, times=[], stats=[])
    ps = prompts(tokenizer, args.rounds + 1, args.prompt)
    for r, prompt in enumerate(ps):
        for name, run in runs.items():
            seconds, stats = decode(run["model"], run["engine"], prompt, args.tokens)
            if r:  # round 0 warms up
                run["times"].append(seconds)
                run["stats"].append(stats)
    rows = []
    for name, run in runs.items():
        st = run["stats"]
        tokens = args.tokens * len(st)
        total = lambda f: sum(f(s) for s in st)  # noqa: E731
        rows.append(dict(
            fraction=fraction, slots=slots, config=name,
            tok_s=round(args.tokens / float(np.median(run["times"])), 2),
            wait_ms_per_token=round(1e3 * total(lambda s: s.wait_seconds) / tokens, 3),
            sync_ms_per_token=round(1e3 * total(lambda s: s.sync_seconds) / tokens, 3),
            kib_read_per_token=round(total(lambda s: s.bytes_read) / tokens / 1024, 1),
            hit_rate=round(total(lambda s: s.hits) / max(total(lambda s: s.lookups), 1), 3),
            prefetch_accuracy=round(total(lambda s: s.predicted_right)
                                    / max(total(lambda s: s.predicted), 1), 3),
            prefetch_loads_per_token=round(total(lambda s: s.prefetch_loads) / tokens, 2),
            syncs_per_token=round(total(lambda s: s.syncs) / tokens, 2)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--store", default=None,
                    help="A calibrated store (default: a copy of the demo store in --work).")
    ap.add_argument("--work", default="/tmp/d2moe-bench-predictor",
                    help="Where the demo store's calibrated copy is kept.")
    ap.add_argument("--recalibrate", action="store_true", help="Train the predictors again.")
    ap.add_argument("--calib-tokens", type=int, default=None,
                    help="Calibration tokens (default: all of the packaged text).")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5],
                    help="Expert cache sizes as fractions of the experts per layer.")
    ap.add_argument("--tokens", type=int, default=32, help="Decode tokens per block.")
    ap.add_argument("--rounds", type=int, default=5, help="Measured blocks per configuration.")
    ap.add_argument("--prompt", type=int, default=16, help="Prompt tokens per block.")
    ap.add_argument("--context", type=int, default=256, help="KV cache tokens the budget plans.")
    ap.add_argument("--io-mode", default="random", choices=["random", "nocache", "default"],
                    help="How experts are read (nocache: around the page cache where the OS can).")
    ap.add_argument("--out", default=None, help="Write the rows as JSON here.")
    args = ap.parse_args(argv)

    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    path = prepare(args)
    rows = []
    for fraction in args.fractions:
        rows += measure(path, fraction, args)
    cols = list(rows[0])
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    if args.out:
        doc = {"machine": f"{platform.system()} {platform.machine()}, MLX {mx.__version__} CPU",
               "args": vars(args), "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
