"""Routing statistics of an MoE model on held-out text (via d2moe_mlx.trace).

Prints markdown tables (for the model card) and optionally writes JSON:
  * expert activation histogram per layer (share of the layer's k*tokens picks),
  * top-k overlap of consecutive tokens: mean |S_t & S_{t-1}| / k per layer,
  * LRU hit rate per layer for caches of 12.5/25/50% of the experts (the routing
    trace replayed through one LRU per layer, expert by expert),
  * optionally (--ppl) perplexity on the same text in non-overlapping windows.

Usage:
  python scripts/routing_stats.py [--model d2moe_mlx/assets/tiny-moe]
      [--text .train/heldout.txt] [--max-tokens 16384] [--ppl] [--json out.json]
"""

import argparse
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def histogram(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers, experts] share of picks per expert."""
    L = ids.shape[0]
    h = np.stack([np.bincount(ids[l].ravel(), minlength=num_experts) for l in range(L)])
    return h / h.sum(1, keepdims=True)


def consecutive_overlap(ids: np.ndarray) -> np.ndarray:
    """Mean |S_t & S_{t-1}| / k per layer."""
    a, b = ids[:, 1:, :, None], ids[:, :-1, None, :]
    return (a == b).any(-1).sum(-1).mean(-1) / ids.shape[-1]


def lru_hit_rate(seq: np.ndarray, capacity: int) -> float:
    """Replay one layer's [tokens, k] expert ids through an LRU of ``capacity``."""
    cache: OrderedDict = OrderedDict()
    hits = total = 0
    for row in seq:
        for e in row.tolist():
            total += 1
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                cache[e] = True
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / total


def perplexity(model, tokens: list[int], window: int = 512) -> tuple[float, int]:
    """exp(mean CE) over non-overlapping windows (no context carried), as in training."""
    import mlx.core as mx
    import mlx.nn as nn

    tot, cnt = 0.0, 0
    for s in range(0, len(tokens) - 1, window):
        w = tokens[s:s + window + 1]
        if len(w) < 2:
            break
        x = mx.array(w)[None]
        ce = nn.losses.cross_entropy(model(x[:, :-1]).astype(mx.float32), x[:, 1:], reduction="sum")
        tot += ce.item()
        cnt += len(w) - 1
    return math.exp(tot / cnt), cnt


def main():
    ap = argparse.ArgumentParser(description="Routing statistics on held-out text.")
    ap.add_argument("--model", default=str(REPO / "d2moe_mlx" / "assets" / "tiny-moe"))
    ap.add_argument("--text", default=None,
                    help="text file (default .train/heldout.txt, else d2moe_mlx/assets/calib.txt)")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--ppl", action="store_true", help="also held-out perplexity (all tokens)")
    ap.add_argument("--trace-out", default=None, help="keep the trace (.npz)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import mlx.core as mx
    import mlx_lm

    from d2moe_mlx.trace import record_trace

    text_path = Path(args.text) if args.text else REPO / ".train" / "heldout.txt"
    if not text_path.exists():
        text_path = REPO / "d2moe_mlx" / "assets" / "calib.txt"
    text = text_path.read_text(encoding="utf-8")
    model, tok = mlx_lm.load(args.model)
    model.set_dtype(mx.float32)  # CPU gather_mm needs float32
    tr = record_trace(model, tok, text, args.trace_out, max_tokens=args.max_tokens)
    ids, meta = tr["ids"].astype(np.int64), tr["meta"]
    E, k, layers = meta["num_experts"], meta["k"], meta["layers"]
    res = {"command": "python scripts/routing_stats.py " + " ".join(sys.argv[1:]),
           "model": args.model, "text": str(text_path.relative_to(REPO) if text_path.is_relative_to(REPO) else text_path),
           "tokens": meta["num_tokens"], "num_experts": E, "k": k, "layers": layers}
    h = histogram(ids, E)
    res["histogram"] = h.round(5).tolist()
    res["overlap"] = consecutive_overlap(ids).round(4).tolist()
    caps = [max(1, round(E * f)) for f in (0.125, 0.25, 0.5)]
    res["lru"] = {str(c): [round(lru_hit_rate(ids[i], c), 4) for i in range(len(layers))]
                  for c in caps}
    if args.ppl:
        ppl, n = perplexity(model, list(tok.encode(text)))
        res["ppl"], res["ppl_tokens"] = round(ppl, 3), n

    print(f"Command: `{res['command']}`  \ntext: {res['text']}, {res['tokens']} tokens, "
          f"{E} experts, top-{k}\n")
    print("| layer | min % | max % | max/mean | entropy/log(E) | overlap | "
          + " | ".join(f"LRU {c} ({c / E:.1%})" for c in caps) + " |")
    print("|" + "---|" * (5 + 1 + len(caps)))
    for i, li in enumerate(layers):
        p = h[i]
        ent = -(p[p > 0] * np.log(p[p > 0])).sum() / math.log(E)
        print(f"| {li} | {100 * p.min():.2f} | {100 * p.max():.2f} | {p.max() * E:.2f} | "
              f"{ent:.3f} | {res['overlap'][i]:.3f} | "
              + " | ".join(f"{res['lru'][str(c)][i]:.3f}" for c in caps) + " |")
    print(f"| mean | | | | | {np.mean(res['overlap']):.3f} | "
          + " | ".join(f"{np.mean(res['lru'][str(c)]):.3f}" for c in caps) + " |")
    print(f"\nRandom-routing reference: overlap {k / E:.3f}; LRU hit rate = cache/E "
          f"({', '.join(f'{c / E:.3f}' for c in caps)}).\n")
    print("Expert activation histogram (share of picks, per mille), expert id across:\n")
    print("| layer | " + " | ".join(str(e) for e in range(E)) + " |")
    print("|" + "---|" * (E + 1))
    for i, li in enumerate(layers):
        print(f"| {li} | " + " | ".join(f"{1000 * v:.0f}" for v in h[i]) + " |")
    if args.ppl:
        print(f"\nHeld-out perplexity: {res['ppl']:.2f} over {res['ppl_tokens']} predicted "
              f"tokens (float32, non-overlapping 512-token windows)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
