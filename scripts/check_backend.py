"""Compare a store's model on MLX's GPU backend (CUDA or Metal) with the CPU reference.

For every MWQ level it prints the max abs difference GPU vs CPU of one expert
layer (each gather_qmm component alone, then the summed level) and of the whole
model's logits, and whether two GPU runs agree (determinism).

    python scripts/check_backend.py STORE [--dtype float32] [--memory-gb 24]
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--memory-gb", type=int, default=24, help="mx.set_memory_limit on the GPU")
    args = parser.parse_args()
    # After parsing: mlx-lm (transformers) takes seconds to import, --help should not wait.
    from d2moe_mlx import load_model
    from d2moe_mlx.engine import engine_of
    from d2moe_mlx.moe import set_level

    mx.set_default_device(mx.gpu)
    mx.set_memory_limit(args.memory_gb << 30)
    model, config = load_model(args.store, dtype=args.dtype)
    engine = engine_of(model)
    tokens = mx.array([[5, 9, 33, 70, 2, 8, 100, 31, 7, 64, 3, 12]]) % config["vocab_size"]
    layer = next(iter(engine.layers.values()))
    hidden = config["hidden_size"]
    x = mx.random.normal((1, 12, hidden), key=mx.random.key(0)).astype(getattr(mx, args.dtype))
    idx = mx.array(np.random.default_rng(0).integers(0, engine.store.num_experts, (1, 12, 2)).astype(np.uint32))
    for level in range(engine.spec.num_levels):
        set_level(model, level)
        first, second = _np(model(tokens)), _np(model(tokens))
        gpu = _np(layer(x, idx))
        with mx.stream(mx.cpu):
            cpu = _np(layer(x, idx))
            cpu_model = _np(model(tokens))
        print(f"expert layer, level {level} ({engine.layout.kind} layout): |gpu - cpu| = "
              f"{np.abs(gpu - cpu).max():.3g} (scale {np.abs(cpu).max():.3g})")
        print(
            f"model, level {level}: |gpu - cpu| = {np.abs(first - cpu_model).max():.3g} (scale "
            f"{np.abs(cpu_model).max():.3g}), gpu run twice: {np.abs(first - second).max():.3g}, "
            f"NaN: {bool(np.isnan(first).any())}"
        )


if __name__ == "__main__":
    main()
