"""Compare dual routing's training-free presets with D²MoE's trained bit-width router.

On one store (default: the bundled tiny trained MoE, converted once): the calibration
text is cut into sequences, the last 20% held out. For each policy (the top level
exactly, the presets high / balanced / fast, and routers trained at each ``--alphas``
value) it measures, teacher-forced on the held-out text through the real engine
(resident, every level in memory): KL to the top level, perplexity, greedy
agreement, mean bits per pair and the level mix. Then decode speed, every policy in
one process, alternating in rounds: resident and streaming at a budget of
``--fraction`` of the experts (the same bytes for every policy).

    python scripts/bench_bit_router.py --out /tmp/bench_bit_router
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np


def decode_speed(model, engine, policies: dict, prompt: np.ndarray, tokens: int, rounds: int) -> dict:
    """tok/s (median over rounds) and the level mix of greedy decoding for each policy."""
    from mlx_lm.models.cache import make_prompt_cache

    times = {name: [] for name in policies}
    mixes = {}
    for r in range(rounds + 1):  # round 0 warms pools, caches and kernels
        for name, policy in policies.items():
            engine.set_policy(policy)
            cache = make_prompt_cache(model)
            y = model(mx.array(prompt)[None], cache=cache)[0, -1].argmax()
            mx.eval(y)
            before = engine.stats.snapshot()
            t0 = time.perf_counter()
            for _ in range(tokens):
                y = model(y.reshape(1, 1), cache=cache)[0, -1].argmax()
                mx.eval(y)
            if r > 0:
                times[name].append(tokens / (time.perf_counter() - t0))
                d = engine.stats.delta(before)
                mixes[name] = dict(mix=d.level_mix, hit_rate=d.hit_rate,
                                   substituted=d.substitution_rate,
                                   plan=engine.plan.describe() if engine.plan else None)
    return {name: dict(tps=float(np.median(t)), **mixes[name]) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="store (default: the bundled tiny MoE, converted once)")
    ap.add_argument("--alphas", default="0.02,0.1,0.5", help="expected-bits weights to train at")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--fraction", type=float, default=0.25, help="streaming: experts the budget holds")
    ap.add_argument("--tokens", type=int, default=24, help="decode tokens per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--floor", type=int, default=0, help="lowest level the routers choose")
    ap.add_argument("--routers", default=None, metavar="DIR",
                    help="load the routers an earlier --out DIR saved instead of training them")
    ap.add_argument("--decode-seqs", type=int, default=0, metavar="N",
                    help="also measure quality feeding one token at a time (as in chat) on the "
                         "first N held-out sequences: presets decide differently per call size")
    ap.add_argument("--no-speed", action="store_true", help="quality only, no decode timing")
    ap.add_argument("--out", default=None, help="folder for results.json and the trained routers")
    ap.add_argument("--compare-inputs", type=float, default=None, metavar="ALPHA",
                    help="instead: train at ALPHA a router on router scores and one on scores and "
                         "the hidden state, and compare their hard decisions on held-out text")
    args = ap.parse_args(argv)
    mx.set_default_device(mx.cpu)
    if args.compare_inputs is not None:
        return compare_inputs(args)

    from d2moe_mlx import mwq, system
    from d2moe_mlx.bitrouter import LearnedRouting
    from d2moe_mlx.bitrouter_train import evaluate, router_policy, split_sequences, text_tokens, train_router
    from d2moe_mlx.budget import budget_for_slots
    from d2moe_mlx.convert.calibrate import default_calibration_text
    from d2moe_mlx.demo import demo_store
    from d2moe_mlx.engine import choose_layout, engine_of, policy_parts
    from d2moe_mlx.layout import make_layout
    from d2moe_mlx.levels import Exact, for_quality
    from d2moe_mlx.model import _start_device, load, load_model
    from d2moe_mlx.store.reader import Store

    store = Path(args.store) if args.store else demo_store(echo=lambda *a, **k: print(*a, file=sys.stderr))
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(store, quality="high", quality_options={"floor": 0, "alpha": 0.0})
    engine = engine_of(model)
    top = engine.spec.num_levels - 1
    levels = list(range(args.floor, top + 1))
    train, test = split_sequences(text_tokens(tokenizer, default_calibration_text()), args.seq_len)
    policies = {"exact": Exact(top), **{q: for_quality(q, top) for q in ("high", "balanced", "fast")}}
    results = dict(store=str(store), levels=levels, train_tokens=int(train.size),
                   held_out_tokens=int(test.size), args=vars(args), quality={}, training={})
    for a in [float(v) for v in args.alphas.split(",")]:
        name = f"learned a={a:g}" + (f" floor={args.floor}" if args.floor else "")
        if args.routers:
            saved = np.load(Path(args.routers) / f"router_alpha{a:g}.npz")
            policies[name] = LearnedRouting(saved["weight"], saved["bias"], sorted(engine.layers), levels)
            continue
        t0 = time.perf_counter()
        router, history = train_router(model, train, levels, alpha=a, steps=args.steps,
                                       batch=args.batch, lr=args.lr)
        policies[name] = router_policy(router, model, levels)
        results["training"][name] = dict(seconds=time.perf_counter() - t0,
                                         loss_first5=float(np.mean([h["loss"] for h in history[:5]])),
                                         loss_last5=float(np.mean([h["loss"] for h in history[-5:]])),
                                         last=history[-1])
        print(name, results["training"][name], file=sys.stderr, flush=True)
        if out:
            np.savez(out / f"router_alpha{a:g}.npz", weight=np.array(router.weight),
                     bias=np.array(router.bias))
    ref, ref_logp = evaluate(model, policies["exact"], test)
    for name, policy in policies.items():
        got = ref if name == "exact" else evaluate(model, policy, test, ref_logp)[0]
        got["ppl_delta"] = got["ppl"] - ref["ppl"]
        results["quality"][name] = got
        print(name, got, file=sys.stderr, flush=True)
    if args.decode_seqs:
        results["decode_quality"] = decode_quality(model, engine, policies, test[:args.decode_seqs])
    results["levels"] = list(range(top + 1))
    if args.no_speed:
        engine.close()
        print(json.dumps(results, indent=1, default=float))
        if out:
            (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
        return
    prompt = test[0][:32]
    results["resident"] = decode_speed(model, engine, policies, prompt, args.tokens, args.rounds)
    engine.close()
    del model, engine
    gc.collect()
    mx.clear_cache()
    system.return_freed_memory()

    # One budget for every policy: ``fraction`` of the experts in each pool of the
    # widest policy (all levels); a policy of fewer levels gets more slots of its own.
    with Store.open(store) as s:
        spec = mwq.MWQSpec.from_dict(s.manifest["mwq"])
        _start_device()
        slots = max(int(round(args.fraction * s.num_experts)), s.config["num_experts_per_tok"])
        lay = make_layout(choose_layout("auto", spec, s.manifest, True), spec)
        parts, floor = policy_parts(policies["fast"], lay)
        budget = budget_for_slots(slots, s, lay, top, 4, system.current_rss_bytes(), context=256,
                                  parts=parts, floor_parts=floor)
    smodel, _ = load_model(store, memory_budget=budget, context=256)
    sengine = engine_of(smodel)
    results["budget_bytes"] = int(budget)
    results["streaming"] = decode_speed(smodel, sengine, policies, prompt, args.tokens, args.rounds)
    sengine.close()
    print(json.dumps(results, indent=1, default=float))
    if out:
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
        (out / "table.md").write_text(table(results))
    print(table(results))


def decode_quality(model, engine, policies: dict, sequences: np.ndarray) -> dict:
    """KL to the first policy (exact), greedy agreement, bits and level mix, feeding
    each sequence one token at a time through the KV cache."""
    import mlx.nn as nn
    from mlx_lm.models.cache import make_prompt_cache

    logps, out = {}, {}
    for name, policy in policies.items():
        engine.set_policy(policy)
        before = engine.stats.snapshot()
        rows = []
        for seq in sequences:
            cache = make_prompt_cache(model)
            for t in seq:
                rows.append(nn.log_softmax(model(mx.array([[int(t)]]), cache=cache)[0, -1], axis=-1))
            mx.eval(rows)
        logps[name] = mx.stack(rows)
        ref = logps[next(iter(policies))]
        mix = engine.stats.delta(before).level_mix
        out[name] = dict(kl=float((mx.exp(ref) * (ref - logps[name])).sum(-1).mean()),
                         agree=float((ref.argmax(-1) == logps[name].argmax(-1)).mean()),
                         bits=sum(engine.spec.level_bits(lv) * s for lv, s in mix.items()),
                         mix={int(lv): s for lv, s in mix.items() if s > 0})
        print("decode", name, out[name], file=sys.stderr, flush=True)
    return out


def compare_inputs(args) -> None:
    """Score features alone vs scores + the token's hidden state, same alpha and steps."""
    from d2moe_mlx.bitrouter_train import (evaluate, evaluate_hooked, router_policy,
                                           split_sequences, text_tokens, train_router)
    from d2moe_mlx.convert.calibrate import default_calibration_text
    from d2moe_mlx.demo import demo_store
    from d2moe_mlx.engine import engine_of
    from d2moe_mlx.levels import Exact
    from d2moe_mlx.model import load

    store = Path(args.store) if args.store else demo_store(echo=lambda *a, **k: print(*a, file=sys.stderr))
    model, tokenizer = load(store, quality="high", quality_options={"floor": 0, "alpha": 0.0})
    top = engine_of(model).spec.num_levels - 1
    levels = list(range(top + 1))
    train, test = split_sequences(text_tokens(tokenizer, default_calibration_text()), args.seq_len)
    results = dict(store=str(store), alpha=args.compare_inputs, args=vars(args))
    for name, hidden in (("scores", False), ("scores+hidden", True)):
        t0 = time.perf_counter()
        router, history = train_router(model, train, levels, alpha=args.compare_inputs,
                                       steps=args.steps, batch=args.batch, lr=args.lr, hidden=hidden)
        results[name] = dict(train_seconds=time.perf_counter() - t0,
                             held_out=evaluate_hooked(model, router, levels, test))
        if not hidden:  # the same decisions through the engine's LearnedRouting
            _, ref = evaluate(model, Exact(top), test)
            results[name]["engine"] = evaluate(model, router_policy(router, model, levels), test, ref)[0]
        print(name, results[name], file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1, default=float))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "inputs.json").write_text(json.dumps(results, indent=1, default=float))


def table(r: dict) -> str:
    """The markdown table of a results dict."""
    rows = ["| policy | bits/pair | level mix (L0/L1/L2) | KL to top | ppl (Δ) | greedy agree "
            "| resident tok/s | streaming tok/s (hit rate) |", "|" + "---|" * 8]
    for name, q in r["quality"].items():
        mix = "/".join(f"{q['mix'].get(lv, q['mix'].get(str(lv), 0.0)):.2f}" for lv in r["levels"])
        res, st = r["resident"][name], r["streaming"][name]
        rows.append(f"| {name} | {q['bits']:.2f} | {mix} | {q['kl']:.4f} | {q['ppl']:.2f} "
                    f"({q['ppl_delta']:+.2f}) | {q['agree']:.3f} | {res['tps']:.1f} "
                    f"| {st['tps']:.1f} ({st['hit_rate']:.2f}) |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
