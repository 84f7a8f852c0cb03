"""Shared test setup: CPU MLX, scripts/ importable, cached tiny HF checkpoints."""

import os
import sys
from pathlib import Path

import mlx.core as mx
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

# CPU by default (CI has no GPU). D2MOE_TEST_DEVICE=gpu runs the suite on MLX's
# GPU backend (CUDA on the lent H100, Metal on a Mac) under a memory limit.
if os.environ.get("D2MOE_TEST_DEVICE", "cpu") == "gpu":
    mx.set_default_device(mx.gpu)
    mx.set_memory_limit(int(os.environ.get("D2MOE_TEST_MEMORY_GB", "24")) << 30)
else:
    mx.set_default_device(mx.cpu)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(family, **kw) -> Path``: a tiny random HF checkpoint,
    built once per session per (family, kw) (kw as for ``make_checkpoint``)."""
    from make_test_checkpoints import make_checkpoint

    cache = {}

    def get(family: str, **kw) -> Path:
        key = (family, repr(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(family, numbered=True)
            cache[key] = make_checkpoint(family, out, **kw)
        return cache[key]

    return get
