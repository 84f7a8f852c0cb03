"""Metal kernel sources (read with importlib.resources; custom kernels come later)."""
