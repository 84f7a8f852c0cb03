"""d2moe-mlx: run Mixture-of-Experts LLMs larger than memory on MLX."""

__version__ = "0.1.0"
