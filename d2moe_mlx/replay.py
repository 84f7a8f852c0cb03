"""Replay a recorded routing trace through the runtime's expert caches and policies.

A trace is an ``.npz`` with ``topk_ids`` [tokens, layers, k] (the experts each token
ran in each MoE layer), optionally ``prompt_lens`` (tokens per prompt, in order) and
the router's weights of the chosen experts (``gate_probs`` or ``topk_weights_renorm``,
shaped like ``topk_ids``; the ``score`` policy needs them). A trace written by
``d2moe trace`` (:mod:`d2moe_mlx.trace`: ``ids``/``scores`` [layers, tokens, k]) is read
too, as one prompt. Each layer gets one
:class:`~d2moe_mlx.cache.ExpertCache` (a slot table only: a :class:`PartPool` without
tensors) with a policy from :func:`~d2moe_mlx.policies.make_policy`, and every token is
one decode step through it, as the scheduler runs it: the next layer's policy hears this
layer's routing (``on_route``; the experts it asks for are acquired, loaded and released
like the scheduler's prefetches), then ``on_scores``/``on_access``, the hits (experts
ready before the step), and ``acquire``/``loaded``/``release`` of the step's experts.
Prompts run back to back through the same caches (a chat keeps its cache across turns).

Every layer's cache and policy see only that layer's column and the previous layer's
column of the trace, so layers are replayed one after the other; the result is the same
as token-major order. Belady's optimum (an oracle: it reads the future) is here for
reference only.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cache import ExpertCache, PartPool
from .layout import Part
from .policies import POLICIES, make_policy

ORACLE = "belady"
SCORE_KEYS = ("gate_probs", "topk_weights_renorm")


class TraceError(ValueError):
    """A trace file that cannot be replayed (the message names the file and the reason)."""


@dataclass
class Trace:
    """A routing trace: expert ids per token and layer, prompt lengths, optional weights."""

    path: str
    ids: np.ndarray  # [tokens, layers, k] int64
    prompt_lens: np.ndarray  # [prompts] int64, summing to tokens
    num_experts: int
    weights: np.ndarray | None = None  # [tokens, layers, k] router weights of the chosen experts

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def layers(self) -> int:
        return self.ids.shape[1]

    @property
    def k(self) -> int:
        return self.ids.shape[2]


@dataclass
class Result:
    """One replay of a trace under one policy at one cache fraction."""

    policy: str
    cache_fraction: float
    slots: int
    tokens: int
    layers: int
    hits: int
    lookups: int
    loads: int
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time (the honest cost on a shared machine)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def loads_per_token(self) -> float:
        """Expert loads per token, summed over the replayed layers (loads ahead included)."""
        return self.loads / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        return {"policy": self.policy, "cache_fraction": self.cache_fraction,
                "hit_rate": self.hit_rate, "loads_per_token": self.loads_per_token}


def load_trace(path: str | Path, num_experts: int | None = None) -> Trace:
    """Read and check a trace ``.npz``; ``num_experts`` defaults to the file's
    ``num_experts`` entry or the largest id + 1."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise TraceError(f"{path}: not an .npz file ({err}); a trace is written by "
                         f"numpy.savez with a 'topk_ids' array") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise TraceError(f"{path}: not an .npz file (a single .npy array); save the trace "
                         f"with numpy.savez(path, topk_ids=...)")
    with data:
        if "topk_ids" not in data.files and {"ids", "scores", "meta"} <= set(data.files):
            return _d2moe_trace(path, num_experts)
        if "topk_ids" not in data.files:
            raise TraceError(f"{path}: no 'topk_ids' array (has: {', '.join(data.files) or 'none'})")
        ids = data["topk_ids"]
        if ids.ndim != 3 or 0 in ids.shape:
            raise TraceError(f"{path}: 'topk_ids' must be [tokens, layers, k] and non-empty, "
                             f"got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TraceError(f"{path}: 'topk_ids' must hold integers, got {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.min() < 0:
            raise TraceError(f"{path}: 'topk_ids' has negative expert ids (min {ids.min()})")
        srt = np.sort(ids, axis=-1)
        if (srt[..., 1:] == srt[..., :-1]).any():
            t, l = np.argwhere((srt[..., 1:] == srt[..., :-1]).any(-1))[0]
            raise TraceError(f"{path}: token {t} layer {l} lists an expert twice {ids[t, l].tolist()}; "
                             f"a token's k experts must be distinct")
        lens = data["prompt_lens"].astype(np.int64) if "prompt_lens" in data.files else np.array([len(ids)])
        if lens.ndim != 1 or (lens < 0).any() or lens.sum() != len(ids):
            raise TraceError(f"{path}: 'prompt_lens' must be non-negative and sum to the "
                             f"{len(ids)} tokens of 'topk_ids', got sum {int(lens.sum())}")
        if num_experts is None and "num_experts" in data.files:
            num_experts = int(data["num_experts"])
        weights = None
        for key in SCORE_KEYS:
            if key in data.files:
                weights = data[key].astype(np.float64)
                if weights.shape != ids.shape:
                    raise TraceError(f"{path}: '{key}' has shape {weights.shape}, 'topk_ids' {ids.shape}")
                break
    top = int(ids.max()) + 1
    num_experts = top if num_experts is None else int(num_experts)
    if num_experts < top:
        raise TraceError(f"{path}: expert id {top - 1} does not exist among {num_experts} experts")
    return Trace(str(path), ids, lens, num_experts, weights)


def _d2moe_trace(path: Path, num_experts: int | None) -> Trace:
    """A trace of :func:`d2moe_mlx.trace.record_trace` as one prompt, its scores as weights."""
    from .trace import load_trace as load_recorded

    try:
        rec = load_recorded(path)
    except ValueError as err:
        raise TraceError(str(err)) from err
    ids = np.ascontiguousarray(np.transpose(rec["ids"], (1, 0, 2))).astype(np.int64)
    weights = np.ascontiguousarray(np.transpose(rec["scores"], (1, 0, 2))).astype(np.float64)
    num_experts = int(rec["meta"]["num_experts"]) if num_experts is None else num_experts
    if ids.size == 0 or ids.min() < 0 or ids.max() >= num_experts:
        raise TraceError(f"{path}: expert ids outside 0..{num_experts - 1}")
    return Trace(str(path), ids, np.array([len(ids)]), num_experts, weights)


def slots_for(trace: Trace, fraction: float) -> int:
    """Slots per layer for a cache ``fraction`` of the experts (at least k)."""
    if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"cache fraction must be in (0, 1], got {fraction!r}")
    slots = int(round(fraction * trace.num_experts))
    if slots < trace.k:
        raise ValueError(f"cache fraction {fraction} gives {slots} slots per layer, fewer than the "
                         f"{trace.k} experts a token runs (k); use at least "
                         f"{trace.k / trace.num_experts:.4g}")
    return slots


def select(trace: Trace, tokens: int | None = None, layers: list[int] | None = None
           ) -> tuple[Trace, list[int]]:
    """The first ``tokens`` tokens (prompt lengths cut to match) and the checked layer columns."""
    if tokens is not None:
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        ends = np.cumsum(trace.prompt_lens)
        keep = trace.prompt_lens.copy()
        keep[ends > tokens] = np.maximum(trace.prompt_lens - (ends - tokens), 0)[ends > tokens]
        w = None if trace.weights is None else trace.weights[:tokens]
        trace = Trace(trace.path, trace.ids[:tokens], keep[keep > 0], trace.num_experts, w)
    cols = list(range(trace.layers)) if layers is None else sorted(set(layers))
    bad = [c for c in cols if not 0 <= c < trace.layers]
    if bad:
        raise ValueError(f"layer columns {bad} do not exist; the trace has columns 0..{trace.layers - 1}")
    return trace, cols


def layer_cache(layer: int, slots: int, num_experts: int, policy: str, **options) -> ExpertCache:
    """One layer's runtime cache: a slot table of ``slots`` (no tensors) and its policy."""
    pool = PartPool(layer, Part(0, 0, 0, 4), [], slots, num_experts, mx.float32)
    return ExpertCache(layer, [pool], make_policy(policy, num_experts, **options))


def replay_layer(trace: Trace, col: int, slots: int, policy: str, **options) -> tuple[int, int]:
    """(hits, loads) of layer column ``col`` under ``policy`` with ``slots`` per layer."""
    cache = layer_cache(col, slots, trace.num_experts, policy, **options)
    pool, pol = cache.pools[0], cache.policy
    ids = trace.ids[:, col]
    prev = trace.ids[:, col - 1, None] if col > 0 else None  # [tokens, 1, k]
    weights = trace.weights[:, col] if pol.needs_scores else None
    scores = np.zeros(trace.num_experts)
    ones = np.ones(trace.k, dtype=np.int64)
    hits = loads = 0
    for t in range(len(ids)):
        if prev is not None:  # the previous layer ran this token: its routing is known
            ahead = pol.on_route(prev[t])
            if len(ahead):
                pinned, to_load = cache.acquire(0, ahead)
                for _, slot in to_load:
                    cache.loaded(0, slot)
                loads += len(to_load)
                cache.release(0, pinned)
        experts = ids[t]
        if weights is not None:
            scores[:] = 0.0
            scores[experts] = weights[t]
            pol.on_scores(scores)
        pol.on_access(experts, ones)
        hits += int(pool.is_ready[experts].sum())  # before the step's experts are placed
        pinned, to_load = cache.acquire(0, experts)
        for _, slot in to_load:
            cache.loaded(0, slot)
        loads += len(to_load)
        cache.release(0, pinned)
    return hits, loads


def belady_layer(trace: Trace, col: int, slots: int) -> tuple[int, int]:
    """(hits, loads) of Belady's optimum: evict the resident expert used furthest ahead."""
    ids = trace.ids[:, col].tolist()
    never = len(ids) + 1
    next_use = [[0] * trace.k for _ in ids]
    seen: dict[int, int] = {}
    for t in range(len(ids) - 1, -1, -1):
        row = next_use[t]
        for j, e in enumerate(ids[t]):
            row[j] = seen.get(e, never)
            seen[e] = t
    resident: dict[int, int] = {}  # expert -> its next use
    hits = loads = 0
    for t, experts in enumerate(ids):
        for j, e in enumerate(experts):
            if e in resident:
                hits += 1
            else:
                loads += 1
            resident[e] = next_use[t][j]
        over = len(resident) - slots
        if over > 0:
            now = set(experts)
            ranked = sorted((e for e in resident if e not in now), key=resident.__getitem__)
            for e in ranked[-over:]:
                del resident[e]
    return hits, loads


def replay(trace: Trace, policy: str, fraction: float, layers: list[int] | None = None,
           **options) -> Result:
    """Replay ``trace`` (its ``layers`` columns, default all) under ``policy`` (a runtime
    policy name or ``belady``) with ``fraction`` of the experts cached per layer."""
    if policy != ORACLE and policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES + (ORACLE,))}")
    slots = slots_for(trace, fraction)
    trace, cols = select(trace, layers=layers)
    if policy == "score" and trace.weights is None:
        raise ValueError(f"{trace.path}: policy 'score' needs router weights "
                         f"({' or '.join(SCORE_KEYS)}), and the trace has none")
    start, cpu = time.perf_counter(), time.process_time()
    hits = loads = 0
    for col in cols:
        h, n = belady_layer(trace, col, slots) if policy == ORACLE else replay_layer(
            trace, col, slots, policy, **options)
        hits, loads = hits + h, loads + n
    name = f"{ORACLE} (oracle)" if policy == ORACLE else policy
    return Result(name, fraction, slots, trace.tokens, len(cols), hits,
                  trace.tokens * len(cols) * trace.k, loads, time.perf_counter() - start,
                  time.process_time() - cpu)


