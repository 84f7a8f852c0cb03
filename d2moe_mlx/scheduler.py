"""Per-layer expert scheduling: levels, residency, load order, overlap and groups.

Resident-like calls (every expert of the running level ready in the pools, one
level for every pair) go straight to the expert layer: no host sync, no Python
over experts. Otherwise the scheduler reads the router's choices back to the host
(the one sync per MoE layer: which experts to load cannot be known otherwise; the
previous call's outputs are evaluated in the same sync, so their pins are
released then), asks the level policy for each pair's level, pins the parts the
pairs need (:meth:`~d2moe_mlx.cache.ExpertCache.acquire`), and queues the loads
hottest expert first, lower parts first (D²MoE's HEBF order). While they run the
pairs whose parts are ready are computed; the rest follow. A call that needs
more distinct experts than the pools hold (a long prefill) is computed in groups
of experts, the next group's reads overlapping the current group's compute. A
token may name one expert several times (:mod:`.pairs`): it is placed, read and
counted once per call, and every pair is computed.

``mode`` picks the behaviour benchmarks compare in one code path: ``stream``
(overlap, optional prefetch), ``sync`` (same cache, loads waited for before any
compute: an LRU offloader), ``naive`` (no cache: every needed expert is read
again each call, nothing overlaps).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, wait

import mlx.core as mx
import numpy as np

from .cache import CacheFullError, ExpertCache
from .layout import Layout
from .levels import Call, LevelPolicy, fit_pools
from .loader import ExpertLoader
from .pairs import distinct_experts
from .stats import StreamStats

MODES = ("stream", "sync", "naive")
LOAD_ORDERS = ("hebf", "fifo")  # hottest expert first (its parts ascending), or first come


class Scheduler:
    """Runs every MoE layer of one model over its expert caches."""

    def __init__(self, caches: dict[int, ExpertCache], loader: ExpertLoader, layout: Layout,
                 levels: LevelPolicy, gating, *, mode: str = "stream", prefetch: bool = False,
                 overlap: bool = True, same_shapes: bool | None = None, load_order: str = "hebf",
                 phases: int = 2):
        if mode not in MODES:
            raise ValueError(f"scheduler mode must be one of {MODES}, got {mode!r}")
        if load_order not in LOAD_ORDERS:
            raise ValueError(f"load order must be one of {LOAD_ORDERS}, got {load_order!r}")
        if phases < 1:
            raise ValueError(f"phases must be >= 1, got {phases}")
        self.load_order = load_order
        self.phases = phases
        self.costs = None  # a Profile of the store on this machine, when one was measured
        self.caches = caches
        self.loader = loader
        self.layout = layout
        self._cover = {lv: tuple(layout.cover(lv)) for lv in range(len(layout.parts))}
        self.levels = levels
        self.gating = gating
        self.mode = mode
        self.prefetch = prefetch
        self.overlap = overlap
        # GPU kernels round differently for different call shapes (measured on CUDA bf16:
        # 0.008-0.02 logit differences): there every partial computation keeps the
        # resident call's shape, other pairs routed to the all-zero slot, so the result
        # is bitwise the resident one. MLX's CPU kernels give the same rows for subsets.
        self.same_shapes = mx.default_device() != mx.cpu if same_shapes is None else same_shapes
        self.stats = StreamStats()
        self.fast_path = True  # resident-like calls skip the sync (benchmarks turn it off)
        self.layers = sorted(caches)
        self._next = dict(zip(self.layers, self.layers[1:]))
        self._inflight: dict[tuple[int, int, int], Future] = {}  # (layer, part, slot) -> load
        self._pending: list = []  # (outputs, [(cache, part, slots)]) awaiting their eval
        self._predicted: dict[int, np.ndarray] = {}
        self._layers_by_index: dict[int, object] = {}
        # Prefetch: predict(layer, x) -> scores [..., E] of ``layer``'s experts from the input x
        # of the MoE layer before it (lazy, evaluated in that layer's sync); None: layer's own
        # router on x. prefetch_top: experts prefetched per layer (None: the top-k).
        self.predict = None
        self.prefetch_top: int | None = None

    # -- the layer call -------------------------------------------------------------
    def forward(self, el, x: mx.array, inds: mx.array) -> mx.array:
        s = self.stats
        start, blocked = time.perf_counter(), s.wait_seconds + s.sync_seconds
        try:
            return self._forward(el, x, inds)
        finally:
            s.calls += 1
            s.host_seconds += time.perf_counter() - start - (s.wait_seconds + s.sync_seconds - blocked)

    def _forward(self, el, x: mx.array, inds: mx.array) -> mx.array:
        lc = self.caches[el.layer]
        level = self.levels.uniform
        if level is not None and self.mode != "naive" and self.fast_path:
            parts = self.layout.cover(level)
            if all(lc.pools[p].all_ready() for p in parts):
                self._count_fast(el.layer, lc, parts, inds, level)
                y = el.compute(x, [(lc.pools[p], lc.pools[p].indices(inds)) for p in parts])
                self._start(y)
                return y
        return self._scheduled(el, lc, x, inds)

    def _scheduled(self, el, lc: ExpertCache, x: mx.array, inds: mx.array) -> mx.array:
        scores = el.scores(x) if (self.levels.needs_scores or lc.policy.needs_scores) else None
        nl = self._next.get(el.layer)
        nxt = None
        if self.prefetch and self.mode == "stream" and nl is not None and x.size == x.shape[-1]:
            nxt = (self.predict(nl, x) if self.predict is not None
                   else self._layers_by_index[nl].scores_for(x)).reshape(-1)
        outs = [o for o, _ in self._pending]
        t0 = time.perf_counter()
        mx.eval(inds, *[a for a in (scores, nxt) if a is not None], *outs)  # the sync
        self.stats.sync_seconds += time.perf_counter() - t0
        self.stats.syncs += 1
        self._release_pending()
        self._settle(el.layer)
        idx = np.array(inds)
        k = idx.shape[-1]
        flat = idx.reshape(-1)
        level = self.levels.uniform
        if (level is not None and self.mode != "naive" and scores is None
                and all(lc.pools[p].ready(flat).all() for p in self.layout.cover(level))):
            # Every pair hits: start the compute now, keep the books (and prefetch) while it runs.
            parts = self.layout.cover(level)
            y = el.compute(x, [(lc.pools[p], lc.pools[p].indices(inds)) for p in parts])
            self._start(y)
            self._books(el.layer, lc, idx, flat, level, y)
            if nxt is not None:
                self._prefetch(nl, np.array(nxt), self.prefetch_top or k)
            self._route(el.layer, idx)
            return y
        full = pair_scores = None
        if scores is not None:
            full = np.array(scores).reshape(-1, scores.shape[-1])
            pair_scores = np.take_along_axis(full, flat.reshape(-1, k), -1)
            lc.policy.on_scores(full.mean(axis=0))
        if level is not None:
            levels = level
        else:
            costs = self.costs
            decision = self.levels.decide(Call(
                el.layer, flat.reshape(-1, k), pair_scores, full, self._ready(lc),
                costs.read_s if costs else None, costs.compute_s if costs else None))
            levels = decision.levels
            if decision.ids is not None:  # substitutions: other experts run in those pairs
                idx = decision.ids.reshape(idx.shape).astype(idx.dtype)
                flat = idx.reshape(-1)
                inds = mx.array(idx)
                self.stats.substituted += decision.substituted
                if full is not None:
                    pair_scores = np.take_along_axis(full, flat.reshape(-1, k), -1)
            if np.ndim(levels):  # a call that fits the floor's pools runs in one pass
                levels = fit_pools(flat.reshape(-1, k), np.asarray(levels).reshape(-1, k),
                                   pair_scores, self.levels.floor, self._cover,
                                   {p: pool.capacity for p, pool in enumerate(lc.pools)
                                    if pool is not None})
        experts, first, counts = distinct_experts(flat, k)  # a token may repeat an expert
        if flat.size == k:  # one token (decode): its experts are equally hot
            order = experts
        else:
            if self.load_order == "hebf":
                order = experts[np.argsort(-counts, kind="stable")]  # hottest first
            else:
                order = experts[np.argsort(first, kind="stable")]  # as the pairs come
        lc.policy.on_access(experts, counts)
        groups = self._level_groups(levels, flat.size)
        self._account(el.layer, lc, idx, groups, flat, experts)
        if self.mode == "naive":
            for p in range(len(lc.pools)):
                lc.drop(p)  # (pools the layout does not use are None)
        needed = sorted({p for lv in groups for p in self.layout.cover(lv)})
        if self._over(lc, needed, order, groups, flat):
            return self._grouped(el, lc, x, idx, order, groups)
        pins, futures = self._ensure(lc, needed, order, groups, flat)
        try:
            if nxt is not None:
                self._prefetch(nl, np.array(nxt), self.prefetch_top or k)
            self._route(el.layer, idx)
            y = self._compute(el, lc, x, inds, idx, groups, futures)
        except BaseException:
            self._unpin(pins)
            raise
        self._pending.append((y, pins))
        return y

    def _over(self, lc: ExpertCache, needed, order, groups, flat) -> bool:
        """Whether a part would need more distinct experts at once than it has slots."""
        if len(groups) == 1:
            return len(order) > lc.capacity(needed)
        for p in needed:
            users = np.concatenate([flat[ids] for lv, ids in groups.items()
                                    if p in self.layout.cover(lv)])
            if np.unique(users).size > lc.pools[p].capacity:
                return True
        return False

    def _ready(self, lc: ExpertCache) -> np.ndarray:
        """[levels, E]: which experts of the layer can run at each level with no read."""
        rows = []
        for level in range(len(self.layout.parts)):
            pools = [lc.pools[p] for p in self.layout.cover(level)]
            if any(pool is None for pool in pools):
                rows.append(np.zeros(lc.pools[self._any_part(lc)].num_experts, dtype=bool))
                continue
            ready = pools[0].is_ready
            for pool in pools[1:]:
                ready = ready & pool.is_ready
            rows.append(ready)
        return np.stack(rows)

    @staticmethod
    def _any_part(lc: ExpertCache) -> int:
        return next(i for i, pool in enumerate(lc.pools) if pool is not None)

    def _start(self, y: mx.array) -> None:
        """Start computing ``y`` now (the next layer's graph is built meanwhile). MLX may
        block here while the stream is busy: that time counts as sync time."""
        t0 = time.perf_counter()
        mx.async_eval(y)
        self.stats.sync_seconds += time.perf_counter() - t0

    def _books(self, layer: int, lc: ExpertCache, idx: np.ndarray, flat: np.ndarray, level: int,
               y: mx.array) -> None:
        """A call whose every pair hit: policy, counters and pins (no loads, no evictions)."""
        k = idx.shape[-1]
        experts, _, counts = distinct_experts(flat, k)
        lc.policy.on_access(experts, counts)
        parts = self.layout.cover(level)
        s, n = self.stats, len(experts) * len(parts)
        if layer == self.layers[0]:
            s.steps += 1
            s.tokens += flat.size // k
        s.pairs[level] = s.pairs.get(level, 0) + flat.size
        s.lookups += n
        s.hits += n
        h, m = s.per_layer_hits.get(layer, (0, 0))
        s.per_layer_hits[layer] = (h + n, m + n)
        self._score_prediction(layer, idx, experts)
        self._pending.append((y, [(lc, p, lc.acquire(p, experts)[0]) for p in parts]))

    # -- compute ------------------------------------------------------------------------
    def _compute(self, el, lc, x, inds, idx, groups, futures) -> mx.array:
        if futures and self.mode == "stream" and self.overlap:
            return self._progressive(el, lc, x, idx, groups, futures)
        self._wait(lc, futures)
        if len(groups) == 1:
            (level,) = groups
            parts = self.layout.cover(level)
            return el.compute(x, [(lc.pools[p], lc.pools[p].indices(inds)) for p in parts])
        same = self._same(groups)
        return self._merge([self._partial(el, lc, x, idx, groups, same)], idx, same)

    def _progressive(self, el, lc, x, idx, groups, futures) -> mx.array:
        """HEBF's compute side: the pairs whose parts are ready run first; then, in at most
        ``phases`` waves of the loads (hottest expert's first), each wave's pairs run as
        soon as its loads land, while the next wave still loads."""
        flat = idx.reshape(-1)
        todo = dict(groups)
        experts = []
        for p, s, _ in futures:  # the loads' experts, in HEBF order
            e = int(lc.pools[p].expert_of[s])
            if e not in experts:
                experts.append(e)
        n = max(1, min(self.phases, len(experts)))
        waves = [experts[i * len(experts) // n:(i + 1) * len(experts) // n] for i in range(n)]
        partials = []
        same = self._same(groups)
        for wave in [[]] + waves:
            if wave:
                self._wait(lc, [f for f in futures if int(lc.pools[f[0]].expert_of[f[1]]) in wave
                                or lc.pools[f[0]].expert_of[f[1]] < 0])
            ready = {}
            for level, ids in todo.items():
                ok = np.ones(ids.shape, dtype=bool)
                for p in self.layout.cover(level):
                    ok &= lc.pools[p].ready(flat[ids])
                if ok.any():
                    ready[level] = ids[ok]
                    todo[level] = ids[~ok]
            if ready:
                part = self._partial(el, lc, x, idx, ready, same)
                mx.async_eval(part if same else [y for _, y in part])
                partials.append(part)
        self._wait(lc, futures)  # (any left: loads of other calls this one shares)
        rest = {lv: ids for lv, ids in todo.items() if ids.size}
        if rest:
            partials.append(self._partial(el, lc, x, idx, rest, same))
        return self._merge(partials, idx, same)

    def _same(self, groups: dict) -> bool:
        """Same-shape partials keep a single-level call bitwise equal to the resident one
        on the GPU; a call with several levels has no resident twin, and there each level
        computing only its own pairs costs one pass over the pairs, not one per level."""
        return self.same_shapes and len(groups) == 1

    def _partial(self, el, lc, x, idx, groups: dict[int, np.ndarray], same: bool):
        """Outputs of the pairs in ``groups`` (level -> flat pair ids), from slot ids
        made on the host now (the tables may change while this is evaluated).
        Same-shape mode: the whole call per level, other pairs on the zero slot
        (returns [..., k, H]); else only those pairs (returns (ids, [P, H]))."""
        flat = idx.reshape(-1)
        k = idx.shape[-1]
        outs = []
        for level, ids in groups.items():
            parts = self.layout.cover(level)
            if same:
                slots = []
                for p in parts:
                    pool = lc.pools[p]
                    s = np.full(flat.shape, pool.zero_slot, dtype=np.uint32)
                    s[ids] = pool.slot_of[flat[ids]] if not pool.identity else flat[ids]
                    slots.append((pool, mx.array(s.reshape(idx.shape))))
                outs.append(el.compute(x, slots))
            else:
                x2 = x.reshape(-1, x.shape[-1])
                xs = x2[mx.array((ids // k).astype(np.int32))]
                slots = []
                for p in parts:
                    pool = lc.pools[p]
                    s = flat[ids] if pool.identity else pool.slot_of[flat[ids]]
                    slots.append((pool, mx.array(s.astype(np.uint32))[:, None]))
                y = el.compute(xs, slots)
                outs.append((ids, y.reshape(len(ids), y.shape[-1])))
        if same:
            total = outs[0]
            for o in outs[1:]:
                total = total + o
            return total
        return outs

    def _merge(self, partials: list, idx: np.ndarray, same: bool) -> mx.array:
        """Sum same-shape partials, or put pair outputs back in pair order [..., k, H]."""
        if same:
            total = partials[0]
            for p in partials[1:]:
                total = total + p
            return total
        pieces = [piece for part in partials for piece in part]
        ids = np.concatenate([i for i, _ in pieces])
        y = mx.concatenate([v for _, v in pieces], axis=0)
        inv = np.argsort(ids, kind="stable")
        y = y[mx.array(inv.astype(np.int32))]
        return y.reshape(*idx.shape, y.shape[-1])

    def _grouped(self, el, lc, x, idx, order, groups) -> mx.array:
        """More distinct experts than slots: compute groups of experts that fit, the
        next group's loads running while the current group computes."""
        flat = idx.reshape(-1)
        needed = sorted({p for lv in groups for p in self.layout.cover(lv)})
        cap = lc.capacity(needed)
        overlap = self.mode == "stream" and self.overlap and cap >= 2
        size = cap // 2 if overlap else cap
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        self.stats.groups += 1
        same = self._same(groups)
        partials, held = [], []
        try:
            pins, futures = self._ensure(lc, needed, chunks[0], groups, flat)
            held.append(pins)
            self._wait(lc, futures)
            for i, chunk in enumerate(chunks):
                mine = {lv: ids[np.isin(flat[ids], chunk)] for lv, ids in groups.items()}
                y = self._partial(el, lc, x, idx, {lv: ids for lv, ids in mine.items() if ids.size},
                                  same)
                nxt = None
                if overlap and i + 1 < len(chunks):  # the next group loads while this computes
                    nxt = self._ensure(lc, needed, chunks[i + 1], groups, flat)
                    held.append(nxt[0])
                t0 = time.perf_counter()
                mx.eval(y if same else [v for _, v in y])  # before these slots may be evicted
                self.stats.sync_seconds += time.perf_counter() - t0
                self._unpin(pins)
                held.remove(pins)
                partials.append(y)
                if nxt is None and i + 1 < len(chunks):
                    nxt = self._ensure(lc, needed, chunks[i + 1], groups, flat)
                    held.append(nxt[0])
                if nxt is not None:
                    pins, futures = nxt
                    self._wait(lc, futures)
        except BaseException:
            for pins in held:
                self._unpin(pins)
            raise
        return self._merge(partials, idx, same)

    # -- residency ----------------------------------------------------------------------
    def _ensure(self, lc: ExpertCache, needed: list[int], experts: np.ndarray, groups, flat):
        """Pin and place what the pairs of ``experts`` need; start their loads (HEBF:
        hottest expert first, lower parts first). Returns (pins, futures)."""
        if len(groups) == 1:  # every expert needs every part of the one level
            wanted = {p: experts for p in needed}
        else:
            wanted = {}
            for p in needed:
                users = [flat[ids] for lv, ids in groups.items() if p in self.layout.cover(lv)]
                wanted[p] = experts[np.isin(experts, np.concatenate(users))]
        pins, loads = [], []
        try:
            for p in needed:
                spare = self._spare(lc, p)
                try:
                    slots, to_load = lc.acquire(p, wanted[p], spare)
                except CacheFullError:
                    # loads in flight (prefetches) hold the slots this call needs: let them land
                    self._wait_layer(lc)
                    slots, to_load = lc.acquire(p, wanted[p], spare)
                pins.append((lc, p, slots))
                loads += [(p, e, s) for e, s in to_load]
        except BaseException:
            self._unpin(pins)
            raise
        futures = []
        if loads:
            rank = {int(e): i for i, e in enumerate(experts)}
            loads.sort(key=lambda t: (rank[t[1]], t[0]))
        for p, e, s in loads:
            pool = lc.pools[p]
            source = self._source(lc, p, e, pins)
            if self.mode == "stream":
                fut = self.loader.submit(pool, e, s, source)
            else:
                fut = Future()
                try:
                    fut.set_result(self._timed_load(pool, e, s, source))
                except BaseException as err:  # noqa: BLE001 - raised by _wait
                    fut.set_exception(err)
            self._inflight[(lc.layer, p, s)] = fut
            futures.append((p, s, fut))
        if len(self._inflight) > len(futures):  # loads already in flight (prefetches) it needs
            mine = {id(f) for _, _, f in futures}
            for p in needed:
                for s in lc.pools[p].slot_of[wanted[p]]:
                    fut = self._inflight.get((lc.layer, p, int(s)))
                    if fut is not None and id(fut) not in mine:
                        futures.append((p, int(s), fut))
        return pins, futures

    def _spare(self, lc: ExpertCache, part: int) -> np.ndarray | None:
        """Levels layout: experts of pool ``part`` also ready at a lower level (evicted
        first: D²MoE's budget rule, high planes before low ones)."""
        if self.layout.kind != "levels":
            return None
        lower = [lc.pools[q].is_ready for q in range(part) if lc.pools[q] is not None]
        return np.logical_or.reduce(lower) if lower else None

    def _source(self, lc: ExpertCache, part: int, expert: int, pins: list):
        """Levels layout: the highest lower level's (pool, slot) where ``expert`` is ready,
        pinned with the call's pins, so that only the components above it are read."""
        if self.layout.kind != "levels" or self.mode == "naive":
            return None
        for q in range(part - 1, -1, -1):
            pool = lc.pools[q]
            if pool is not None and pool.is_ready[expert]:
                slots, _ = lc.acquire(q, np.array([expert]))  # pins the ready slot
                pins.append((lc, q, slots))
                return pool, int(pool.slot_of[expert])
        return None

    def _timed_load(self, pool, expert: int, slot: int, source=None) -> int:
        start = time.perf_counter()
        n = self.loader.load(pool, expert, slot, source)
        self.stats.wait_seconds += time.perf_counter() - start
        return n

    def _wait(self, lc: ExpertCache, futures: list) -> None:
        """Wait for ``futures`` and record them in the cache; a failed load frees its
        slot (it is read again next time, never computed as zeros) and is raised."""
        start = time.perf_counter()
        try:
            wait([f for _, _, f in futures])
        finally:
            self.stats.wait_seconds += time.perf_counter() - start
        error = None
        for p, s, fut in futures:
            if self._inflight.get((lc.layer, p, s)) is not fut:
                continue  # already recorded
            del self._inflight[(lc.layer, p, s)]
            if fut.exception() is None:
                lc.loaded(p, s)
                self.stats.bytes_read += fut.result()
            else:
                lc.failed(p, s)
                error = error or fut.exception()
        if error is not None:
            raise error

    def _wait_layer(self, lc: ExpertCache) -> None:
        futures = [(p, s, f) for (l, p, s), f in self._inflight.items() if l == lc.layer]
        self._wait(lc, futures)

    def _settle(self, layer: int) -> None:
        """Record finished background loads (prefetches) of ``layer``; raise a failed one."""
        lc = self.caches[layer]
        done = [(p, s, f) for (l, p, s), f in self._inflight.items() if l == layer and f.done()]
        if done:
            self._wait(lc, done)

    def _release_pending(self) -> None:
        for _, pins in self._pending:
            self._unpin(pins)
        self._pending.clear()

    @staticmethod
    def _unpin(pins) -> None:
        for lc, p, slots in pins:
            if len(slots):
                lc.release(p, slots)

    def drain(self) -> None:
        """Evaluate pending outputs, release their pins and land every load in flight
        (before the caches are changed from outside a call, e.g. a level switch)."""
        mx.eval([o for o, _ in self._pending])
        self._release_pending()
        for layer in self.layers:
            self._wait_layer(self.caches[layer])

    def _prefetch(self, layer: int, scores: np.ndarray, k: int) -> None:
        """Start loading the ``k`` experts ``scores`` rank first for ``layer``."""
        if self.levels.uniform is None:
            return
        pred = np.argsort(-scores, kind="stable")[:k]
        self._predicted[layer] = pred
        self._load_ahead(layer, pred)

    def _route(self, layer: int, idx: np.ndarray) -> None:
        """Tell the next layer's policy this call's routing (``on_route``) and, streaming,
        start loading the experts it asks for (the ``cooc`` policy's loads ahead)."""
        nl = self._next.get(layer)
        if nl is None:
            return
        ahead = self.caches[nl].policy.on_route(idx.reshape(-1, idx.shape[-1]))
        if len(ahead) and self.mode == "stream" and self.levels.uniform is not None:
            self._load_ahead(nl, np.asarray(ahead, dtype=np.int64))

    def _load_ahead(self, layer: int, pred: np.ndarray) -> None:
        """Start loading ``pred`` into ``layer``'s pools of the running level (no pins)."""
        lc = self.caches[layer]
        level = self.levels.uniform
        self._settle(layer)
        for p in self.layout.cover(level):
            try:
                slots, to_load = lc.acquire(p, pred)
            except CacheFullError:
                continue  # no evictable slot: skip this prefetch
            lc.release(p, slots)  # a loading slot is never evicted; nothing else to hold
            for e, s in to_load:
                self._inflight[(layer, p, s)] = self.loader.submit(lc.pools[p], e, s)
                self.stats.prefetch_loads += 1

    # -- bookkeeping --------------------------------------------------------------------
    def _level_groups(self, levels, n: int) -> dict[int, np.ndarray]:
        if np.ndim(levels) == 0:
            return {int(levels): np.arange(n)}
        levels = np.asarray(levels).reshape(-1)
        return {int(lv): np.flatnonzero(levels == lv) for lv in np.unique(levels)}

    def _count_fast(self, layer: int, lc: ExpertCache, parts, inds: mx.array, level: int) -> None:
        """Counters of a call that needed no sync: every lookup hit. Distinct experts are
        not known without reading the ids back: min(pairs, experts) stands in for them
        (exact for a decode step whose k experts are distinct; more when a token repeats one)."""
        s = self.stats
        pairs = inds.size
        if layer == self.layers[0]:
            s.steps += 1
            s.tokens += pairs // inds.shape[-1]
        s.pairs[level] = s.pairs.get(level, 0) + pairs
        n = min(pairs, lc.pools[parts[0]].num_experts) * len(parts)
        s.lookups += n
        s.hits += n
        h, m = s.per_layer_hits.get(layer, (0, 0))
        s.per_layer_hits[layer] = (h + n, m + n)

    def _account(self, layer: int, lc: ExpertCache, idx: np.ndarray, groups, flat,
                 all_experts: np.ndarray) -> None:
        s = self.stats
        if layer == self.layers[0]:
            s.steps += 1
            s.tokens += int(np.prod(idx.shape[:-1]))
        for level, ids in groups.items():
            s.pairs[level] = s.pairs.get(level, 0) + len(ids)
            experts = all_experts if len(groups) == 1 else np.unique(flat[ids])
            for p in self.layout.cover(level):
                hits = int(lc.pools[p].ready(experts).sum())
                s.lookups += len(experts)
                s.hits += hits
                h, n = s.per_layer_hits.get(layer, (0, 0))
                s.per_layer_hits[layer] = (h + hits, n + len(experts))
        self._score_prediction(layer, idx, all_experts)

    def _score_prediction(self, layer: int, idx: np.ndarray, experts: np.ndarray) -> None:
        """Prefetch accuracy: how many of a decode step's (distinct) experts were prefetched."""
        pred = self._predicted.pop(layer, None)
        if pred is not None and idx.size == idx.shape[-1]:
            self.stats.predicted += len(experts)
            self.stats.predicted_right += int(np.isin(experts, pred).sum())
