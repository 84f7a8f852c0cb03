"""Level policies on hand-made routing: dual routing's thresholds, hotness, residency and
ties; SMoE substitution (never a non-resident expert, never an expert scoring at or above
(1+alpha)S, one pair per substitute); the presets; and alpha=0 / exact runs equal to
exact streaming."""

from __future__ import annotations

import numpy as np
import pytest

from d2moe_mlx.levels import QUALITIES, Call, DualRouting, Exact, for_quality


def call(ids, scores, full=None, ready=None, levels=3, experts=8):
    ids = np.asarray(ids)
    ready = np.zeros((levels, experts), dtype=bool) if ready is None else np.asarray(ready)
    return Call(0, ids, np.asarray(scores, dtype=np.float64),
                None if full is None else np.asarray(full, dtype=np.float64), ready)


def test_important_or_hot_pairs_get_the_ceiling_others_the_floor():
    p = DualRouting(1, 2, tau=0.5, hot=0.5)
    # token 0: 0.6 vs 0.3 (relative 0.5: at the threshold -> ceiling); token 1: 0.8 vs 0.1
    d = p.decide(call([[0, 1], [2, 3]], [[0.6, 0.3], [0.8, 0.1]]))
    assert d.levels.tolist() == [[2, 2], [2, 1]] and d.ids is None
    # expert 5 chosen by both tokens (hot: >= 2 and >= 0.5 * 2 tokens) -> ceiling
    d = p.decide(call([[4, 5], [6, 5]], [[0.9, 0.05], [0.9, 0.05]]))
    assert d.levels.tolist() == [[2, 2], [2, 2]]
    d = DualRouting(1, 2, tau=0.5, hot=1.0).decide(call([[4, 5], [6, 7]], [[0.9, 0.05], [0.9, 0.05]]))
    assert d.levels.tolist() == [[2, 1], [2, 1]]



def test_an_expert_repeated_within_a_token_is_hot_only_if_several_tokens_name_it():
    p = DualRouting(1, 2, tau=0.5, hot=0.5)
    # token 0 names expert 5 twice (longcat_flash's zero-expert picks): one token, not hot
    d = p.decide(call([[4, 5, 5], [6, 7, 3]], [[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]]))
    assert d.levels.tolist() == [[2, 1, 1], [2, 1, 1]]
    d = p.decide(call([[4, 5, 5], [6, 5, 3]], [[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]]))
    assert d.levels.tolist() == [[2, 2, 2], [2, 2, 1]]  # two tokens name 5: hot


def test_distinct_experts_count_an_expert_once_per_call_and_once_per_token():
    from d2moe_mlx.pairs import distinct_experts, token_counts

    rng = np.random.default_rng(0)
    for shape in [(1, 4), (1, 1), (5, 3), (40, 6)]:
        for _ in range(20):
            ids = rng.integers(0, 6, shape)
            experts, first, counts = distinct_experts(ids.reshape(-1), shape[1])
            flat = ids.reshape(-1).tolist()
            order = list(dict.fromkeys(flat)) if shape[0] == 1 else sorted(set(flat))
            assert experts.tolist() == order and first.tolist() == [flat.index(e) for e in order]
            assert counts.tolist() == [sum(e in row for row in ids.tolist()) for e in order]
            want = [[sum(e in r for r in ids.tolist()) for e in row] for row in ids.tolist()]
            assert token_counts(ids).tolist() == want

def test_residency_runs_a_missing_level_at_a_higher_ready_one_never_lower():
    p = DualRouting(0, 2, tau=0.5)
    ready = np.zeros((3, 8), dtype=bool)
    ready[2, 1] = True  # expert 1 ready only at level 2
    ready[0, 3] = ready[2, 3] = True  # expert 3 ready at 0 and 2
    ready[1, 5] = True  # expert 5 ready at level 1 only
    d = p.decide(call([[0, 1, 3, 5]], [[0.9, 0.1, 0.1, 0.9]], ready=ready))
    # 0: important, nothing ready -> 2 (a read); 1: floor 0 not ready, 2 ready -> 2 (no read)
    # 3: floor 0 ready -> 0 (cheaper to compute); 5: important (2), only 1 ready (lower) -> 2
    assert d.levels.tolist() == [[2, 2, 0, 2]]


