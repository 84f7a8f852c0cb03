"""Eviction policies against small reference implementations written here.

The references keep the raw history (which experts each step used, with how many
tokens, and the router's scores) and compute each expert's priority from it
directly, then sort candidates by (priority, last use, candidate order).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from d2moe_mlx.policies import POLICIES, CoocPolicy, LFUPolicy, LRUPolicy, ScorePolicy, make_policy


class Reference:
    """History-keeping reference of the three policies."""

    def __init__(self, name: str, num_experts: int, decay: float = 0.95, window: int = 16):
        self.name, self.num_experts, self.decay, self.window = name, num_experts, decay, window
        self.accesses: list[dict[int, float]] = []  # step -> {expert: tokens}
        self.scores: list[np.ndarray] = []

    def access(self, experts, counts=None):
        counts = [1.0] * len(experts) if counts is None else counts
        step = {}
        for e, c in zip(experts, counts):
            step[int(e)] = step.get(int(e), 0.0) + float(c)
        self.accesses.append(step)

    def last_use(self, e: int) -> int:
        steps = [t + 1 for t, step in enumerate(self.accesses) if e in step]
        return steps[-1] if steps else -1

    def priority(self, e: int) -> float:
        if self.name == "lru":
            return self.last_use(e)
        if self.name == "lfu":  # tokens of each past step, weighted decay^(age in steps)
            now = len(self.accesses)
            return sum(step.get(e, 0.0) * self.decay ** (now - 1 - t) for t, step in enumerate(self.accesses))
        recent = self.scores[-self.window:]  # score: mean gate score over the window
        return sum(float(s[e]) for s in recent) / len(recent) if recent else 0.0

    def victims(self, candidates, n: int) -> list[int]:
        ranked = sorted(candidates, key=lambda e: (self.priority(int(e)), self.last_use(int(e))))
        return [int(e) for e in ranked[:max(n, 0)]]


def _policy(name, num_experts, **kw):
    return make_policy(name, num_experts, **kw)


@pytest.mark.parametrize("name,options", [("lru", {}), ("lfu", {"decay": 0.8}), ("lfu", {"decay": 1.0}),
                                          ("score", {"window": 4}), ("score", {"window": 1})])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_victims_match_reference(name, options, seed):
    rng = np.random.default_rng(seed)
    E = 16
    pol = _policy(name, E, **options)
    ref = Reference(name, E, **options)
    for step in range(40):
        k = int(rng.integers(1, 5))
        experts = np.sort(rng.choice(E, size=k, replace=False))
        counts = rng.integers(1, 9, size=k)
        use_counts = step % 3 != 0
        pol.on_access(experts, counts if use_counts else None)
        ref.access(experts.tolist(), counts.tolist() if use_counts else None)
        if name == "score":
            scores = rng.dirichlet(np.ones(E))  # every expert's score: chosen or not
            pol.on_scores(scores)
            ref.scores.append(scores)
        candidates = rng.permutation(E)[: int(rng.integers(1, E + 1))]
        n = int(rng.integers(0, len(candidates) + 2))
        want = ref.victims(candidates.tolist(), n)
        got = pol.victims(candidates, n).tolist()
        assert got == want, (step, got, want)
        keys = pol.keys()[candidates]
        np.testing.assert_allclose(keys, [ref.priority(int(e)) for e in candidates], rtol=1e-12, atol=1e-12)


def test_lru_order_and_never_used_first():
    pol = LRUPolicy(6)
    for experts in ([1, 2], [3], [1], [4, 2]):
        pol.on_access(np.array(experts))
    # never used (0, 5) in candidate order, then 3 (step 2), 1 (step 3), 2 and 4 (step 4)
    assert pol.victims(np.array([4, 2, 1, 5, 3, 0]), 6).tolist() == [5, 0, 3, 1, 4, 2]
    assert pol.victims(np.array([4, 2, 1]), 1).tolist() == [1]
    assert pol.victims(np.array([4, 2, 1]), 0).tolist() == []
    assert pol.victims(np.array([], dtype=np.int64), 3).tolist() == []


def test_lfu_decay_and_recency_tie_break():
    pol = LFUPolicy(4, decay=0.5)
    pol.on_access(np.array([0]), np.array([8]))  # 8 tokens long ago
    for _ in range(3):
        pol.on_access(np.array([1]), np.array([2]))  # 2 tokens in each recent step
    # expert 0: 8 * 0.5^3 = 1; expert 1: 2 + 1 + 0.5 = 3.5
    np.testing.assert_allclose(pol.keys(), [1.0, 3.5, 0.0, 0.0])
    assert pol.victims(np.array([1, 0, 2]), 3).tolist() == [2, 0, 1]
    flat = LFUPolicy(3, decay=1.0)  # plain LFU: equal counts, the older use goes first
    flat.on_access(np.array([2]), np.array([5]))
    flat.on_access(np.array([0]), np.array([5]))
    flat.on_access(np.array([1]), np.array([7]))
    assert flat.victims(np.array([0, 1, 2]), 3).tolist() == [2, 0, 1]


def test_score_counts_unchosen_experts_and_forgets_old_steps():
    pol = ScorePolicy(3, window=2)
    assert pol.victims(np.array([2, 0, 1]), 1).tolist() == [2]  # no scores yet: candidate order
    pol.on_access(np.array([0]))
    pol.on_scores(np.array([0.1, 0.6, 0.3]))  # expert 1 scores high without being chosen
    assert pol.victims(np.array([0, 1, 2]), 3).tolist() == [0, 2, 1]
    pol.on_access(np.array([0]))
    pol.on_scores(np.array([0.5, 0.2, 0.3]))  # mean: 0.3, 0.4, 0.3 -> tie 0/2: older use first
    assert pol.victims(np.array([0, 1, 2]), 3).tolist() == [2, 0, 1]
    pol.on_access(np.array([1]))
    pol.on_scores(np.array([0.9, 0.05, 0.05]))  # window 2: the first step is forgotten
    np.testing.assert_allclose(pol.keys(), [0.7, 0.125, 0.175])
    assert pol.victims(np.array([0, 1, 2]), 2).tolist() == [1, 2]


@pytest.mark.parametrize("name,options,match", [
    ("lfu", {"decay": 0.0}, "decay"),
    ("lfu", {"decay": -0.5}, "decay"),
    ("lfu", {"decay": 1.5}, "decay"),
    ("lfu", {"decay": math.nan}, "decay"),
    ("lfu", {"decay": "0.9"}, "decay"),
    ("score", {"window": 0}, "window"),
    ("score", {"window": -3}, "window"),
    ("score", {"window": 2.5}, "window"),
    ("lru", {"decay": 0.9}, "decay"),  # an option the policy does not have
    ("lfu", {"window": 4}, "window"),
    ("score", {"decay": 0.9}, "decay"),
    ("cooc", {"lift": 0.0}, "lift"),
    ("cooc", {"lift": -1.0}, "lift"),
    ("cooc", {"lift": "2"}, "lift"),
    ("cooc", {"lift": math.nan}, "lift"),
    ("cooc", {"decay": 0.9}, "decay"),
    ("mru", {}, "unknown cache policy"),
    ("", {}, "unknown cache policy"),
])
def test_bad_options_raise_value_error(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_policy(name, 8, **options)


def test_score_needs_one_score_per_expert():
    pol = ScorePolicy(4)
    with pytest.raises(ValueError, match="expected 4 scores"):
        pol.on_scores(np.ones(3))
    assert pol.needs_scores and not LRUPolicy(4).needs_scores and not LFUPolicy(4).needs_scores


def test_make_policy_names():
    assert POLICIES == ("lru", "lfu", "score", "cooc")
    for name, cls in zip(POLICIES, (LRUPolicy, LFUPolicy, ScorePolicy, CoocPolicy)):
        pol = make_policy(name, 5)
        assert type(pol) is cls and pol.name == name and pol.num_experts == 5
    assert make_policy("lfu", 5, decay=0.5).decay == 0.5
    assert make_policy("score", 5, window=3).window == 3


def test_cooc_hand_case():
    """Transition keys and cross-layer predictions computed by hand."""
    pol = CoocPolicy(4, lift=2.0)  # k = 1 of 4 experts: predict at probability >= 0.5
    assert pol.on_route(np.array([[0]])).tolist() == []  # empty tables predict nothing
    pol.on_access(np.array([1]))  # layer pair (0 -> 1)
    pol.on_route(np.array([[0]]))
    pol.on_access(np.array([2]))  # (0 -> 2); transition 1 -> 2
    pol.on_route(np.array([[0]]))
    pol.on_access(np.array([2]))  # (0 -> 2); transition 2 -> 2
    pol.on_access(np.array([1]))  # no route: the pair table is unchanged; transition 2 -> 1
    np.testing.assert_allclose(pol.cross[0], [0, 1, 2, 0])
    assert pol.cross_n.tolist() == [3, 0, 0, 0]
    np.testing.assert_allclose(pol.keys(), [0, 0, 1, 0])  # after 1 came 2, always
    assert pol.victims(np.array([1, 2, 3]), 2).tolist() == [3, 1]  # key 0 both; 3 never used
    assert pol.on_route(np.array([[0]])).tolist() == [2]  # P(2 | 0) = 2/3 >= 0.5, P(1 | 0) = 1/3
    assert pol.on_route(np.array([[0], [1]])).tolist() == []  # several tokens: no prediction
    with pytest.raises(ValueError, match="previous layer's expert ids"):
        pol.on_route(np.array([[4]]))
