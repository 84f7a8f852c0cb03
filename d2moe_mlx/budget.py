"""Split a memory budget into dense weights, KV cache, working memory and expert slots.

The budget is for the whole process: what the interpreter and libraries hold
before the model loads (measured), the dense weights (read from the shard
headers), the KV cache for ``context`` tokens, working memory for one prefill
step, the loader's staging buffers, and what is left: the expert cache, as a
number of slots per MoE layer. A budget that cannot hold one layer's top-k
experts at the running level is refused before anything is loaded, with the
numbers and the smallest budget that works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from safetensors import safe_open

from .layout import Layout, slot_tensors
from .memory import format_bytes
from .store.format import StoreError
from .store.reader import Store

# Bytes per element of the dtype names used in safetensors headers and stores.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4,
             "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT = {"F64", "F32", "F16", "BF16"}
# MLX keeps freed buffers for reuse: its cache limit is this fraction of the workspace,
# planned on top of it (live temporaries and cached ones coexist; a prefill fills it).
MLX_CACHE_FRACTION = 0.1
# Memory outside MLX that grows after the baseline is measured: the C allocator's
# retained arenas, Python objects, thread stacks: 8-47 MiB measured in prefills of the
# synthetic and tiny stores (scripts/measure_budget.py); plus twice the loader's
# staging for the heap churn of its threads.
RUNTIME_SLACK = 32 << 20
KV_STEP = 256  # mlx-lm's KVCache grows in steps of this many tokens
# prefill_step=None: the largest of these (up to the context) whose working memory is at
# most PREFILL_SHARE of what the budget leaves after baseline, dense weights and KV cache:
# a long prompt then runs through each layer in few passes, reading each expert once a pass.
AUTO_STEPS = (4096, 2048, 1024, 512, 256, 128)
PREFILL_SHARE = 0.25
# A per-pair level policy runs every pair at least at its floor level and only important
# or hot pairs above it: the parts that compute the floor get this many times the slots
# of the parts above (more base slots than plane slots). A budget too small for top-k
# slots above the floor still works with at least top-k floor slots and one above: the
# scheduler then runs a call's least valuable pairs at the floor (levels.fit_pools).
FLOOR_SHARE = 2


class BudgetError(ValueError):
    """The memory budget cannot hold the model's minimum working set."""


@dataclass
class BudgetPlan:
    """How a budget is spent (bytes); ``slots[c]`` expert slots per layer for component c."""

    total: int
    baseline: int
    dense: int
    kv: int
    workspace: int
    mlx_cache: int
    slack: int
    staging: int
    cache: int
    slot_bytes: dict[int, int]
    slots: dict[int, int]
    layers: int
    num_experts: int
    top_k: int
    context: int
    prefill_step: int
    level: int = 0
    loader_threads: int = 4
    batch: int = 1
    weights: dict[int, int] = field(default_factory=dict)  # slots of part p per base count
    notes: list[str] = field(default_factory=list)

    @property
    def cache_used(self) -> int:
        """Bytes of the expert slot pools (each pool also holds one all-zero slot)."""
        return self.layers * sum((self.slots[c] + 1) * b for c, b in self.slot_bytes.items())

    @property
    def working(self) -> int:
        """Temporaries, MLX's buffer cache, loader staging and runtime slack."""
        return self.workspace + self.mlx_cache + self.staging + self.slack

    @property
    def expert_fraction(self) -> float:
        """Fraction of all experts (at the running level) the cache holds."""
        return min(self.slots.values()) / self.num_experts

    def describe(self) -> str:
        parts = [
            f"budget {format_bytes(self.total)}: process baseline {format_bytes(self.baseline)}",
            f"dense weights {format_bytes(self.dense)}",
            f"KV cache for {self.batch} x {self.context} tokens {format_bytes(self.kv)}"
            if self.batch > 1 else f"KV cache for {self.context} tokens {format_bytes(self.kv)}",
            f"working memory {format_bytes(self.working)}",
            f"expert cache {format_bytes(self.cache_used)} = {min(self.slots.values())} of "
            f"{self.num_experts} experts per layer ({100 * self.expert_fraction:.1f}%)",
        ]
        return ", ".join(parts)