def test_nothing_and_everything_resident():
    p = DualRouting(1, 2, tau=0.5, alpha=0.3)
    ids, scores = [[0, 1]], [[0.5, 0.2]]
    full = [[0.5, 0.2, 0.15, 0.05, 0.04, 0.03, 0.02, 0.01]]
    d = p.decide(call(ids, scores, full))  # nothing resident: no substitute exists
    assert d.ids is None and d.substituted == 0 and d.levels.tolist() == [[2, 1]]
    d = p.decide(call(ids, scores, full, ready=np.ones((3, 8), dtype=bool)))
    assert d.ids is None and d.levels.tolist() == [[2, 1]]  # all hits: nothing to substitute


def _substitution_case(alpha, ready_experts, level=1):
    # S (3rd highest) = 0.20; activated 1 scores 0.22 in [S, (1+a)S) for a >= 0.1
    full = np.array([[0.40, 0.22, 0.20, 0.19, 0.10, 0.05, 0.03, 0.01]])
    ready = np.zeros((3, 8), dtype=bool)
    ready[level, ready_experts] = True
    return DualRouting(1, 2, tau=0.9, alpha=alpha).decide(
        call([[0, 1]], full[:, [0, 1]], full, ready=ready))


def test_substitution_picks_the_best_resident_inactive_expert_in_the_band():
    d = _substitution_case(0.25, [2, 3, 4])
    # band for substitutes: [(1-a)S, S) = [0.15, 0.20): expert 3 (0.19); 2 scores S itself
    assert d.substituted == 1 and d.ids.tolist() == [[0, 3]] and d.levels[0, 1] == 1
    assert _substitution_case(0.25, [4, 5]).ids is None  # 4 (0.10) is below (1-a)S
    assert _substitution_case(0.0, [3]).ids is None  # alpha = 0: no substitution
    assert _substitution_case(0.05, [3]).ids is None  # 0.22 >= (1+a)S = 0.21: always runs


def test_substitution_never_touches_important_or_resident_pairs_or_reuses_a_substitute():
    rng = np.random.default_rng(0)
    p = DualRouting(0, 2, tau=0.3, alpha=0.35)
    for _ in range(200):
        n, e, k = 5, 16, 4
        logits = rng.normal(size=(n, e)) * 2
        full = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        ids = np.argsort(-full, -1)[:, :k]
        ready = rng.random((3, e)) < 0.4
        d = p.decide(call(ids, np.take_along_axis(full, ids, -1), full, ready=ready, experts=e))
        if d.ids is None:
            continue
        s = np.sort(full, -1)[:, -(k + 1)]
        changed = d.ids != ids
        rows, cols = np.nonzero(changed)
        mine = np.take_along_axis(full, ids, -1)
        assert (mine[changed] < 1.35 * s[rows]).all()  # never an expert >= (1+a)S
        assert (~ready[:, ids[changed]].any(0)).all()  # only pairs that would need a read
        new = d.ids[changed]
        assert ready[:, new].any(0).all()  # never a non-resident substitute
        assert (full[rows, new] >= 0.65 * s[rows]).all() and (full[rows, new] < s[rows]).all()
        for t in range(n):  # a token's experts stay distinct
            assert len(set(d.ids[t].tolist())) == k
        assert d.substituted == int(changed.sum())


def test_presets_and_their_options():
    assert isinstance(for_quality("exact", 2), Exact) and for_quality("exact", 2).uniform == 2
    for name in ("high", "balanced", "fast"):
        p = for_quality(name, 2)
        assert p.ceiling == 2 and p.levels_used[-1] == 2 and p.uniform is None
    assert for_quality("fast", 2).floor_level == 0 and for_quality("high", 2).floor_level == 1
    assert for_quality("fast", 1).floor_level == 0  # never below level 0
    assert for_quality("balanced", 2, alpha=0.6, floor=0).alpha == 0.6
    assert for_quality("balanced", 2, floor=0).levels_used == (0, 1, 2)
    with pytest.raises(ValueError, match="unknown quality 'best'.*exact, high, balanced, fast"):
        for_quality("best", 2)
    with pytest.raises(ValueError, match="takes no options"):
        for_quality("exact", 2, alpha=0.3)
    with pytest.raises(ValueError, match="alpha"):
        DualRouting(0, 1, alpha=1.5)
    assert set(QUALITIES) == {"exact", "high", "balanced", "fast", "learned"}
    with pytest.raises(ValueError, match="needs the store"):
        for_quality("learned", 2)


