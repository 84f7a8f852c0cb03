"""How far streaming logits are from resident ones, per scheduler path, in one process.

Loads STORE resident at LEVEL, then streaming at a 100% and a 25% expert cache in
``sync`` and ``stream`` modes, runs the same prompt (24 held-out tokens) and 8
greedy steps, and prints whether the tokens are equal and the largest |Δlogit| per
step. On the H100 (bf16) it printed 0.0 at every step for all four after commit
2566731, and 0.008-0.02 for split computations before it.

Usage: python scripts/check_streaming_exact.py STORE [--level 1] [--device gpu] [--dtype bfloat16]
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def run(model, prompt: mx.array, steps: int = 8):
    """Greedy tokens and float32 logits of the prompt's last position and each step."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(prompt, cache=cache)[0, -1]
    rows, tokens = [logits], [int(logits.argmax())]
    for _ in range(steps):
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[0, -1]
        rows.append(logits)
        tokens.append(int(logits.argmax()))
    return tokens, mx.stack(rows).astype(mx.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    p.add_argument("--level", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on gpu, float32 on cpu")
    args = p.parse_args()
    # After parsing: mlx-lm (transformers) takes seconds to import, --help should not wait.
    from bench_streaming import budget_for_slots, prompt_ids
    from d2moe_mlx.model import _start_device, load_model
    from d2moe_mlx.store.reader import Store
    from d2moe_mlx.engine import streaming_of
    from d2moe_mlx.system import current_rss_bytes

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    if args.device == "gpu":
        mx.set_memory_limit(40 << 30)
    dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    prompt = mx.array(prompt_ids(24))[None]
    ref, _ = load_model(args.store, level=args.level, dtype=dtype)
    want, want_logits = run(ref, prompt)
    store = Store.open(args.store)
    itemsize = 2 if dtype != "float32" else 4
    for fraction, mode in [(1.0, "sync"), (1.0, "stream"), (0.25, "sync"), (0.25, "stream")]:
        slots = max(int(fraction * store.num_experts), int(store.config["num_experts_per_tok"]))
        _start_device()
        budget = budget_for_slots(slots, store, args.level, itemsize, current_rss_bytes(),
                                  context=512, prefill_step=128)
        model, _ = load_model(args.store, level=args.level, dtype=dtype, memory_budget=budget, mode=mode,
                              context=512, prefill_step=128)
        tokens, logits = run(model, prompt)
        diff = mx.abs(logits - want_logits).max(axis=-1)
        print(f"{fraction:.0%} cache, {mode}: {min(streaming_of(model).plan.slots.values())} slots, tokens "
              f"{'equal' if tokens == want else 'DIFFER'}, max |dlogit| per step "
              f"{[round(float(d), 4) for d in diff]}")
        del model


if __name__ == "__main__":
    main()
