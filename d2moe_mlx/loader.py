"""Async expert loader: a thread pool that reads expert blocks into the slots the cache hands it.

Loader threads only do I/O and numpy into evaluated buffers (numpy views of MLX
arrays) and never touch MLX graphs or residency state: the scheduler asks the
cache for a slot, submits the load here, and on the main thread reports the
future's result back to the cache. A ``planes`` part (one stored component) is
read with one ``preadv`` straight into the slot where the stored form is the
slot's (packed codes; float16 scales under float16 activations); the rest goes
through a per-thread staging buffer and is converted into the slot. A ``levels``
part reads each of its components' blocks into staging and packs them
(:func:`d2moe_mlx.layout.build_part`). Every block read from disk is checked
against its crc32 unless ``verify=False``. A request for a slot already being
filled with the same expert returns the same future. Errors reach the caller
through the future, naming the file and block.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from . import mwq
from .cache import PartPool
from .layout import build_part
from .packing import binary_to_2bit
from .store.reader import Store


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 words of float values, rounded to nearest even (as MLX's astype)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def store_float(dst: np.ndarray, src: np.ndarray) -> None:
    """Write float values ``src`` into a slot view (uint16 words for bfloat16 pools)."""
    if dst.dtype == np.uint16:
        dst[...] = float_to_bf16_bits(np.asarray(src, dtype=np.float32)).reshape(dst.shape)
    else:
        np.copyto(dst, np.asarray(src).reshape(dst.shape), casting="unsafe")


def _as_float32(view: np.ndarray) -> np.ndarray:
    """Float values of a slot view (bfloat16 pools hold uint16 words)."""
    if view.dtype == np.uint16:
        return (view.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return view.astype(np.float32)


class ExpertLoader:
    """Reads expert parts into pool slots on ``threads`` threads (0: in the caller)."""

    def __init__(self, store: Store, spec: mwq.MWQSpec, threads: int = 4, verify: bool = True):
        if threads < 0:
            raise ValueError(f"loader threads must be >= 0, got {threads}")
        self.store = store
        self.spec = spec
        self.verify = bool(verify)
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="d2moe-load") if threads else None
        self._lock = threading.Lock()
        self._inflight: dict[tuple, Future] = {}
        self._local = threading.local()
        self.bytes_read = 0
        self.blocks_read = 0
        self.read_seconds = 0.0

    def submit(self, pool: PartPool, expert: int, slot: int,
               source: tuple[PartPool, int] | None = None) -> Future:
        """Start reading ``expert``'s part into ``slot`` of ``pool``; returns its future
        (bytes read). The same request while it is in flight returns the same future.
        ``source``: a lower level's (pool, slot) holding the same expert (kept pinned by
        the caller): its components are taken from there, only the ones above are read."""
        key = (id(pool), int(expert), int(slot))
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None and not fut.done():  # a finished read is not in flight:
                return fut  # the slot may have held another expert since
            if self._pool is None:
                fut = Future()
            else:
                fut = self._pool.submit(self._read, pool, int(expert), int(slot), source)
            self._inflight[key] = fut
        if self._pool is None:
            try:
                fut.set_result(self._read(pool, int(expert), int(slot), source))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                fut.set_exception(err)
        fut.add_done_callback(lambda _f, k=key: self._forget(k))
        return fut

    def load(self, pool: PartPool, expert: int, slot: int,
             source: tuple[PartPool, int] | None = None) -> int:
        """Read synchronously in the calling thread; returns the bytes read."""
        return self._read(pool, int(expert), int(slot), source)

    def _forget(self, key) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def _staging(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.buf = np.empty(nbytes, dtype=np.uint8)
        return buf

    def _read(self, pool: PartPool, expert: int, slot: int,
              source: tuple[PartPool, int] | None = None) -> int:
        start = time.perf_counter()
        part = pool.part
        if part.lo == part.hi:
            n = self._read_single(pool, part.lo, expert, slot)
            blocks = 1
        else:
            n, blocks = self._read_packed(pool, expert, slot, source)
        with self._lock:
            self.bytes_read += n
            self.blocks_read += blocks
            self.read_seconds += time.perf_counter() - start
        return n

    def _read_single(self, pool: PartPool, comp: int, expert: int, slot: int) -> int:
        """One component: tensors already in the slot's form are read in place."""
        store, layer = self.store, pool.layer
        block_bytes = store.block_bytes(layer, comp)
        specs = sorted(store.layout(layer, comp), key=lambda s: s.offset)
        binary = self.spec.component_bits(comp) == 1
        staging = self._staging(block_bytes)
        bufs, staged, pos = [], [], 0
        for spec in specs:
            if spec.offset > pos:  # padding between tensors: it is in the checksum
                bufs.append(staging[pos:spec.offset])
            dst = pool.views[spec.name][slot]
            field = spec.name.rsplit(".", 1)[1]
            converted = binary and field in ("weight", "scales")
            if dst.dtype == spec.np_dtype and not converted and dst.nbytes == spec.nbytes:
                bufs.append(dst)
            else:
                bufs.append(staging[spec.offset:spec.offset + spec.nbytes])
                staged.append(spec)
            pos = spec.offset + spec.nbytes
        if pos < block_bytes:
            bufs.append(staging[pos:block_bytes])
        n = store.read_block_scattered(layer, comp, expert, bufs, self.verify)
        for spec in staged:
            raw = staging[spec.offset:spec.offset + spec.nbytes].view(spec.np_dtype).reshape(spec.shape)
            proj, field = spec.name.rsplit(".", 1)
            if field == "weight":  # a binary plane: MLX 2-bit codes
                pool.views[spec.name][slot][...] = binary_to_2bit(raw)
            elif binary and field == "scales":  # +-s as 2-bit: scale 2s, bias -s
                s = raw.astype(np.float32)
                store_float(pool.views[spec.name][slot], 2 * s)
                store_float(pool.views[f"{proj}.biases"][slot], -s)
            else:
                store_float(pool.views[spec.name][slot], raw)
        return n

    def _read_packed(self, pool: PartPool, expert: int, slot: int,
                     source: tuple[PartPool, int] | None = None) -> tuple[int, int]:
        """Several components: read each block into staging, pack them into the slot
        (the ones a ``source`` slot holds are taken from it)."""
        store, layer, part = self.store, pool.layer, pool.part
        prefix = None
        first = part.lo
        if source is not None:
            src, src_slot = source
            prefix = (src.part, {name: _as_float32(view[src_slot]) if view.dtype != np.uint32
                                 else view[src_slot] for name, view in src.views.items()})
            first = src.part.hi + 1
        comps = range(first, part.hi + 1)
        sizes = [store.block_bytes(layer, c) for c in comps]
        staging = self._staging(sum(sizes))
        blocks, offset, n = {}, 0, 0
        for c, size in zip(comps, sizes):
            buf = staging[offset:offset + size]
            n += store.read_block_scattered(layer, c, expert, [buf], self.verify)
            blocks[c] = store.tensor_views(layer, c, buf)
            offset += size
        where = f"{store.expert_file(layer, part.lo)} (layer {layer} expert {expert})"
        for name, value in build_part(part, self.spec, blocks, where, prefix).items():
            dst = pool.views[name][slot]
            if name.endswith(".weight"):
                dst[...] = value
            else:
                store_float(dst, value)
        return n, len(comps)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
