"""The expert engine of a loaded model: its caches, loader, scheduler and level.

:func:`install_engine` puts an :class:`~d2moe_mlx.experts.ExpertLayer` in place of
every MoE block's routed experts (found by the family adapter) and builds one
:class:`~d2moe_mlx.cache.ExpertCache` per layer. Resident and streaming models are
the same engine: resident pools hold every expert in the slot of its id (filled
at load), streaming pools are sized by the budget plan and filled on demand (a
budget that holds every expert fills them at load and then runs as resident).
:class:`Engine` is what a model carries (``engine_of(model)``); :meth:`Engine.set_level`
switches the running level of either kind.
"""

from __future__ import annotations

import weakref
from concurrent.futures import wait
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import mwq
from .cache import ExpertCache, PartPool
from .experts import ExpertLayer
from .families import Family, family_of, text_args
from .hooks import replace_experts
from .layout import LAYOUTS, Layout, levels_possible, make_layout, slot_tensors
from .levels import Exact, LevelPolicy
from .loader import ExpertLoader
from .moe import projection_names
from .policies import make_policy
from .scheduler import Scheduler
from .store.format import MANIFEST_NAME, StoreError
from .store.reader import Store


@dataclass
class Engine:
    """What a d2moe model carries: store, layout, caches, loader, scheduler, budget plan."""

    store: Store
    spec: mwq.MWQSpec
    layout: Layout
    scheduler: Scheduler
    loader: ExpertLoader
    act_dtype: mx.Dtype
    family: Family
    plan: object | None = None  # BudgetPlan when streaming
    cache_policy: str = "lru"
    policy_options: dict = field(default_factory=dict)
    layers: dict[int, ExpertLayer] = field(default_factory=dict)

    @property
    def streaming(self) -> bool:
        return self.plan is not None

    @property
    def stats(self):
        return self.scheduler.stats

    @property
    def level(self) -> int | None:
        """The level every pair runs at (None under a per-pair level policy)."""
        return self.scheduler.levels.uniform

    @property
    def policy(self) -> LevelPolicy:
        return self.scheduler.levels

    @property
    def ceiling(self) -> int:
        """The highest level the current policy runs pairs at (the loaded level)."""
        return max(self.scheduler.levels.levels_used)

    def set_level(self, level: int) -> None:
        """Run every expert at ``level`` from the next call on. Resident: the experts are
        read again at that level where the layout needs it. Streaming: the budget is
        planned again for that level (BudgetError if it cannot hold it) and the cache
        starts empty."""
        self.set_policy(Exact(self._check_level(level)))

    def set_policy(self, policy: LevelPolicy) -> None:
        """Use a level policy from the next call on. Pools are kept when they hold every
        part the policy uses, else made again for its parts (resident: read from the
        store; streaming: the budget planned again, BudgetError if it cannot hold them)."""
        for level in policy.levels_used:
            self._check_level(level)
        self.scheduler.drain()
        parts, floor = policy_parts(policy, self.layout)
        if not set(parts) <= set(self._parts):
            plan = None
            if self.plan is not None:
                from .budget import replan

                plan = replan(self.plan, self.store, self.layout, parts, floor, self.act_dtype.size)
            self._build(parts, plan)
        self.scheduler.levels = policy

    def _check_level(self, level: int) -> int:
        if not isinstance(level, int) or not 0 <= level < self.spec.num_levels:
            raise ValueError(
                f"level {level!r} does not exist in {self.store.path}: it has levels "
                f"0..{self.spec.num_levels - 1} ("
                + ", ".join(f"{self.spec.level_bits(i)} bits" for i in range(self.spec.num_levels))
                + ")")
        return level

    # -- pools ----------------------------------------------------------------------------
    @property
    def _parts(self) -> list[int]:
        any_cache = next(iter(self.scheduler.caches.values()))
        return [i for i, pool in enumerate(any_cache.pools) if pool is not None]

    def _build(self, parts: list[int], plan, fill: bool = True) -> None:
        """(Re)make every layer's pools for ``parts``: sized by ``plan`` (streaming,
        empty), or one slot per expert (resident, read from the store if ``fill``)."""
        for cache in self.scheduler.caches.values():
            cache.pools = [None] * len(self.layout.parts)  # free the old pools first
        mx.clear_cache()
        for layer, cache in self.scheduler.caches.items():
            base = self.store.layout(layer, 0)
            for p in parts:
                part = self.layout.parts[p]
                cap = self.store.num_experts if plan is None else plan.slots[p]
                cache.pools[p] = PartPool(layer, part, slot_tensors(part, base, self.spec.group_size),
                                          cap, self.store.num_experts, self.act_dtype)
            cache.policy = make_policy(self.cache_policy, self.store.num_experts,
                                       **self.policy_options)
        if plan is not None:
            self.plan = plan
        if fill and self._holds_all(parts):
            self._fill()

    def _holds_all(self, parts: list[int]) -> bool:
        """Resident, or a budget whose pools hold every expert (then loaded at start)."""
        return self.plan is None or all(self.plan.slots[p] >= self.store.num_experts for p in parts)

    def _fill(self) -> None:
        """Read every expert of every pool into the slot of its id (resident)."""
        futures = []
        for cache in self.scheduler.caches.values():
            for pool in cache.pools:
                if pool is not None:
                    futures += [self.loader.submit(pool, e, e) for e in range(pool.num_experts)]
        wait(futures)
        for f in futures:
            f.result()  # raise the first error, naming its file and block
        for cache in self.scheduler.caches.values():
            cache.fill_identity()

    def close(self) -> None:
        self.loader.close()
        self.store.close()