def slot_bytes(store: Store, layout: Layout, part: int, act_itemsize: int) -> int:
    """Bytes one expert slot of ``part`` takes in memory in every MoE layer's pool (the
    layout :func:`d2moe_mlx.layout.slot_tensors` allocates; layers share one geometry)."""
    spec = store.manifest["mwq"]
    base = store.layout(store.moe_layers[0], 0)
    return sum(math.prod(shape) * (act_itemsize if is_float else 4)
               for _, shape, is_float in slot_tensors(layout.parts[part], base, spec["group_size"]))


def dense_bytes(store: Store, act_itemsize: int) -> int:
    """Bytes of the dense weights once loaded (floats at the activation dtype)."""
    total = 0
    for path in store.dense_files():
        for dtype, shape in _safetensors_header(path):
            n = math.prod(shape)
            total += n * (act_itemsize if dtype in _FLOAT else _ITEMSIZE.get(dtype, 4))
    return total


def _attention_dims(config: dict) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) as mlx-lm's KV cache holds them."""
    heads = config.get("num_attention_heads", 1)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // max(heads, 1)
    if config.get("kv_lora_rank"):  # deepseek MLA: mlx-lm caches per-head keys and values
        kv_heads = heads
        head_dim = (config.get("qk_nope_head_dim", 0) + config.get("qk_rope_head_dim", 0)
                    + config.get("v_head_dim", 0)) / 2
    return heads, kv_heads, head_dim


