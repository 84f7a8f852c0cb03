"""Async expert loader: a thread pool that preads blocks straight into cache slots.

Loader threads only do I/O into evaluated buffers (numpy views of MLX arrays) and
never touch MLX graphs: streams and graphs belong to the main thread. Tensors the
slot holds in their stored form (packed codes; float16 scales when activations are
float16) are read in place; the rest (scales in another float dtype, binary planes
expanded to 2 bits) go through a per-thread staging buffer and are converted into
the slot. Each block's checksum is verified the first time it is read. A request
for a block that is already being read returns the same future, so it is read
once. Errors reach the caller through the future, naming the file and block.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .cache import PlanePool
from .packing import binary_to_2bit
from .store.reader import Store

VERIFY_MODES = ("first", "always", "never")


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 words of float values, rounded to nearest even (as MLX's astype)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _store_float(dst: np.ndarray, src: np.ndarray) -> None:
    """Write float values ``src`` into a slot view (uint16 words for bfloat16 pools)."""
    if dst.dtype == np.uint16:
        dst[...] = float_to_bf16_bits(src.astype(np.float32)).reshape(dst.shape)
    else:
        np.copyto(dst, src.reshape(dst.shape), casting="unsafe")


class ExpertLoader:
    """Reads expert blocks into pool slots on ``threads`` threads (0: in the caller)."""

    def __init__(self, store: Store, threads: int = 4, verify: str = "first"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        if threads < 0:
            raise ValueError(f"loader threads must be >= 0, got {threads}")
        self.store = store
        self.verify = verify
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="d2moe-load") if threads else None
        self._lock = threading.Lock()
        self._inflight: dict[tuple, Future] = {}
        self._verified: set[tuple[int, int, int]] = set()
        self._local = threading.local()
        self.bytes_read = 0
        self.blocks_read = 0
        self.read_seconds = 0.0

    def submit(self, pool: PlanePool, expert: int, slot: int) -> Future:
        """Start reading ``expert``'s block of ``pool`` into ``slot``; returns its future.

        The same request while it is in flight returns the same future."""
        key = (pool.layer, pool.component, int(expert), int(slot), id(pool))
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None and not fut.done():  # a finished read is not in flight:
                return fut  # the slot may have held another expert since
            if self._pool is None:
                fut = Future()
                self._inflight[key] = fut
            else:
                fut = self._pool.submit(self._read, pool, int(expert), int(slot))
                self._inflight[key] = fut
        if self._pool is None:
            try:
                fut.set_result(self._read(pool, int(expert), int(slot)))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                fut.set_exception(err)
        fut.add_done_callback(lambda _f, k=key: self._forget(k))
        return fut

    def load(self, pool: PlanePool, expert: int, slot: int) -> int:
        """Read synchronously in the calling thread; returns the bytes read."""
        return self._read(pool, int(expert), int(slot))

    def _forget(self, key) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def _staging(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.buf = np.empty(nbytes, dtype=np.uint8)
        return buf

    def _read(self, pool: PlanePool, expert: int, slot: int) -> int:
        start = time.perf_counter()
        staging = self._staging(pool.block_bytes)
        bufs, staged, pos = [], [], 0
        for spec in pool.specs:
            if spec.offset > pos:  # padding between tensors: it is in the checksum
                bufs.append(staging[pos:spec.offset])
            dst = pool.views[spec.name][slot]
            field = spec.name.rsplit(".", 1)[1]
            # A binary plane's codes and scales are converted (2-bit codes, scale 2s,
            # bias -s) even where the stored dtype is the slot's (float16 scales).
            converted = pool.binary and field in ("weight", "scales")
            if dst.dtype == spec.np_dtype and not converted and dst.nbytes == spec.nbytes:
                bufs.append(dst)
            else:
                bufs.append(staging[spec.offset:spec.offset + spec.nbytes])
                staged.append(spec)
            pos = spec.offset + spec.nbytes
        if pos < pool.block_bytes:
            bufs.append(staging[pos:pool.block_bytes])
        block = (pool.layer, pool.component, expert)
        verify = self.verify == "always" or (self.verify == "first" and block not in self._verified)
        n = self.store.read_block_scattered(pool.layer, pool.component, expert, bufs, verify)
        if verify:
            self._verified.add(block)
        for spec in staged:
            self._convert(pool, spec, staging[spec.offset:spec.offset + spec.nbytes], slot)
        with self._lock:
            self.bytes_read += n
            self.blocks_read += 1
            self.read_seconds += time.perf_counter() - start
        return n

    @staticmethod
    def _convert(pool: PlanePool, spec, raw: np.ndarray, slot: int) -> None:
        src = raw.view(spec.np_dtype).reshape(spec.shape)
        proj, field = spec.name.rsplit(".", 1)
        if field == "weight":  # a binary plane: MLX 2-bit codes
            pool.views[spec.name][slot][...] = binary_to_2bit(src)
        elif pool.binary and field == "scales":  # +-s as 2-bit: scale 2s, bias -s
            s = src.astype(np.float32)
            _store_float(pool.views[spec.name][slot], 2 * s)
            _store_float(pool.views[f"{proj}.biases"][slot], -s)
        else:
            _store_float(pool.views[spec.name][slot], src)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
