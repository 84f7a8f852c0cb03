"""An offline profile of a store on this machine: read time per level, compute time per level.

HEBF's schedule (and the dual-routing policy's stall budget) trades two costs, and on
unified memory they are exactly these: reading one expert's components of a level
from the SSD straight into a slot (no second copy to a device), and computing a
decode step's k experts at a level. :func:`profile` measures both for every level —
reads cold (each file's pages dropped first), on the loader's own code path, compute
with the engine's own expert layer maths — and caches the result per store, device
and dtype under ~/.cache/d2moe/profiles ($D2MOE_CACHE).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import mwq
from .cache import ExpertCache, PartPool
from .layout import make_layout, slot_tensors
from .loader import ExpertLoader
from .policies import LRUPolicy
from .store.reader import Store
from .system import drop_file_cache


@dataclass
class Profile:
    """Seconds to read one expert at each level (cold) and to compute k experts of one
    token at each level, on this machine."""

    read_s: list[float]  # per level: components 0..level of one expert
    component_read_s: list[float]  # per component alone
    compute_s: list[float]  # per level: one token's k experts (gate, up, down)
    bytes: list[int]  # per level: one expert's stored bytes
    device: str
    dtype: str

    def describe(self) -> str:
        rows = [f"level {lv}: read {1e3 * r:.2f} ms/expert ({b / 1e6:.2f} MB), compute "
                f"{1e3 * c:.2f} ms per token's experts"
                for lv, (r, c, b) in enumerate(zip(self.read_s, self.compute_s, self.bytes))]
        return "\n".join(rows)


def cache_path(store: Store, device: str, dtype: str) -> Path:
    root = Path(os.environ.get("D2MOE_CACHE", Path.home() / ".cache" / "d2moe")).expanduser()
    key = f"{store.path}|{store.manifest.get('created')}|{device}|{dtype}"
    return root / "profiles" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")


def cached(store: Store, dtype: str) -> Profile | None:
    """The store's profile on this device if one was measured (``d2moe profile``), else None."""
    path = cache_path(store, str(mx.default_device()), dtype)
    try:
        return Profile(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def profile(path: str | os.PathLike, *, dtype: str = "float32", samples: int = 8,
            repeats: int = 5, refresh: bool = False) -> Profile:
    """The store's profile on this machine (measured once, then read from the cache)."""
    store = Store.open(path)
    try:
        device = str(mx.default_device())
        cached = cache_path(store, device, dtype)
        if cached.is_file() and not refresh:
            return Profile(**json.loads(cached.read_text()))
        prof = _measure(store, getattr(mx, dtype), samples, repeats)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(prof)))
        os.replace(tmp, cached)
        return prof
    finally:
        store.close()


def _measure(store: Store, act: mx.Dtype, samples: int, repeats: int) -> Profile:
    spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
    nested = bool(store.manifest["mwq"].get("nested"))
    layout = make_layout("levels" if nested else "planes", spec)
    layer = store.moe_layers[len(store.moe_layers) // 2]
    k = int(store.config.get("num_experts_per_tok", 1))
    rng = np.random.default_rng(0)
    experts = rng.choice(store.num_experts, size=min(samples, store.num_experts), replace=False)
    loader = ExpertLoader(store, spec, threads=0)
    base = store.layout(layer, 0)
    comp_read = []
    for c in range(spec.num_levels):
        drop_file_cache(store.expert_file(layer, c))
        buf = np.empty(store.block_bytes(layer, c), dtype=np.uint8)
        start = time.perf_counter()
        for e in experts:
            store.read_block_into(layer, c, int(e), buf)
        comp_read.append((time.perf_counter() - start) / len(experts))
    read, compute, sizes = [], [], []
    for level in range(spec.num_levels):
        parts = [layout.parts[p] for p in layout.cover(level)]
        pools = [PartPool(layer, part, slot_tensors(part, base, spec.group_size), k, store.num_experts,
                          act) for part in parts]
        cache = ExpertCache(layer, pools, LRUPolicy(store.num_experts))
        for c in range(level + 1):
            drop_file_cache(store.expert_file(layer, c))
        start = time.perf_counter()
        for i, pool in enumerate(pools):
            _, loads = cache.acquire(i, experts[:k])
            for e, s in loads:
                loader.load(pool, e, s)
                cache.loaded(i, s)
        read.append((time.perf_counter() - start) / min(k, len(experts)))
        sizes.append(sum(store.block_bytes(layer, c) for c in range(level + 1)))
        compute.append(_compute_time(store, spec, pools, k, act, repeats))
    loader.close()
    return Profile(read, comp_read, compute, sizes, str(mx.default_device()), str(act).split(".")[-1])


def _compute_time(store: Store, spec: mwq.MWQSpec, pools: list[PartPool], k: int,
                  act: mx.Dtype, repeats: int) -> float:
    """Median seconds of one token's k experts (gate, up, down) on these pools."""
    from mlx_lm.models.activations import swiglu

    from .layout import projections

    names = projections(store.layout(pools[0].layer, 0))
    hidden = store.config["hidden_size"]
    x = mx.random.normal((1, 1, 1, hidden), key=mx.random.key(0)).astype(act)
    idx = mx.arange(min(k, pools[0].capacity), dtype=mx.uint32)[None]

    def project(name, v):
        y = None
        for pool in pools:
            w, s, b = pool.arrays(name)
            out = mx.gather_qmm(v, w, s, b, rhs_indices=idx, transpose=True,
                                group_size=spec.group_size, bits=pool.bits)
            y = out if y is None else y + out
        return y

    def step():
        if "gate_proj" in names:  # SwitchGLU
            return project("down_proj", swiglu(project("gate_proj", x), project("up_proj", x)))
        return project(names[-1], mx.maximum(project(names[0], x), 0))  # SwitchMLP's shape

    mx.eval(step())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(step())
        times.append(time.perf_counter() - start)
    return float(np.median(times))
