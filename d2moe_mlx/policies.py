"""Eviction policies of the expert cache: which resident experts to drop first.

A policy ranks the experts of one MoE layer; the cache evicts the lowest-ranked
resident expert whose slot is not in use. Policies see every step's accesses
(``on_access``) and, if ``needs_scores``, the router's scores of all experts
(``on_scores``), and they never see slots: pinning is the cache's job.

* ``lru``: least recently used.
* ``lfu``: least frequently used, counts decayed by ``decay`` per step (LFU with decay).
* ``score``: lowest average gate score over the last ``window`` steps, the scores of
  experts the token did not choose included (SMoE's policy); ties broken by recency.
* ``cooc``: co-occurrence (docs/EVICTION.md). Evicts the expert least likely to follow the
  step's experts (a transition table of this layer, learned online; ties by recency), and
  asks for the experts that the previous layer's routing of the same token predicts with
  probability >= ``lift`` x chance (k / experts) to be loaded ahead (a table of layer
  pairs, learned online).

Whoever owns the previous layer's routing of a single token calls ``on_route`` with it
before this layer's call; policies return the experts they want loaded ahead (none but
``cooc``).
"""

from __future__ import annotations

import numbers

import numpy as np

_NONE = np.empty(0, dtype=np.int64)  # on_route: nothing to load ahead (one array, not one per call)
_NONE.setflags(write=False)
POLICIES = ("lru", "lfu", "score", "cooc")


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

    def on_route(self, prev_ids: np.ndarray) -> np.ndarray:
        """The previous layer's expert ids [tokens, k] of the step about to run here; returns
        the experts this policy wants loaded ahead of the step (none by default)."""
        return _NONE

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


class CoocPolicy(EvictionPolicy):
    """Co-occurrence: transition-table eviction plus cross-layer loads ahead.

    ``trans[i, j]`` counts the steps in which expert ``j`` ran right after a step that ran
    ``i`` (this layer); an expert's key is its mean probability of following the last
    step's experts, so the least likely is evicted (ties: least recently used; with empty
    tables it is LRU). ``cross[i, j]`` counts the single-token steps in which the previous
    layer ran ``i`` and this layer ``j``; ``on_route`` returns the experts whose mean
    probability given the previous layer's experts is >= ``lift`` times chance (k / the
    number of experts; 2.7 x 6/64 = 0.25 on DeepSeek-V2-Lite), at most k of them.
    Multi-token steps (prefill) update recency and the transition table only."""

    name = "cooc"

    def __init__(self, num_experts: int, lift: float = 2.7):
        super().__init__(num_experts)
        if not isinstance(lift, numbers.Real) or isinstance(lift, bool) or not lift > 0.0:
            raise ValueError(f"cooc lift must be a number > 0 (a multiple of chance), got {lift!r}")
        self.lift = float(lift)
        self.trans = np.zeros((num_experts, num_experts), dtype=np.float64)
        self.trans_n = np.zeros(num_experts, dtype=np.float64)
        self.cross = np.zeros((num_experts, num_experts), dtype=np.float64)
        self.cross_n = np.zeros(num_experts, dtype=np.float64)
        self.follow = np.zeros(num_experts, dtype=np.float64)  # the keys
        self._last: np.ndarray | None = None  # the last step's experts
        self._route: np.ndarray | None = None  # the previous layer's experts of this step

    def on_route(self, prev_ids: np.ndarray) -> np.ndarray:
        prev_ids = np.asarray(prev_ids, dtype=np.int64)
        self._route = None
        if prev_ids.ndim != 2 or prev_ids.shape[0] != 1:
            return np.empty(0, dtype=np.int64)  # only a single token's routing is predictive
        prev = np.unique(prev_ids[0])  # (a block may repeat an expert in a token)
        if prev.size and (prev.min() < 0 or prev.max() >= self.num_experts):
            raise ValueError(f"previous layer's expert ids must lie in 0..{self.num_experts - 1}, "
                             f"got {prev_ids.tolist()}")
        self._route = prev
        prob = (self.cross[prev] / np.maximum(self.cross_n[prev], 1.0)[:, None]).sum(axis=0) / len(prev)
        order = np.argsort(-prob, kind="stable")[:prev_ids.shape[1]]
        return order[prob[order] >= min(1.0, self.lift * prev_ids.shape[1] / self.num_experts)]

    def on_access(self, experts, counts=None) -> None:
        super().on_access(experts, counts)
        experts = np.asarray(experts, dtype=np.int64)
        if self._route is not None:  # a single-token step: learn the layer pair
            self.cross[self._route[:, None], experts] += 1.0
            self.cross_n[self._route] += 1.0
            self._route = None
        if self._last is not None:
            self.trans[self._last[:, None], experts] += 1.0
            self.trans_n[self._last] += 1.0
        self._last = experts
        self.follow = ((self.trans[experts] / np.maximum(self.trans_n[experts], 1.0)[:, None]).sum(axis=0)
                       / len(experts))

    def keys(self) -> np.ndarray:
        return self.follow


def make_policy(name: str, num_experts: int, **options) -> EvictionPolicy:
    """A policy by name: ``lru``, ``lfu`` (option ``decay``), ``score`` (option ``window``)
    or ``cooc`` (option ``lift``)."""
    classes = {"lru": LRUPolicy, "lfu": LFUPolicy, "score": ScorePolicy, "cooc": CoocPolicy}
    if name not in classes:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    allowed = {"lru": (), "lfu": ("decay",), "score": ("window",), "cooc": ("lift",)}[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:  # a ValueError like the other bad options, not the constructor's TypeError
        raise ValueError(f"cache policy {name!r} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(allowed) or 'none'}")
    return classes[name](num_experts, **options)