def policy_parts(policy: LevelPolicy, layout: Layout) -> tuple[list[int], list[int]]:
    """(parts the policy's levels need, parts of its floor level)."""
    parts = sorted({p for lv in policy.levels_used for p in layout.cover(lv)})
    return parts, list(layout.cover(policy.floor))


def engine_of(model: nn.Module) -> Engine | None:
    """The :class:`Engine` of a model loaded by d2moe, else None."""
    return getattr(model, "_d2moe_engine", None)


def streaming_of(model: nn.Module) -> Engine | None:
    """The engine of a model loaded with a memory budget, else None."""
    engine = engine_of(model)
    return engine if engine is not None and engine.streaming else None


def choose_layout(name: str, spec: mwq.MWQSpec, manifest: dict, streaming: bool) -> str:
    """``auto``: ``levels`` (one pass per level) when the store is nested-fitted and
    every level is an MLX width, else ``planes``."""
    if name not in (*LAYOUTS, "auto"):
        raise ValueError(f"layout must be one of auto, {', '.join(LAYOUTS)}; got {name!r}")
    nested = bool(manifest.get("mwq", {}).get("nested", False))
    if name == "auto":
        return "levels" if levels_possible(spec, nested) else "planes"
    if name == "levels" and not levels_possible(spec, nested):
        raise ValueError(f"{manifest.get('source', 'this store')}: the levels layout needs a store "
                         "fitted with --method nested whose levels are MLX widths; use layout='planes'")
    return name


def install_engine(model: nn.Module, store: Store, spec: mwq.MWQSpec, policy: LevelPolicy,
                   act_dtype: mx.Dtype, *, plan=None, layout: str = "auto",
                   cache_policy: str = "lru", policy_options: dict | None = None,
                   mode: str = "stream", prefetch: bool = False, overlap: bool = True,
                   loader_threads: int = 4, verify: bool = True, load_order: str = "hebf",
                   phases: int = 2) -> Engine:
    """Replace every MoE block's experts of ``model`` (being built, weights not yet
    loaded) by expert layers over caches for the levels of ``policy``; returns the
    engine. Pools are allocated here; resident ones are filled by :func:`fill`."""
    family = family_of(model)
    blocks = family.blocks(model)
    _check_blocks(store, family, blocks)
    lay = make_layout(choose_layout(layout, spec, store.manifest, plan is not None), spec)
    policy_options = dict(policy_options or {})
    make_policy(cache_policy, store.num_experts, **policy_options)  # bad options fail early
    caches = {layer: ExpertCache(layer, [], None) for layer, _ in blocks}
    loader = ExpertLoader(store, spec, threads=loader_threads, verify=verify)
    scheduler = Scheduler(caches, loader, lay, policy, family.gating(text_args(model)), mode=mode,
                          prefetch=prefetch, overlap=overlap, load_order=load_order, phases=phases)
    engine = Engine(store=store, spec=spec, layout=lay, scheduler=scheduler, loader=loader,
                    act_dtype=act_dtype, family=family, plan=plan, cache_policy=cache_policy,
                    policy_options=policy_options)
    parts, _ = policy_parts(policy, lay)
    engine._build(parts, plan, fill=False)

    def make(layer, block, switch):
        _check_shapes(store, layer, switch, caches[layer].pools[parts[0]], lay.parts[parts[0]])
        el = ExpertLayer(layer, switch, block, family, caches[layer], scheduler, spec.group_size)
        engine.layers[layer] = el
        return el

    replace_experts(blocks, family, make)
    scheduler._layers_by_index = engine.layers
    object.__setattr__(model, "_d2moe_engine", engine)
    weakref.finalize(model, engine.close)
    return engine


def fill(engine: Engine) -> None:
    """Read every expert into its pools (after the dense weights) when they hold them all:
    a resident model, or a budget large enough for every expert."""
    if engine._holds_all(engine._parts):
        engine._fill()


def _check_blocks(store: Store, family: Family, blocks: list) -> None:
    """The MoE layers found in the model must be the ones the store's manifest recorded."""
    expected = store.manifest["switch_modules"]
    found = {str(layer) for layer, _ in blocks}
    if sorted(found, key=int) != sorted(expected, key=int) or any(
            not expected[k].endswith(f".{k}.{family.switch_path}") for k in expected):
        raise StoreError(
            f"{store.path / MANIFEST_NAME}: expert modules {sorted(expected.values())[:3]}... do not "
            f"match the {store.manifest['model_type']} model built from config.json; re-run d2moe convert")


def _check_shapes(store: Store, layer: int, switch: nn.Module, pool: PartPool, part) -> None:
    """Each projection of the store must be [experts, out, in] as the model's config implies."""
    for name in projection_names(switch):
        want = tuple(getattr(switch, name).weight.shape)
        w = pool.compute[f"{name}.weight"]
        got = (store.num_experts, w.shape[1], w.shape[2] * 32 // part.bits)
        if got != want:
            raise StoreError(
                f"{store.path}: layer {layer} {name} holds experts x out x in = {got}, the "
                f"model's config needs {want}; the store does not belong to this config")
