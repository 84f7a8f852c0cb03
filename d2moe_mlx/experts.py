"""The expert layer: stands in for an MoE block's routed experts and computes them from slot pools.

:class:`ExpertLayer` takes the place of mlx-lm's ``SwitchGLU``/``SwitchMLP`` in
the block (:func:`d2moe_mlx.hooks.replace_experts`), so the block's own routing,
gate weighting and shared experts stay mlx-lm's. A call hands ``(x, indices)`` to
the scheduler, which decides residency and levels and calls :meth:`compute` with,
for each layout part to sum, the pool and the slot index of every pair. The maths
is mlx-lm's SwitchGLU (sort pairs when there are many, gate/up, activation, down,
unsort) with each projection a sum of one ``gather_qmm`` per part. The same class
runs resident (every expert in the slot of its id) and streaming.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, _scatter_unsort

from .cache import ExpertCache, PartPool
from .families import Family
from .moe import projection_names

SORT_THRESHOLD = 64  # mlx-lm's SwitchGLU sorts pairs by expert from this many on

PartIndices = list[tuple[PartPool, mx.array]]


class ExpertLayer(nn.Module):
    """The routed experts of one MoE layer, over its :class:`ExpertCache`."""

    routed_experts = True  # stands in for mlx-lm's SwitchGLU (d2moe_mlx.moe.is_experts)

    def __init__(self, layer: int, switch: nn.Module, block: nn.Module, family: Family,
                 cache: ExpertCache, scheduler, group_size: int):
        super().__init__()
        self.layer = layer
        self.group_size = group_size
        self._glu = isinstance(switch, SwitchGLU)
        self._projections = projection_names(switch)
        # Plain attributes, not child modules: no parameters live here.
        object.__setattr__(self, "_activation", switch.activation)
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_family", family)
        object.__setattr__(self, "cache", cache)
        object.__setattr__(self, "_scheduler", scheduler)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self._scheduler.forward(self, x, indices)

    def scores(self, x: mx.array) -> mx.array:
        """Router probabilities of every expert [..., E] in this call, whose experts see
        ``x`` (lazy; the family reads or recomputes the logits)."""
        return self._scheduler.gating.scores(self._family.router_logits(self._block, x))

    def scores_for(self, x: mx.array) -> mx.array:
        """This layer's router probabilities for another input ``x`` (a guess of its
        routing from an earlier layer's experts' input, for prefetch)."""
        return self._scheduler.gating.scores(self._family.router_logits_for(self._block, x))

    def compute(self, x: mx.array, parts: PartIndices) -> mx.array:
        """Expert outputs [..., k, H] for ``x`` [..., H]: each pair computed from the
        sum of ``parts`` (pool, slot index [..., k] of each pair)."""
        shape = parts[0][1].shape
        x = mx.expand_dims(x, (-2, -3))
        do_sort = parts[0][1].size >= SORT_THRESHOLD
        inv = None
        if do_sort:
            k = shape[-1]
            order = mx.argsort(parts[0][1].flatten())
            inv = mx.argsort(order)
            x = x.flatten(0, -3)[order // k]
            parts = [(pool, idx.flatten()[order]) for pool, idx in parts]
        if self._glu:
            up = self._project("up_proj", x, parts, do_sort)
            gate = self._project("gate_proj", x, parts, do_sort)
            y = self._project("down_proj", self._activation(up, gate), parts, do_sort)
        else:
            first, last = self._projections
            y = self._project(last, self._activation(self._project(first, x, parts, do_sort)),
                              parts, do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv, shape)
        return y.squeeze(-2)

    def _project(self, name: str, x: mx.array, parts: PartIndices, do_sort: bool) -> mx.array:
        y = None
        for n, (pool, idx) in enumerate(parts):
            w, s, b = pool.arrays(name)
            out = mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True,
                                group_size=self.group_size, bits=pool.bits,
                                sorted_indices=do_sort and n == 0)
            y = out if y is None else y + out
            bias = pool.bias(name)
            if bias is not None:
                y = y + mx.expand_dims(bias[idx], -2)
        return y
