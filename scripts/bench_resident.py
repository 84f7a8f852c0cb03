"""Decode speed of the resident MWQ runtime per level against mlx-lm, in one run.

Baseline: mlx-lm's own model on the original checkpoint (full precision, same
activation dtype). Each MWQ level of the converted store runs the same prompt
for the same number of tokens; the table gives tokens/s and the ratio to the
baseline. On the CPU backend only the ratios mean anything.

    python scripts/bench_resident.py [--model DIR] [--store DIR] [--tokens 128]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import mlx.core as mx

PROMPT = "The Python standard library"


def decode(model, tokenizer, tokens: int, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` (generation tokens/s, prompt tokens/s), greedy, fixed length."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    best = (0.0, 0.0)
    for _ in range(repeats):
        r = None
        for r in stream_generate(model, tokenizer, PROMPT, max_tokens=tokens, sampler=make_sampler(0.0)):
            pass
        best = max(best, (r.generation_tps, r.prompt_tps))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="HF checkpoint (default: the bundled tiny MoE)")
    parser.add_argument("--store", type=Path, default=Path("/tmp/d2moe-bench-store"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # After parsing: mlx-lm (transformers) takes seconds to import, --help should not wait.
    from mlx_lm.utils import load_tokenizer

    from d2moe_mlx import load
    from d2moe_mlx.convert.convert import convert
    from d2moe_mlx.convert.hf_config import load_mlx_reference
    from d2moe_mlx.demo import bundled_model
    from d2moe_mlx.store.reader import Store

    model_dir = args.model or bundled_model()
    dtype = "float32" if mx.default_device() == mx.cpu else "bfloat16"
    if not (args.store / "d2moe.json").exists():
        convert(model_dir, args.store, overwrite=True)
    num_levels = 1 + len(Store.open(args.store).manifest["mwq"]["plane_bits"])

    ref, config = load_mlx_reference(model_dir)
    ref.set_dtype(getattr(mx, dtype))
    tokenizer = load_tokenizer(model_dir, eos_token_ids=[])  # no early stop: fixed length
    base_tps, base_ptps = decode(ref, tokenizer, args.tokens, args.repeats)
    rows = [("mlx-lm, original weights", base_tps, base_ptps)]
    for level in range(num_levels):
        model, _ = load(args.store, level=level, dtype=dtype)
        tps, ptps = decode(model, tokenizer, args.tokens, args.repeats)
        rows.append((f"d2moe level {level}", tps, ptps))
    print(f"machine: {platform.machine()} {platform.system()}, MLX {mx.__version__}, device {mx.default_device()}, "
          f"activations {dtype}, {args.tokens} tokens, best of {args.repeats}, {time.strftime('%Y-%m-%d')}")
    print("| model | decode tok/s | ratio to mlx-lm | prompt tok/s |")
    print("|---|---|---|---|")
    for name, tps, ptps in rows:
        print(f"| {name} | {tps:.1f} | {tps / base_tps:.2f} | {ptps:.1f} |")


if __name__ == "__main__":
    main()