def kv_bytes(config: dict, context: int, act_itemsize: int) -> int:
    """KV-cache bytes for ``context`` tokens of every layer, as mlx-lm allocates them (in
    steps of 256 tokens), plus one layer's copy while the cache grows (a layer at a time)."""
    _, kv_heads, head_dim = _attention_dims(config)
    layers = config.get("num_hidden_layers", 1)
    tokens = -(-context // KV_STEP) * KV_STEP
    per_layer = 2 * kv_heads * head_dim * tokens * act_itemsize
    return int(per_layer * (layers + 1))


def workspace_bytes(config: dict, prefill_step: int, context: int, act_itemsize: int) -> int:
    """Peak temporaries of one forward pass of ``prefill_step`` tokens that attend to up to
    ``context`` tokens, in activations of ``act_itemsize`` bytes (float32 on the CPU).

    Per token of the pass the routed pairs' intermediates, k·(2H + 2I); per token of
    context heads·head_dim (keys and values as attention reads them); per (pass token,
    context token) half a score per head. Fitted to what the process holds (peak RSS)
    in prefills of 64-1024 tokens with 300-1100 tokens of context on MLX 0.32's CPU
    backend (scripts/measure_budget.py; MLX's own peak counts allocated pages that were
    never touched, ~1.2x more at 1024 tokens)."""
    hidden = config.get("hidden_size", 0)
    inter = config.get("moe_intermediate_size") or config.get("intermediate_size", 0)
    heads, _, head_dim = _attention_dims(config)
    k = _top_k(config)
    per_token = k * 2 * (hidden + inter)
    per_context = heads * head_dim
    per_pair = heads / 2
    return int(act_itemsize * (prefill_step * per_token + context * per_context
                               + prefill_step * context * per_pair))


def plan_budget(
    total: int,
    store: Store,
    config: dict,
    layout: Layout,
    level: int,
    act_itemsize: int,
    baseline: int,
    *,
    context: int = 4096,
    prefill_step: int | None = None,
    loader_threads: int = 4,
    parts: list[int] | None = None,
    floor_parts: list[int] | None = None,
    batch: int = 1,
) -> BudgetPlan:
    """Split ``total`` bytes for running ``level`` in ``layout`` (pools for ``parts``,
    default the parts that compute ``level``) with ``batch`` sequences of up to
    ``context`` tokens each (forward passes are held to ``prefill_step`` tokens in all,
    see :mod:`d2moe_mlx.limits`; None: the largest step the budget affords, AUTO_STEPS);
    BudgetError if the minimum working set does not fit.

    Slots per part: the same count for every part of one level (each pair of the level
    needs all of them); with ``floor_parts`` (a per-pair level policy's floor) those
    get FLOOR_SHARE times the slots of the parts above them; where that leaves fewer
    than top-k slots above the floor, the floor parts get at least top-k and the parts
    above what is left (at least one; the scheduler keeps a call's pairs above the floor
    within them)."""
    layers = store.moe_layers
    if not layers:
        raise StoreError(f"{store.path} has no expert layers")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    parts = sorted(parts) if parts is not None else list(layout.cover(level))
    first = layers[0]
    per_slot = {p: slot_bytes(store, layout, p, act_itemsize) for p in parts}
    staging = loader_threads * sum(store.block_bytes(first, c)
                                   for c in range(max(layout.parts[p].hi for p in parts) + 1))
    top_k = _top_k(config)
    dense = dense_bytes(store, act_itemsize)
    kv = batch * kv_bytes(config, context, act_itemsize)
    slack = RUNTIME_SLACK + 2 * staging
    if prefill_step is None:
        prefill_step = auto_step(total - baseline - dense - kv, config, context, act_itemsize)
    work = workspace_bytes(config, min(prefill_step, context), context, act_itemsize)
    mlx_cache = int(MLX_CACHE_FRACTION * work)
    fixed = baseline + dense + kv + work + mlx_cache + staging + slack
    split = bool(floor_parts) and set(floor_parts) != set(parts)
    weight = {p: FLOOR_SHARE if split and p in floor_parts else 1 for p in parts}
    one_expert = len(layers) * sum(weight[p] * b for p, b in per_slot.items())  # n slots each
    zero = len(layers) * sum(per_slot.values())  # every pool's all-zero slot
    cache = total - fixed
    n = (cache - zero) // one_expert if cache > zero else -1
    n = min(n, store.num_experts)
    slots = {p: min(int(n) * weight[p], store.num_experts) for p in parts}
    fits = n >= top_k
    if split and not fits:  # tight: top-k floor slots, what is left above the floor
        floor_one = len(layers) * sum(b for p, b in per_slot.items() if weight[p] > 1)
        upper_one = one_expert - FLOOR_SHARE * floor_one
        f = max(FLOOR_SHARE * max(n, 0), top_k)
        u = (cache - zero - f * floor_one) // upper_one if cache > zero else -1
        slots = {p: min(f if weight[p] > 1 else int(u), store.num_experts) for p in parts}
        fits = u >= 1
    if not fits:
        if split:  # the least a per-pair policy runs with: top-k floor slots + one above
            need_cache = zero + top_k * floor_one + upper_one
            least = (f"{top_k} experts per layer at the floor and one above it "
                     f"({format_bytes(need_cache)} over {len(layers)} layers)")
        else:
            need_cache = zero + top_k * one_expert
            least = (f"{top_k} experts per layer at level {level} ({format_bytes(need_cache)} "
                     f"over {len(layers)} layers)")
        need = fixed + need_cache
        raise BudgetError(
            f"a memory budget of {format_bytes(total)} is too small: the process needs "
            f"{format_bytes(baseline)} (interpreter and libraries) + {format_bytes(dense)} dense "
            f"weights + {format_bytes(kv)} KV cache ({batch} x {context} tokens) + "
            f"{format_bytes(work + mlx_cache + staging + slack)} working memory (prefill steps of "
            f"{prefill_step} tokens), and at least {least}. The smallest budget that works is "
            f"{suggest_budget(need)}; or use a lower "
            f"level, a shorter context, or a smaller prefill step."
        )
    return BudgetPlan(
        total=total, baseline=baseline, dense=dense, kv=kv, workspace=work, mlx_cache=mlx_cache,
        slack=slack, staging=staging,
        cache=cache, slot_bytes=per_slot, layers=len(layers),
        slots=slots,
        num_experts=store.num_experts, top_k=top_k, context=context, prefill_step=prefill_step,
        level=level, loader_threads=loader_threads, batch=batch, weights=weight,
    )


def auto_step(left: int, config: dict, context: int, act_itemsize: int) -> int:
    """The largest of AUTO_STEPS (capped at the context) whose working memory is at most
    PREFILL_SHARE of ``left`` bytes; the smallest if none is."""
    steps = sorted({min(s, context) for s in AUTO_STEPS}, reverse=True)
    for step in steps:
        work = workspace_bytes(config, step, context, act_itemsize)
        if work * (1 + MLX_CACHE_FRACTION) <= PREFILL_SHARE * left:
            return step
    return steps[-1]


def budget_for_slots(slots: int, store: Store, layout: Layout, level: int, act_itemsize: int,
                     baseline: int, **options) -> int:
    """A budget whose plan gives ``slots`` expert slots per pool: plan_budget's fixed
    part plus ``slots`` + 1 slots per pool (its inverse; ``options`` as for it), and
    half a slot more, since load_model measures the baseline again a moment later.
    Without a ``prefill_step``, the step the returned budget's own plan picks."""
    if options.get("prefill_step") is None:
        options = {k: v for k, v in options.items() if k != "prefill_step"}
        context = options.get("context", 4096)
        steps = sorted({min(s, context) for s in AUTO_STEPS}, reverse=True)
        for step in steps:  # a budget whose own auto step is the one it was made for
            budget = budget_for_slots(slots, store, layout, level, act_itemsize, baseline,
                                      prefill_step=step, **options)
            try:
                plan = plan_budget(budget, store, store.config, layout, level, act_itemsize,
                                   baseline, **options)
            except BudgetError:
                continue
            if plan.prefill_step == step:
                return budget
        # none: the largest step's budget (its auto step needs no more working memory)
        return budget_for_slots(slots, store, layout, level, act_itemsize, baseline,
                                prefill_step=steps[0], **options)
    probe = plan_budget(1 << 60, store, store.config, layout, level, act_itemsize, baseline, **options)
    zero = probe.layers * sum(probe.slot_bytes.values())  # every pool's all-zero slot
    one = probe.layers * sum(probe.weights[p] * b for p, b in probe.slot_bytes.items())
    return probe.total - probe.cache + zero + slots * one + one // 2


def suggest_budget(need: int) -> str:
    """A budget to offer for ``need`` bytes, in decimal units (as --memory reads them):
    with room for the run-to-run noise of the measured baseline (1% + 2 MiB) and rounded
    up to 10 MB (100 MB from 10 GB), so that it is the same from run to run and works
    when passed back."""
    n = need * 1.01 + (2 << 20)
    step = 10**7 if n < 10**10 else 10**8
    n = math.ceil(n / step) * step
    return f"{n / 1e9:.1f} GB" if n >= 10**10 else f"{n // 10**6} MB"


def replan(plan: BudgetPlan, store: Store, layout: Layout, parts: list[int],
           floor_parts: list[int], act_itemsize: int) -> BudgetPlan:
    """``plan``'s budget split again for pools of ``parts`` (see plan_budget)."""
    level = max(layout.parts[p].hi for p in parts)
    return plan_budget(plan.total, store, store.config, layout, level, act_itemsize, plan.baseline,
                       context=plan.context, prefill_step=plan.prefill_step,
                       loader_threads=plan.loader_threads, parts=parts, floor_parts=floor_parts,
                       batch=plan.batch)


def _top_k(config: dict) -> int:
    for key in ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k"):
        if config.get(key):
            return int(config[key])
    raise StoreError("config.json does not say how many experts each token uses "
                     "(num_experts_per_tok)")


def _safetensors_header(path) -> list[tuple[str, list[int]]]:
    """(dtype, shape) of each tensor in a safetensors file, without reading the data."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return [(f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()]
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise StoreError(f"{path}: cannot read the safetensors header ({err}); the store is "
                         "damaged: re-run d2moe convert") from None
