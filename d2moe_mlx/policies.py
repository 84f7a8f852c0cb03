"""Eviction policies of the expert cache: which resident experts to drop first.

A policy ranks the experts of one MoE layer; the cache evicts the lowest-ranked
resident expert whose slot is not in use. Policies see every step's accesses
(``on_access``) and, if ``needs_scores``, the router's scores of all experts
(``on_scores``), and they never see slots: pinning is the cache's job.

* ``lru``: least recently used.
* ``lfu``: least frequently used, counts decayed by ``decay`` per step (LFU with decay).
* ``score``: lowest average gate score over the last ``window`` steps, the scores of
  experts the token did not choose included (SMoE's policy); ties broken by recency.
"""

from __future__ import annotations

import numbers

import numpy as np

POLICIES = ("lru", "lfu", "score")


class EvictionPolicy:
    """Base class: ranks experts; ``victims`` returns the ones to evict first."""

    name = "base"
    needs_scores = False

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.step = 0
        self.last_used = np.full(num_experts, -1, dtype=np.int64)

    def on_access(self, experts: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Record one step in which ``experts`` (with ``counts`` tokens each) were used."""
        self.step += 1
        self.last_used[experts] = self.step

    def on_scores(self, scores: np.ndarray) -> None:
        """The router's mean score of every expert for this step (policies that use it)."""

    def keys(self) -> np.ndarray:
        """Per-expert priority: lower is evicted first."""
        return self.last_used.astype(np.float64)

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        """The ``n`` of ``candidates`` (expert ids) to evict first, in eviction order."""
        candidates = np.asarray(candidates, dtype=np.int64)
        if n <= 0 or candidates.size == 0:
            return candidates[:0]
        key = self.keys()[candidates]
        order = np.lexsort((self.last_used[candidates], key))  # key first, then recency
        return candidates[order[:n]]


class LRUPolicy(EvictionPolicy):
    name = "lru"


class LFUPolicy(EvictionPolicy):
    """Least frequently used with exponential decay of past counts."""

    name = "lfu"

    def __init__(self, num_experts: int, decay: float = 0.95):
        super().__init__(num_experts)
        if not isinstance(decay, numbers.Real) or isinstance(decay, bool) or not 0.0 < decay <= 1.0:
            raise ValueError(f"LFU decay must be a number in (0, 1], got {decay!r}")
        self.decay = decay
        self.freq = np.zeros(num_experts, dtype=np.float64)

    def on_access(self, experts, counts=None) -> None:
        super().on_access(experts, counts)
        self.freq *= self.decay
        experts = np.asarray(experts, dtype=np.int64)
        add = np.ones(len(experts)) if counts is None else np.asarray(counts, dtype=np.float64)
        np.add.at(self.freq, experts, add)

    def keys(self) -> np.ndarray:
        return self.freq


class ScorePolicy(EvictionPolicy):
    """SMoE: evict the expert with the lowest mean gate score over the last ``window`` steps."""

    name = "score"
    needs_scores = True

    def __init__(self, num_experts: int, window: int = 16):
        super().__init__(num_experts)
        if not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1:
            raise ValueError(f"score window must be an integer >= 1, got {window!r}")
        self.window = window
        self.history = np.zeros((window, num_experts), dtype=np.float64)
        self.filled = 0

    def on_scores(self, scores: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape[0] != self.num_experts:
            raise ValueError(f"expected {self.num_experts} scores, got {scores.shape[0]}")
        self.history[self.filled % self.window] = scores
        self.filled += 1

    def keys(self) -> np.ndarray:
        n = min(self.filled, self.window)
        if n == 0:
            return np.zeros(self.num_experts)
        return self.history[:n].mean(axis=0) if n < self.window else self.history.mean(axis=0)


def make_policy(name: str, num_experts: int, **options) -> EvictionPolicy:
    """A policy by name: ``lru``, ``lfu`` (option ``decay``) or ``score`` (option ``window``)."""
    classes = {"lru": LRUPolicy, "lfu": LFUPolicy, "score": ScorePolicy}
    if name not in classes:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    allowed = {"lru": (), "lfu": ("decay",), "score": ("window",)}[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:  # a ValueError like the other bad options, not the constructor's TypeError
        raise ValueError(f"cache policy {name!r} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(allowed) or 'none'}")
    return classes[name](num_experts, **options)
