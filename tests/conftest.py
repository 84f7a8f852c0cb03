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


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    """``models(family) -> model``: mlx-lm's float32 model of the family's tiny
    checkpoint, loaded once per test module."""
    from d2moe_mlx.convert.hf_config import load_mlx_reference

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_mlx_reference(hf_checkpoint(family), dtype="float32")[0]
        return cache[family]

    return get


@pytest.fixture(scope="session")
def small_store(hf_checkpoint, tmp_path_factory):
    """A small qwen3_moe store (default nested fit, float32, unquantized dense weights),
    converted once per session; tests that change a store work on a copy (:func:`store_copy`)."""
    from d2moe_mlx.convert.convert import convert

    out = tmp_path_factory.mktemp("small-store") / "store"
    return convert(hf_checkpoint("qwen3_moe"), out, dense_bits=0, dtype="float32",
                   calib_tokens=64, seq_len=32).path


@pytest.fixture
def store_copy(small_store, tmp_path):
    """A fresh copy of :func:`small_store` that a test may change."""
    import shutil

    return shutil.copytree(small_store, tmp_path / "store")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """d2moe's cache (the demo store, store profiles) in a directory of this session's own:
    tests never read or write the user's ~/.cache/d2moe, and parallel workers never share one."""
    path = tmp_path_factory.mktemp("d2moe-cache")
    old = os.environ.get("D2MOE_CACHE")
    os.environ["D2MOE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("D2MOE_CACHE", None)
    else:
        os.environ["D2MOE_CACHE"] = old