def test_stall_budget_drops_the_least_important_reads_to_the_floor():
    p = DualRouting(0, 2, tau=0.1, stall=2.0)  # everything important enough for the ceiling
    ready = np.zeros((3, 8), dtype=bool)
    ready[0, :] = True  # every expert ready at the floor
    ids, scores = [[0, 1, 2, 3]], [[0.4, 0.3, 0.2, 0.1]]
    # reading an expert at level 2 costs 1.0 s, a token's compute 1.0 s: 2 reads fit
    c = call(ids, scores, ready=ready)
    c.read_s, c.compute_s = [0.1, 0.5, 1.0], [0.2, 0.5, 1.0]
    d = p.decide(c)
    assert d.levels.tolist() == [[2, 2, 0, 0]]  # the two least important run at the floor
    c.compute_s = [0.2, 0.5, 10.0]  # plenty of compute to hide reads behind: no change
    assert p.decide(c).levels.tolist() == [[2, 2, 2, 2]]
    c.read_s = None  # no profile: no budget
    c.compute_s = [0.2, 0.5, 1.0]
    assert p.decide(c).levels.tolist() == [[2, 2, 2, 2]]


LEVELS_COVER = {0: (0,), 1: (1,), 2: (2,)}  # levels layout: one part per level
PLANES_COVER = {0: (0,), 1: (0, 1), 2: (0, 1, 2)}  # planes layout: level l reads parts 0..l


def test_fit_pools_keeps_the_most_valuable_experts_above_the_floor():
    from d2moe_mlx.levels import fit_pools

    ids = np.array([[0, 1, 2, 3]])
    levels = np.array([[2, 2, 2, 0]])
    scores = np.array([[0.1, 0.4, 0.3, 0.2]])
    # two slots above the floor at level 2: expert 0 (lowest score) drops to the floor
    got = fit_pools(ids, levels, scores, 0, LEVELS_COVER, {0: 4, 2: 2})
    assert got.tolist() == [[0, 2, 2, 0]]
    assert levels.tolist() == [[2, 2, 2, 0]]  # the input is not changed
    # enough slots: unchanged
    assert fit_pools(ids, levels, scores, 0, LEVELS_COVER, {0: 4, 2: 3}).tolist() == levels.tolist()
    # two tokens, 6 experts, 3 slots above: still fewer than k = 4, the hot expert 2 stays
    ids2, lv2 = np.array([[0, 1, 2, 3], [2, 4, 5, 6]]), np.full((2, 4), 2)
    sc2 = np.array([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    got = fit_pools(ids2, lv2, sc2, 0, LEVELS_COVER, {0: 8, 2: 3})
    assert got.tolist() == [[2, 0, 2, 0], [2, 2, 0, 0]]
    # the call does not fit the floor's pool in one pass anyway: unchanged (grouped)
    assert fit_pools(ids, levels, scores, 0, LEVELS_COVER, {0: 3, 2: 1}).tolist() == levels.tolist()


def test_fit_pools_counts_pairs_before_scores_and_drops_every_pair_of_an_expert():
    from d2moe_mlx.levels import fit_pools

    # expert 5 is chosen by both tokens (hot) with low scores; expert 6 once, high score
    ids = np.array([[5, 6], [5, 7]])
    levels = np.array([[1, 1], [1, 1]])
    scores = np.array([[0.2, 0.9], [0.1, 0.3]])
    # two slots above the floor hold one token's experts: a call that does not fit is
    # computed in groups at its levels, unchanged
    assert fit_pools(ids, levels, scores, 0, PLANES_COVER, {0: 3, 1: 2}).tolist() == levels.tolist()
    got = fit_pools(ids, levels, scores, 0, PLANES_COVER, {0: 3, 1: 1})
    assert got.tolist() == [[1, 0], [1, 0]]  # only the hot expert keeps its pairs above
    # planes: level 2 pairs use parts 1 and 2; part 2's limit drops one to the floor,
    # which also frees its part-1 slot
    levels = np.array([[2, 2], [2, 1]])
    got = fit_pools(ids, levels, None, 0, PLANES_COVER, {0: 3, 1: 3, 2: 1})
    assert got.tolist() == [[2, 0], [2, 1]]  # no scores: the hot expert 5 keeps level 2
