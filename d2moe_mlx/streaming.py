"""The streaming MoE layer: mlx-lm's switch module computing over cache slot pools.

``install_streaming`` replaces, in an mlx-lm model being built, each switch
module's projections by :class:`PooledSwitchLinear` (``gather_qmm`` over slot
ids, one call per MWQ component) and wraps the module in
:class:`StreamingSwitch`, which hands each call to the
:class:`~d2moe_mlx.scheduler.Scheduler`. mlx-lm's own SwitchGLU (sorting,
activation, family quirks) still does the maths.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import mwq
from .budget import BudgetPlan
from .cache import LayerCache, PlanePool
from .loader import ExpertLoader
from .moe import projection_names, store_switches
from .policies import make_policy
from .scheduler import Scheduler
from .store.format import StoreError
from .store.reader import Store
from .families import family_of, router_logits


class PooledSwitchLinear(nn.Module):
    """SwitchLinear over slot pools: expert ids map to slots through the layer's tables."""

    def __init__(self, cache: LayerCache, proj: str, group_size: int, input_dims: int):
        super().__init__()
        self._cache = cache
        self._proj = proj
        self.group_size = group_size
        self._input_dims = input_dims

    @property
    def input_dims(self) -> int:
        return self._input_dims

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = None
        for pool, table in zip(self._cache.pools, self._cache.tables):
            w, s, b = pool.arrays(self._proj)
            out = mx.gather_qmm(x, w, s, b, rhs_indices=table[indices], transpose=True,
                                group_size=self.group_size, bits=pool.bits)
            y = out if y is None else y + out
        bias = self._cache.pools[0].bias(self._proj)
        if bias is not None:
            y = y + mx.expand_dims(bias[self._cache.tables[0][indices]], -2)
        return y


class StreamingSwitch(nn.Module):
    """Wraps an mlx-lm switch module; each call goes through the scheduler."""

    def __init__(self, inner: nn.Module, layer: int, scheduler: Scheduler):
        super().__init__()
        self.inner = inner
        self._layer = layer
        self._scheduler = scheduler

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self._scheduler.forward(self._layer, self.inner, x, indices)


@dataclass
class Streaming:
    """What a streaming model carries: its budget plan, scheduler and open store."""

    plan: BudgetPlan
    scheduler: Scheduler
    store: Store

    @property
    def stats(self):
        return self.scheduler.stats

    def close(self) -> None:
        self.scheduler.loader.close()
        self.store.close()


def streaming_of(model: nn.Module) -> Streaming | None:
    """The :class:`Streaming` state of a model loaded with a memory budget, else None."""
    return getattr(model, "_d2moe_streaming", None)


def install_streaming(
    model: nn.Module,
    store: Store,
    spec: mwq.MWQSpec,
    level: int,
    act_dtype: mx.Dtype,
    plan: BudgetPlan,
    *,
    policy: str = "lru",
    policy_options: dict | None = None,
    mode: str = "stream",
    prefetch: bool = False,
    overlap: bool = True,
    loader_threads: int = 4,
    verify: str = "first",
) -> Streaming:
    """Give every switch module of ``model`` slot pools sized by ``plan`` (components
    0..level) and route its calls through a scheduler; returns the streaming state."""
    caches: dict[int, LayerCache] = {}
    loader = ExpertLoader(store, threads=loader_threads, verify=verify)
    scheduler = Scheduler(caches, loader, mode=mode, prefetch=prefetch, overlap=overlap)
    for layer, path, switch in store_switches(model, store):
        pools = [PlanePool(store, layer, c, spec.component_bits(c), plan.slots[c], act_dtype)
                 for c in range(level + 1)]
        cache = LayerCache(pools, make_policy(policy, store.num_experts, **(policy_options or {})))
        cache.tables = [p.table() for p in pools]
        for name in projection_names(switch):
            _check_shape(store, path, name, getattr(switch, name), pools[0])
            setattr(switch, name, PooledSwitchLinear(cache, name, spec.group_size,
                                                     getattr(switch, name).weight.shape[-1]))
        parent, attr = _parent(model, path)
        setattr(parent, attr, StreamingSwitch(switch, layer, scheduler))
        caches[layer] = cache
    scheduler.attach(_routers(model))
    state = Streaming(plan=plan, scheduler=scheduler, store=store)
    object.__setattr__(model, "_d2moe_streaming", state)
    weakref.finalize(model, state.close)
    return state


def _routers(model: nn.Module) -> dict:
    """layer -> f(x) = (router logits, router probabilities) for every MoE block found."""
    family = family_of(model)
    gating = family.gating(model.args)

    def route_fn(router):
        def route(x: mx.array):
            logits = router_logits(router, x).astype(mx.float32)
            return logits, gating.scores(logits)
        return route

    return {layer: route_fn(block[family.router]) for layer, block in family.blocks(model)}


def _check_shape(store: Store, path: str, name: str, old: nn.Module, pool: PlanePool) -> None:
    want = tuple(old.weight.shape[1:])
    w = pool.compute[f"{name}.weight"]
    got = (w.shape[1], w.shape[2] * 32 // pool.bits)
    if got != want or old.weight.shape[0] != store.num_experts:
        raise StoreError(
            f"{store.path}: {path}.{name} holds out x in = {got} for {store.num_experts} experts, "
            f"the model's config needs {want} for {old.weight.shape[0]}; the store does not "
            "belong to this config")


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parts = path.split(".")
    node = model
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, parts[-1]
