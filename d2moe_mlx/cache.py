"""The expert cache: per MoE layer, one fixed-capacity slot pool per MWQ component.

A :class:`PlanePool` holds, for one (layer, component), an evaluated MLX array
per tensor with ``capacity + 1`` slots along axis 0 (the last slot stays all
zero: an expert routed to it contributes nothing). Experts map to slots; the
loader preads blocks straight into slot memory through numpy views of these
arrays, and the MoE layer computes ``gather_qmm`` over slot ids. Nothing is
stacked or copied per token.

Residency is per component: an expert can have its base resident while its
higher planes are not. A slot that a pending computation reads or a load is
filling is pinned and is never chosen for eviction.
"""

from __future__ import annotations

from concurrent.futures import Future

import mlx.core as mx
import numpy as np

from .policies import EvictionPolicy
from .store.reader import Store

FREE = -1


def slot_tensors(specs: list) -> list[tuple[str, tuple, bool]]:
    """(name, shape, is_float) of each tensor one slot holds for a block of ``specs``:
    packed codes as uint32 (a binary plane, which has no biases, expanded to 2 bits:
    twice the words, and given a biases tensor), float tensors at the activation dtype."""
    names = {s.name for s in specs}
    binary = not any(n.endswith(".biases") for n in names)
    out = []
    for spec in sorted(specs, key=lambda s: s.offset):
        proj, field = spec.name.rsplit(".", 1)
        if field == "weight":
            out.append((spec.name, (spec.shape[0], spec.shape[1] * (2 if binary else 1)), False))
        else:
            out.append((spec.name, tuple(spec.shape), True))
            if field == "scales" and binary and f"{proj}.biases" not in names:
                out.append((f"{proj}.biases", tuple(spec.shape), True))
    return out


class CacheFullError(RuntimeError):
    """Every slot of a pool is pinned: the request needs more slots than the pool has."""


class PlanePool:
    """Slots of one (layer, component): MLX arrays, numpy views and the expert<->slot maps."""

    def __init__(self, store: Store, layer: int, component: int, stored_bits: int,
                 capacity: int, act_dtype: mx.Dtype):
        if capacity < 1:
            raise ValueError(f"layer {layer} component {component}: a pool needs >= 1 slot")
        self.layer, self.component, self.capacity = layer, component, capacity
        self.zero_slot = capacity
        self.binary = stored_bits == 1
        self.bits = 2 if self.binary else stored_bits  # 1-bit planes run as MLX 2-bit
        self.act_dtype = act_dtype
        self.block_bytes = store.block_bytes(layer, component)
        self.specs = sorted(store.layout(layer, component), key=lambda s: s.offset)
        self.slot_of = np.full(store.num_experts, FREE, dtype=np.int64)
        self.expert_of = np.full(capacity, FREE, dtype=np.int64)
        self.ready = np.zeros(capacity, dtype=bool)
        self.pins = np.zeros(capacity, dtype=np.int64)
        self.loading: dict[int, Future] = {}  # slot -> its in-flight load
        self.compute: dict[str, mx.array] = {}  # tensor name -> array gather_qmm reads
        self.views: dict[str, np.ndarray] = {}  # tensor name -> writable numpy view
        self._allocate()

    # -- memory -------------------------------------------------------------
    def _allocate(self) -> None:
        n = self.capacity + 1
        for name, shape, is_float in slot_tensors(self.specs):
            self._add(name, (n, *shape), self.act_dtype if is_float else mx.uint32)
        mx.eval(list(self.compute.values()))
        for name, arr in list(self.views.items()):
            self.views[name] = np.asarray(arr)  # writable zero-copy view of MLX memory
            if not self.views[name].flags.writeable:
                raise RuntimeError("MLX returned a read-only buffer; cannot stream experts")

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
        """(weight, scales, biases) pools of projection ``proj`` for gather_qmm."""
        c = self.compute
        return c[f"{proj}.weight"], c[f"{proj}.scales"], c[f"{proj}.biases"]

    def bias(self, proj: str) -> mx.array | None:
        return self.compute.get(f"{proj}.bias")

    # -- maps ---------------------------------------------------------------
    def resident(self, experts: np.ndarray) -> np.ndarray:
        """Mask of ``experts`` whose block is in a slot and fully read."""
        slots = self.slot_of[experts]
        ok = slots >= 0
        ok[ok] = self.ready[slots[ok]]
        return ok

    def table(self, only: np.ndarray | None = None) -> mx.array:
        """expert id -> slot as an MLX uint32 array; the zero slot where the expert is not
        ready, or (with ``only``) not one of ``only``."""
        t = np.full(self.slot_of.shape, self.zero_slot, dtype=np.uint32)
        ok = self.resident(np.arange(self.slot_of.size))
        if only is not None:
            ok &= np.isin(np.arange(self.slot_of.size), only)
        t[ok] = self.slot_of[ok]
        return mx.array(t)

    def free_slots(self) -> np.ndarray:
        return np.flatnonzero(self.expert_of == FREE)

    def assign(self, expert: int, slot: int) -> None:
        old = self.expert_of[slot]
        if self.pins[slot] or slot in self.loading:
            raise RuntimeError(f"slot {slot} of layer {self.layer} is in use; cannot evict it")
        if old != FREE:
            self.slot_of[old] = FREE
        self.expert_of[slot] = expert
        self.slot_of[expert] = slot
        self.ready[slot] = False

    def pin(self, slots: np.ndarray) -> None:
        np.add.at(self.pins, np.asarray(slots, dtype=np.int64), 1)

    def unpin(self, slots: np.ndarray) -> None:
        np.add.at(self.pins, np.asarray(slots, dtype=np.int64), -1)
        if (self.pins < 0).any():
            raise RuntimeError("slot unpinned more often than pinned")

    def evictable(self) -> np.ndarray:
        """Expert ids resident in slots that nothing reads or fills."""
        slots = np.flatnonzero((self.expert_of != FREE) & (self.pins == 0))
        slots = np.array([s for s in slots if s not in self.loading], dtype=np.int64)
        return self.expert_of[slots] if slots.size else slots


class LayerCache:
    """The pools of one MoE layer (components 0..level) and its eviction policy."""

    def __init__(self, pools: list[PlanePool], policy: EvictionPolicy):
        self.pools = pools
        self.policy = policy
        self.layer = pools[0].layer

    @property
    def capacity(self) -> int:
        return min(p.capacity for p in self.pools)

    def place(self, pool: PlanePool, experts: np.ndarray) -> list[tuple[int, int]]:
        """Give each expert of ``experts`` without a slot in ``pool`` a slot; returns
        the (expert, slot) pairs to load. Callers pin ``experts`` first so that
        none of them is chosen as a victim. CacheFullError if slots run out."""
        missing = [int(e) for e in experts if pool.slot_of[e] == FREE]
        if not missing:
            return []
        free = list(pool.free_slots())
        need = len(missing) - len(free)
        if need > 0:
            victims = self.policy.victims(pool.evictable(), need)
            if len(victims) < need:
                raise CacheFullError(
                    f"layer {self.layer} component {pool.component}: {len(missing)} experts "
                    f"to place but only {len(free) + len(victims)} slots are free or evictable "
                    f"(capacity {pool.capacity})")
            free += [int(pool.slot_of[v]) for v in victims]
        out = []
        for e, s in zip(missing, free):
            pool.assign(e, s)
            out.append((e, s))
        return out
