"""d2moe-mlx: run Mixture-of-Experts LLMs larger than memory on MLX.

The Python API mirrors mlx-lm: ``model, tokenizer = load(store)``, then
``generate`` / ``stream_generate`` (mlx-lm's own functions accept the model too).
They are imported on first use: importing mlx-lm (and transformers) takes seconds.
"""

__version__ = "0.1.0"

_LAZY = {
    "load": ".model",
    "load_model": ".model",
    "generate": ".generation",
    "stream_generate": ".generation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'd2moe_mlx' has no attribute {name!r}")
