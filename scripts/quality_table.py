"""Quality of the presets at several expert cache sizes: docs/QUALITY.md's tables.

For each cache size (a fraction of each layer's experts that the exact policy's budget
holds; 1 = every expert resident, no budget) runs :func:`d2moe_mlx.evaluate.evaluate`
over the presets and prints a markdown table (``--json`` writes the raw results too).

The budget for a fraction is :func:`d2moe_mlx.budget.budget_for_slots` for the exact
policy at the top level over a process baseline measured once here, after a warm-up
load; the planner's baseline measurement is pinned to that value, so every run plans
the same split (a tiny model's whole expert cache is a few MB, inside the run-to-run
noise of RSS). The presets run under the same budget, which they split their own way.

    python scripts/quality_table.py                       # the bundled trained model
    python scripts/quality_table.py --store STORE --text FILE --cached 1,0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources


def heldout_text() -> str:
    """The last 20,000 characters of the bundled calib.txt: held-out documentation text
    (the model never trained on it) past the part the converter calibrates on."""
    return resources.files("d2moe_mlx").joinpath("assets/calib.txt").read_text()[-20000:]


def budgets(store, fractions: list[float], dtype: str) -> dict[float, int | None]:
    """A budget per fraction (None for 1: resident); pins the planner's baseline."""
    import gc

    import d2moe_mlx.model as d2model
    from d2moe_mlx import mwq
    from d2moe_mlx.budget import budget_for_slots
    from d2moe_mlx.engine import choose_layout
    from d2moe_mlx.layout import make_layout
    from d2moe_mlx.model import DTYPES, load, open_store
    from d2moe_mlx.system import current_rss_bytes

    model, _ = load(store, dtype=dtype)  # warm-up: libraries, tokenizer, kernels
    del model
    gc.collect()
    baseline = current_rss_bytes()
    d2model.current_rss_bytes = lambda: baseline
    out = {}
    with open_store(store) as s:
        spec = mwq.MWQSpec.from_dict(s.manifest["mwq"])
        layout = make_layout(choose_layout("auto", spec, s.manifest, True), spec)
        top = spec.num_levels - 1
        for f in fractions:
            slots = round(f * s.num_experts)
            out[f] = None if slots >= s.num_experts else budget_for_slots(
                slots, s, layout, top, DTYPES[dtype].size, baseline)
    return out


def _profile_note(store, dtype: str) -> str:
    """Whether the presets' stall budget was on: it needs a cached profile of the store."""
    from d2moe_mlx.model import open_store
    from d2moe_mlx.profile import cached

    with open_store(store) as s:
        on = cached(s, dtype) is not None
    return "a profile of the store was cached (stall budget on)" if on else \
        "no profile of the store cached (stall budget off)"


def _results(store, text, args, budget):
    """evaluate()'s results; where a preset cannot plan its pools under the budget
    (BudgetError), a line saying so in its place, and the other presets run one by one."""
    from d2moe_mlx.budget import BudgetError
    from d2moe_mlx.evaluate import evaluate
    from d2moe_mlx.levels import QUALITIES

    options = {} if args.alpha is None else {"alpha": args.alpha}
    run = dict(memory_budget=budget, max_tokens=args.max_tokens, mode=args.mode, dtype=args.dtype,
               quality_options=options)
    try:
        return evaluate(store, text, args.quality, **run)
    except BudgetError:
        pass
    out = []
    for q in args.quality or QUALITIES:
        try:
            out += evaluate(store, text, [q], **run)
        except BudgetError as e:
            need = e.args[0].split("smallest budget that works is ")[-1].split(";")[0]
            out.append(f"{q}: does not fit (BudgetError; suggests {need})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=None,
                   help="store to evaluate (default: the bundled trained tiny MoE, converted once)")
    p.add_argument("--text", default=None,
                   help="text file to score (default: held-out text from the bundled calib.txt)")
    p.add_argument("--cached", default="1,0.5,0.25",
                   help="fractions of each layer's experts the exact policy caches, comma separated")
    p.add_argument("--quality", action="append", default=None,
                   help="preset to run (repeat; default: exact, high, balanced, fast)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens of the text to score")
    p.add_argument("--mode", choices=("decode", "prefill"), default="decode",
                   help="how tokens are fed (see d2moe_mlx.evaluate)")
    p.add_argument("--dtype", default="float32", help="activation dtype")
    p.add_argument("--alpha", type=float, default=None,
                   help="SMoE substitution band for the dual-routing presets (0: none; default: "
                        "each preset's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)

    from d2moe_mlx.demo import demo_store

    store = args.store or demo_store(echo=lambda *a, **k: print(*a, file=sys.stderr))
    text = open(args.text, encoding="utf-8").read() if args.text else heldout_text()
    fractions = [float(x) for x in args.cached.split(",")]
    rows, raw = [], []
    for f, budget in budgets(store, fractions, args.dtype).items():
        for r in _results(store, text, args, budget):
            size = "all" if budget is None else f"{budget / 1e6:.1f} MB"
            if isinstance(r, str):  # this preset's pools do not fit the budget
                rows.append(f"| {size} | | {r} | | | | | | | |")
                continue
            mix = " ".join(f"L{lv} {100 * v:.0f}%" for lv, v in r.level_mix.items())
            cached = "all" if r.experts_cached is None else f"{100 * r.experts_cached:.0f}%"
            rows.append(f"| {size} | {cached} | "
                        f"{r.quality} | {r.perplexity:.3f} | {100 * r.ppl_delta:+.2f}% | "
                        f"{r.kl_to_top:.4f} | {100 * r.agreement:.1f}% | {mix} | "
                        f"{100 * r.substitution_rate:.1f}% | {100 * r.hit_rate:.1f}% |")
            raw.append({"cached_fraction": f, **r.to_dict()})
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"{raw[0]['tokens'] if raw else 0} positions, {args.mode} mode, reference: top level, "
          f"exact; {_profile_note(store, args.dtype)}\n")
    print("| budget | top-level pool | quality | ppl | ppl vs exact | KL to top | agreement | "
          "level mix | substituted | hit rate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