def run(path: str, fractions: list[float], policies: list[str] | None = None,
        tokens: int | None = None, layers: list[int] | None = None, note=print) -> list[Result]:
    """Replay a trace file for every fraction x policy (default: every runtime policy and
    Belady's oracle); policies the trace cannot feed (``score`` without weights) are
    skipped with a ``note``."""
    trace = load_trace(path)
    for f in fractions:
        slots_for(trace, f)  # every bad fraction fails before the first long replay
    trace, cols = select(trace, tokens, layers)
    names = list(policies) if policies else [*POLICIES, ORACLE]
    for name in names:
        if name != ORACLE and name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES + (ORACLE,))}")
    if "score" in names and trace.weights is None:
        note(f"note: skipping policy 'score': {path} has no router weights ({' or '.join(SCORE_KEYS)})")
        names.remove("score")
    return [replay(trace, name, f, cols) for f in fractions for name in names]


def table(results: list[Result]) -> str:
    """Human-readable tables, one per cache fraction; bytes relative to ``lru`` where replayed."""
    out = []
    for f in dict.fromkeys(r.cache_fraction for r in results):
        rows = [r for r in results if r.cache_fraction == f]
        lru = next((r for r in rows if r.policy == "lru"), None)
        out.append(f"cache {f:g} ({rows[0].slots} slots per layer), {rows[0].tokens} tokens x "
                   f"{rows[0].layers} layers")
        out.append(f"  {'policy':<16} {'hit rate':>8} {'loads/token':>12} {'bytes vs lru':>12} "
                   f"{'wall s':>8} {'cpu s':>8}")
        for r in rows:
            rel = f"{r.loads / lru.loads:.3f}" if lru and lru.loads else "-"
            out.append(f"  {r.policy:<16} {r.hit_rate:8.4f} {r.loads_per_token:12.3f} {rel:>12} "
                       f"{r.seconds:8.1f} {r.cpu_seconds:8.2f}")
    return "\n".join(out)
