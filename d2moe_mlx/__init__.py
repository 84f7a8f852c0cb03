"""d2moe-mlx: run Mixture-of-Experts LLMs larger than memory on MLX.

The Python API mirrors mlx-lm: ``model, tokenizer = load(store)``, then
``generate`` / ``stream_generate`` (mlx-lm's own functions accept the model too).
"""

__version__ = "0.1.0"

from .generate import generate, stream_generate  # noqa: E402
from .load import load, load_model  # noqa: E402

__all__ = ["__version__", "load", "load_model", "generate", "stream_generate"]
