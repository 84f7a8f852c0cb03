"""The expert cache: per MoE layer, one fixed-capacity slot pool per layout part.

A :class:`PartPool` holds, for one (layer, part), an evaluated MLX array per
tensor with ``capacity + 1`` slots along axis 0 (the last slot stays all zero: a
pair routed to it contributes nothing), writable numpy views of them (the loader
reads blocks straight into slot memory), and an ``expert -> slot`` table that
``gather_qmm`` indices go through. Nothing is stacked or copied per token.

:class:`ExpertCache` owns every piece of residency state of one layer and is the
only code that changes it. Each slot moves through

    free -> loading -> ready (-> evicted: free)      loading -> free (the load failed)

and is *pinned* while a computation may read it or a load fills it; a pinned or
loading slot is never chosen for eviction. The scheduler asks for the experts a
call needs (:meth:`ExpertCache.acquire`: pins, placements, loads to issue),
reports finished loads (:meth:`loaded` / :meth:`failed`) and releases pins after
the call's outputs are evaluated (:meth:`release`). Residency is per part: an
expert can be ready in its base pool while its upper planes are not.

The table is an MLX array written in place through a numpy view: it is only
changed at the scheduler's sync points, when no pending computation reads it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .layout import Part
from .policies import EvictionPolicy

FREE, LOADING, READY = 0, 1, 2
NO_SLOT = -1


class CacheFullError(RuntimeError):
    """A call needs more slots than are free or evictable in a pool."""


class PartPool:
    """Slots of one (layer, part): MLX arrays, numpy views and per-slot state.

    Read it through its methods; only :class:`ExpertCache` changes its state."""

    def __init__(self, layer: int, part: Part, tensors: list[tuple[str, tuple, bool]],
                 capacity: int, num_experts: int, act_dtype: mx.Dtype):
        if capacity < 1:
            raise ValueError(f"layer {layer} part {part.index}: a pool needs >= 1 slot")
        self.layer, self.part, self.capacity = layer, part, capacity
        self.zero_slot = capacity
        self.bits = part.bits
        self.act_dtype = act_dtype
        self.num_experts = num_experts
        self.slot_of = np.full(num_experts, NO_SLOT, dtype=np.int64)
        self.expert_of = np.full(capacity, NO_SLOT, dtype=np.int64)
        self.state = np.zeros(capacity, dtype=np.uint8)
        self.pins = np.zeros(capacity, dtype=np.int64)
        self.compute: dict[str, mx.array] = {}  # what gather_qmm reads
        self.views: dict[str, np.ndarray] = {}  # writable numpy views of the same memory
        self.identity = False  # every expert ready in the slot of its own id (resident)
        self.ready_count = 0  # slots in state READY
        self.is_ready = np.zeros(num_experts, dtype=bool)  # expert -> ready in a slot
        for name, shape, is_float in tensors:
            self._add(name, (capacity + 1, *shape), act_dtype if is_float else mx.uint32)
        self._add("#table", (num_experts,), mx.uint32)
        mx.eval(list(self.compute.values()))
        for name, arr in list(self.views.items()):
            self.views[name] = np.asarray(arr)  # zero-copy view of MLX memory
            if not self.views[name].flags.writeable:
                raise RuntimeError("MLX returned a read-only buffer; cannot stream experts")
        self.views["#table"][:] = self.zero_slot
        self.table = self.compute.pop("#table")
        self._table_view = self.views.pop("#table")

    def _add(self, name: str, shape: tuple, dtype: mx.Dtype) -> None:
        if dtype == mx.bfloat16:  # numpy has no bfloat16: write uint16 words, compute a view
            raw = mx.zeros(shape, dtype=mx.uint16)
            self.views[name] = raw
            self.compute[name] = raw.view(mx.bfloat16)
            self.compute[name + "#raw"] = raw  # keeps the buffer owned here
        else:
            arr = mx.zeros(shape, dtype=dtype)
            self.views[name] = arr
            self.compute[name] = arr

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.views.values())

    def arrays(self, proj: str) -> tuple[mx.array, mx.array, mx.array]:
        """(weight, scales, biases) of projection ``proj`` for gather_qmm."""
        c = self.compute
        return c[f"{proj}.weight"], c[f"{proj}.scales"], c[f"{proj}.biases"]

    def bias(self, proj: str) -> mx.array | None:
        return self.compute.get(f"{proj}.bias")

    def indices(self, experts: mx.array) -> mx.array:
        """Slot ids of ``experts`` (the zero slot where one is not ready), lazily."""
        return experts if self.identity else self.table[experts]

    # -- queries ------------------------------------------------------------------
    def ready(self, experts: np.ndarray) -> np.ndarray:
        """Mask of ``experts`` whose part is in a slot and fully read."""
        return self.is_ready[experts]

    def all_ready(self) -> bool:
        """Every expert of the layer is ready in this pool (no call can miss)."""
        return self.ready_count == self.num_experts

    def loading_slots(self) -> np.ndarray:
        return np.flatnonzero(self.state == LOADING)

    def evictable(self) -> np.ndarray:
        """Expert ids in ready slots that nothing pins."""
        slots = np.flatnonzero((self.state == READY) & (self.pins == 0))
        return self.expert_of[slots]

    def resident_experts(self) -> np.ndarray:
        """Expert ids whose part is ready, in slot order."""
        if self.identity:
            return np.arange(self.num_experts)
        return self.expert_of[self.state == READY]


class ExpertCache:
    """The pools of one MoE layer (one per layout part) and its eviction policy."""

    def __init__(self, layer: int, pools: list[PartPool], policy: EvictionPolicy):
        self.layer = layer
        self.pools = pools
        self.policy = policy

    def capacity(self, parts) -> int:
        return min(self.pools[p].capacity for p in parts)

    # -- transitions (the only writers of residency state) -------------------------------
    def acquire(self, part: int, experts: np.ndarray, spare: np.ndarray | None = None
                ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Pin the slots ``experts`` need in pool ``part``, placing the missing ones
        (free slots first, then the policy's victims among unpinned ready slots; experts
        marked in ``spare`` [E] go first: D²MoE's rule, a higher level of an expert that
        is also ready at a lower one is freed before anything else). Returns (the
        pinned slots, [(expert, slot) to load]). An expert named twice takes one slot, is
        loaded once and pinned once (numpy's ``+=`` on a repeated index applies once, and
        :meth:`release` undoes it the same way). Atomic: on CacheFullError nothing changed."""
        pool = self.pools[part]
        experts = np.asarray(experts, dtype=np.int64)
        if pool.identity:
            return np.empty(0, dtype=np.int64), []
        have = pool.slot_of[experts]
        if (have >= 0).all():  # every expert present (ready or loading): pin, nothing to load
            pool.pins[have] += 1
            return have, []
        missing = experts[have < 0]
        if len(missing) > 1:  # a repeated expert placed once, first come first (slot order
            _, first = np.unique(missing, return_index=True)  # breaks the policy's ties)
            if len(first) < len(missing):
                missing = missing[np.sort(first)]
        free = np.flatnonzero(pool.state == FREE)
        need = len(missing) - len(free)
        victims = np.empty(0, dtype=np.int64)
        if need > 0:
            candidates = pool.evictable()
            other = np.ones(pool.num_experts, dtype=bool)
            other[experts] = False  # (np.isin costs ~20x more on these small arrays)
            candidates = candidates[other[candidates]]
            victims = self.policy.victims(candidates, need)
            if spare is not None and spare[candidates].any():
                first = self.policy.victims(candidates[spare[candidates]], need)
                rest = self.policy.victims(candidates[~spare[candidates]], need - len(first))
                victims = np.concatenate([first, rest])
            if len(victims) < need:
                raise CacheFullError(
                    f"layer {self.layer} part {part}: {len(missing)} experts to place but only "
                    f"{len(free) + len(victims)} slots are free or evictable "
                    f"(capacity {pool.capacity})")
        slots = np.concatenate([free[:len(missing)], pool.slot_of[victims]]).astype(np.int64)
        for v in victims:
            self._evict(pool, int(v))
        pool.expert_of[slots] = missing
        pool.slot_of[missing] = slots
        pool.state[slots] = LOADING
        pinned = np.concatenate([have[have >= 0], slots])
        pool.pins[pinned] += 1  # one increment per distinct slot
        return pinned, list(zip(missing.tolist(), slots.tolist()))

    def loaded(self, part: int, slot: int) -> None:
        """A load into ``slot`` finished: the slot is ready."""
        pool = self.pools[part]
        if pool.state[slot] != LOADING:
            raise RuntimeError(f"layer {self.layer} part {part} slot {slot} was not loading")
        pool.state[slot] = READY
        pool.ready_count += 1
        pool.is_ready[pool.expert_of[slot]] = True
        pool._table_view[pool.expert_of[slot]] = slot

    def failed(self, part: int, slot: int) -> None:
        """A load into ``slot`` failed: the slot is free again (its expert not resident)."""
        pool = self.pools[part]
        if pool.state[slot] != LOADING:
            raise RuntimeError(f"layer {self.layer} part {part} slot {slot} was not loading")
        pool.slot_of[pool.expert_of[slot]] = NO_SLOT
        pool.expert_of[slot] = NO_SLOT
        pool.state[slot] = FREE

    def release(self, part: int, slots: np.ndarray) -> None:
        """Unpin slots a finished computation (or load) pinned."""
        pins = self.pools[part].pins
        left = pins[slots] - 1  # once per distinct slot (as acquire pinned them)
        if len(left) and left.min() < 0:
            raise RuntimeError("slot unpinned more often than pinned")
        pins[slots] = left

    def drop(self, part: int) -> None:
        """Evict every unpinned ready expert of a pool (the naive baseline's cache)."""
        pool = self.pools[part]
        if pool is None or pool.identity:
            return
        for e in pool.evictable():
            self._evict(pool, int(e))

    def fill_identity(self) -> None:
        """Every expert is in the slot of its id, in every pool (the resident cache)."""
        for pool in self.pools:
            if pool is None:
                continue
            if pool.capacity < pool.num_experts:
                raise ValueError("an identity cache needs a slot per expert")
            pool.slot_of[:] = np.arange(pool.num_experts)
            pool.expert_of[:pool.num_experts] = np.arange(pool.num_experts)
            pool.state[:pool.num_experts] = READY
            pool._table_view[:] = np.arange(pool.num_experts)
            pool.ready_count = pool.num_experts
            pool.is_ready[:] = True
            pool.identity = True

    @staticmethod
    def _evict(pool: PartPool, expert: int) -> None:
        slot = pool.slot_of[expert]
        if pool.pins[slot] or pool.state[slot] != READY:
            raise RuntimeError(f"slot {slot} of layer {pool.layer} is in use; cannot evict it")
        pool._table_view[expert] = pool.zero_slot
        pool.slot_of[expert] = NO_SLOT
        pool.expert_of[slot] = NO_SLOT
        pool.state[slot] = FREE
        pool.ready_count -= 1
        pool.is_ready[expert] = False
