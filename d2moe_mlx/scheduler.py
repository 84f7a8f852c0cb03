"""Per-layer expert scheduling: residency, load order, overlap, groups and prefetch.

For each MoE layer call the scheduler reads the router's choices back to the host
(one sync per layer: which experts to load cannot be known otherwise), pins the
experts it needs, gives the missing ones slots (evicting by the layer's policy)
and queues their loads hottest expert first, base plane before higher planes
(D²MoE's HEBF order). While the loads run, the pairs whose experts are resident
are computed; the rest follow as their planes arrive. A call that needs more
distinct experts than the cache has slots (long prefill) is computed in groups of
experts that fit. Outputs are evaluated before any of their slots is released.

``mode`` picks the behaviour benchmarks compare in one code path:
``stream`` (overlap, optional prefetch), ``sync`` (same cache, loads waited for
before any compute: an LRU offloader), ``naive`` (no cache: every needed expert
is read again each call, nothing overlaps).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .cache import FREE, CacheFullError, LayerCache, PlanePool
from .loader import ExpertLoader

MODES = ("stream", "sync", "naive")


@dataclass
class StreamStats:
    """Counters since the model was loaded (``snapshot``/``delta`` for one reply)."""

    steps: int = 0  # forward passes (layer-0 calls)
    tokens: int = 0  # tokens through layer 0
    lookups: int = 0  # (layer, component, distinct expert) needed by a call
    hits: int = 0  # ... of which resident and ready when the call began
    bytes_read: int = 0
    wait_seconds: float = 0.0  # main thread blocked on loads
    groups: int = 0  # calls split into expert groups (more experts than slots)
    predicted: int = 0  # prefetch: next-layer experts predicted
    predicted_right: int = 0  # ... that the next layer did use
    prefetch_loads: int = 0
    per_layer_hits: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.predicted_right / self.predicted if self.predicted else 0.0

    def snapshot(self) -> "StreamStats":
        return StreamStats(**{k: (dict(v) if isinstance(v, dict) else v)
                              for k, v in self.__dict__.items()})

    def delta(self, before: "StreamStats") -> "StreamStats":
        out = self.snapshot()
        for k, v in before.__dict__.items():
            if not isinstance(v, dict):
                setattr(out, k, getattr(out, k) - v)
        return out


class Scheduler:
    """Runs every streaming MoE layer of one model over its layer caches."""

    def __init__(self, caches: dict[int, LayerCache], loader: ExpertLoader, *,
                 mode: str = "stream", prefetch: bool = False, routers: dict | None = None,
                 overlap: bool = True, same_shapes: bool | None = None):
        if mode not in MODES:
            raise ValueError(f"scheduler mode must be one of {MODES}, got {mode!r}")
        self.caches = caches
        self.loader = loader
        self.mode = mode
        self.prefetch = prefetch
        self.overlap = overlap
        # GPU kernels round differently for different call shapes (measured on CUDA bf16:
        # 0.008-0.02 logit differences): there, every partial computation keeps the
        # resident call's shape, other experts routed to the all-zero slot, so the result
        # is bitwise the resident one at the cost of one extra pass per split. MLX's CPU
        # kernels give the same rows for sub-batches (tested), so the CPU computes subsets.
        self.same_shapes = mx.default_device() != mx.cpu if same_shapes is None else same_shapes
        self.routers = routers or {}  # layer -> callable(x) -> (logits, probabilities)
        self.stats = StreamStats()
        self._predicted: dict[int, np.ndarray] = {}
        self.attach(self.routers)

    def attach(self, routers: dict) -> None:
        """Take the layer caches as they are now (they may be filled after construction)
        and the routers (layer -> f(x) -> (logits, probabilities)) for scores and prefetch."""
        self.routers = routers
        self.layers = sorted(self.caches)
        self._next = {a: b for a, b in zip(self.layers, self.layers[1:])}

    # -- the layer call ---------------------------------------------------------
    def forward(self, layer: int, inner, x: mx.array, indices: mx.array) -> mx.array:
        """Compute mlx-lm switch module ``inner`` (projections over slot pools) on ``x``."""
        lc = self.caches[layer]
        for pool in lc.pools:
            self._settle(pool)
        scores = nxt = None
        if lc.policy.needs_scores and layer in self.routers:
            scores = self.routers[layer](x)[1].reshape(-1, lc.policy.num_experts).mean(axis=0)
        nl = self._next.get(layer)
        if self.prefetch and self.mode == "stream" and nl in self.routers and x.size == x.shape[-1]:
            nxt = self.routers[nl](x)[0].reshape(-1)
        mx.eval([a for a in (indices, scores, nxt) if a is not None])
        idx = np.array(indices).astype(np.int64)
        flat = idx.reshape(-1)
        experts, counts = np.unique(flat, return_counts=True)
        order = experts[np.argsort(-counts, kind="stable")]  # hottest first (HEBF)
        self._account(layer, lc, idx, experts)
        lc.policy.on_access(experts, counts)
        if scores is not None:
            lc.policy.on_scores(np.array(scores))
        if self.mode == "naive":
            for pool in lc.pools:
                self._drop_all(pool)
        pinned: list[tuple[PlanePool, np.ndarray]] = []
        try:
            if len(order) <= lc.capacity:
                futures = self._ensure(lc, order, pinned)
                if nxt is not None:
                    self._prefetch(nl, np.array(nxt), idx.shape[-1])
                y = self._compute(lc, inner, x, indices, idx, futures)
            else:
                y = self._grouped(lc, inner, x, indices, idx, order, pinned)
            mx.eval(y)
        finally:
            for pool, slots in pinned:
                pool.unpin(slots)
        return y

    def _compute(self, lc, inner, x, indices, idx, futures) -> mx.array:
        if not futures:
            self._tables(lc)
            return inner(x, indices)
        flat = idx.reshape(-1)
        ready = np.ones(flat.shape, dtype=bool)
        for pool in lc.pools:
            ready &= pool.resident(flat)
        if self.mode != "stream" or not self.overlap or not ready.any():
            self._wait(futures)
            self._tables(lc)
            return inner(x, indices)
        first = np.flatnonzero(ready)  # resident pairs: compute while the rest load
        rest = np.flatnonzero(~ready)
        if self.same_shapes:
            early = np.unique(flat[first])
            self._tables(lc, only=early)
            y_first = inner(x, indices)
            mx.async_eval(y_first)
            self._wait(futures)
            self._tables(lc, only=np.setdiff1d(np.unique(flat), early))
            return y_first + inner(x, indices)
        self._tables(lc)
        y_first = _pairs(inner, x, flat, idx.shape[-1], first)
        mx.async_eval(y_first)
        self._wait(futures)
        self._tables(lc)
        y_rest = _pairs(inner, x, flat, idx.shape[-1], rest)
        return _combine([y_first, y_rest], [first, rest], idx.shape)

    def _grouped(self, lc, inner, x, indices, idx, order, pinned) -> mx.array:
        """More distinct experts than slots: compute groups of experts that fit."""
        flat = idx.reshape(-1)
        outs, ids = [], []
        cap = lc.capacity
        for start in range(0, len(order), cap):
            group = order[start:start + cap]
            mine: list[tuple[PlanePool, np.ndarray]] = []
            try:
                self._wait(self._ensure(lc, group, mine))
                if self.same_shapes:  # the whole call, experts outside the group zeroed
                    self._tables(lc, only=group)
                    y = inner(x, indices)
                    y = y if not outs else outs.pop() + y
                else:
                    self._tables(lc)
                    sel = np.flatnonzero(np.isin(flat, group))
                    y = _pairs(inner, x, flat, idx.shape[-1], sel)
                    ids.append(sel)
                mx.eval(y)  # before the next group may evict these slots
            finally:
                for pool, slots in mine:
                    pool.unpin(slots)
            outs.append(y)
        self.stats.groups += 1
        return outs[0] if self.same_shapes else _combine(outs, ids, idx.shape)

    # -- residency and loads ------------------------------------------------------
    def _ensure(self, lc: LayerCache, experts: np.ndarray, pinned: list) -> list:
        """Pin ``experts`` in every pool, give missing ones slots and queue their loads
        (hottest expert first, components in order). Returns [(pool, slot, future)]."""
        for pool in lc.pools:
            self._settle(pool)
        new = {}
        for pool in lc.pools:
            have = pool.slot_of[experts]
            pool.pin(have[have >= 0])
            pinned.append((pool, have[have >= 0]))
            try:
                placed = lc.place(pool, experts)
            except CacheFullError:
                # Prefetches still in flight (mispredicted ones too) hold the slots this
                # call needs; they cannot be evicted while loading: let them land.
                self._wait_loading(pool)
                placed = lc.place(pool, experts)
            slots = np.array([s for _, s in placed], dtype=np.int64)
            pool.pin(slots)
            pinned.append((pool, slots))
            new[id(pool)] = dict(placed)
            for e, slot in zip(experts, have):  # a slot whose load failed or never ran
                if slot >= 0 and not pool.ready[slot] and int(slot) not in pool.loading:
                    new[id(pool)][int(e)] = int(slot)  # is loaded again, not read as zeros
        futures = []
        for e in experts:  # HEBF: the hottest expert's planes first, base plane first
            for pool in lc.pools:
                slot = int(pool.slot_of[e])
                if int(e) in new[id(pool)]:
                    if self.mode == "stream":
                        fut = self.loader.submit(pool, int(e), slot)
                        pool.loading[slot] = fut
                    else:
                        fut = _done(self._timed_load(pool, int(e), slot))
                        pool.loading[slot] = fut
                    futures.append((pool, slot, fut))
                elif slot in pool.loading:  # a prefetch in flight
                    futures.append((pool, slot, pool.loading[slot]))
        return futures

    def _wait_loading(self, pool: PlanePool) -> None:
        start = time.perf_counter()
        wait(list(pool.loading.values()))
        self.stats.wait_seconds += time.perf_counter() - start
        self._settle(pool)

    def _timed_load(self, pool: PlanePool, expert: int, slot: int) -> int:
        start = time.perf_counter()
        n = self.loader.load(pool, expert, slot)
        self.stats.wait_seconds += time.perf_counter() - start
        self.stats.bytes_read += n
        return n

    def _wait(self, futures: list) -> None:
        start = time.perf_counter()
        try:
            for pool, slot, fut in futures:
                self._finish(pool, slot, fut, fut.result())
        except BaseException:
            # Settle every other load before the error leaves: a read still running
            # must not land in a slot that is handed to another expert later.
            wait([f for _, _, f in futures if not f.cancel()])
            for pool, slot, fut in futures:
                if pool.loading.get(slot) is fut:
                    if not fut.cancelled() and fut.exception() is None:
                        self._finish(pool, slot, fut, fut.result())
                    else:
                        self._release(pool, slot)
            raise
        finally:
            self.stats.wait_seconds += time.perf_counter() - start

    def _finish(self, pool: PlanePool, slot: int, fut: Future, nbytes: int) -> None:
        if pool.loading.get(slot) is fut:
            del pool.loading[slot]
            pool.ready[slot] = True
            if self.mode == "stream":
                self.stats.bytes_read += nbytes

    def _settle(self, pool: PlanePool) -> None:
        """Mark finished background loads (prefetches) ready; raise a failed one's error."""
        for slot, fut in list(pool.loading.items()):
            if fut.done():
                if fut.exception() is not None:
                    self._release(pool, slot)
                    raise fut.exception()
                self._finish(pool, slot, fut, fut.result())

    @staticmethod
    def _release(pool: PlanePool, slot: int) -> None:
        pool.loading.pop(slot, None)
        e = pool.expert_of[slot]
        if e != FREE:
            pool.slot_of[e] = FREE
        pool.expert_of[slot] = FREE
        pool.ready[slot] = False

    def _drop_all(self, pool: PlanePool) -> None:
        for slot in np.flatnonzero(pool.expert_of != FREE):
            if pool.pins[slot] == 0 and slot not in pool.loading:
                self._release(pool, int(slot))

    def _prefetch(self, layer: int, logits: np.ndarray, k: int) -> None:
        """Start loading the experts ``layer``'s router picks from this layer's input."""
        lc = self.caches[layer]
        pred = np.argsort(-logits, kind="stable")[:k]
        self._predicted[layer] = pred
        for pool in lc.pools:
            self._settle(pool)
            try:
                placed = lc.place(pool, pred)
            except RuntimeError:
                continue  # no evictable slot: skip this prefetch
            for e, slot in placed:
                pool.loading[slot] = self.loader.submit(pool, e, slot)
                self.stats.prefetch_loads += 1

    # -- bookkeeping ------------------------------------------------------------
    def _tables(self, lc: LayerCache, only: np.ndarray | None = None) -> None:
        lc.tables = [pool.table(only) for pool in lc.pools]

    def _account(self, layer: int, lc: LayerCache, idx: np.ndarray, experts: np.ndarray) -> None:
        s = self.stats
        if layer == self.layers[0]:
            s.steps += 1
            s.tokens += int(np.prod(idx.shape[:-1]))
        for pool in lc.pools:
            hits = int(pool.resident(experts).sum())
            s.lookups += len(experts)
            s.hits += hits
            h, n = s.per_layer_hits.get(layer, (0, 0))
            s.per_layer_hits[layer] = (h + hits, n + len(experts))
        pred = self._predicted.pop(layer, None)
        if pred is not None and idx.size == idx.shape[-1]:
            s.predicted += idx.shape[-1]
            s.predicted_right += int(np.isin(idx.reshape(-1), pred).sum())


def _done(value) -> Future:
    fut = Future()
    fut.set_result(value)
    return fut


def _pairs(inner, x: mx.array, flat: np.ndarray, k: int, ids: np.ndarray) -> mx.array:
    """Outputs [len(ids), H] of the (token, expert) pairs ``ids`` (flat pair numbers)."""
    x2 = x.reshape(-1, x.shape[-1])
    xs = x2[mx.array((ids // k).astype(np.int32))]
    ii = mx.array(flat[ids].astype(np.uint32))[:, None]
    y = inner(xs, ii)
    return y.reshape(len(ids), y.shape[-1])


def _combine(outs: list, ids: list, shape: tuple) -> mx.array:
    """Put pair outputs back in pair order: [..., K, H]."""
    y = mx.concatenate(outs, axis=0)
    inv = np.argsort(np.concatenate(ids), kind="stable")
    y = y[mx.array(inv.astype(np.int32))]
    return y.reshape(*shape, y.shape[-1])
