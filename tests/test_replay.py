"""Trace replay against references written here.

The references keep their own state: an OrderedDict LRU (k = 1, where LRU is unique)
and a list-of-slots LRU for k > 1 (a token's experts share a last use; ties go to the
lower slot, free slots are taken lowest first and a victim's slot goes to the next
missing expert: the cache's documented placement), and Belady's optimum by hand.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from click.testing import CliRunner

from d2moe_mlx.cli import main
from d2moe_mlx.replay import TraceError, load_trace, replay, run, select


def write(tmp_path, ids, name="t.npz", **extra):
    path = tmp_path / name
    np.savez(path, topk_ids=np.asarray(ids), **extra)
    return str(path)


def random_trace(rng, tokens, layers, experts, k):
    """Ids with some reuse: each token keeps each of the previous token's experts w.p. 0.4."""
    ids = np.zeros((tokens, layers, k), dtype=np.int64)
    for l in range(layers):
        prev = rng.choice(experts, k, replace=False)
        for t in range(tokens):
            keep = [e for e in prev if rng.random() < 0.4]
            rest = [e for e in rng.permutation(experts) if e not in keep][:k - len(keep)]
            ids[t, l] = prev = np.array(keep + rest)
    return ids


def lru_ordered_dict(column, slots):
    """k = 1: the textbook LRU."""
    cache, hits = OrderedDict(), 0
    for (e,) in column.tolist():
        if e in cache:
            hits += 1
            cache.move_to_end(e)
        else:
            cache[e] = True
            if len(cache) > slots:
                cache.popitem(last=False)
    return hits, len(column) - hits


def lru_slots(column, slots):
    """k >= 1: slots as a list; victims by (last use, slot)."""
    expert = [None] * slots
    last = {}
    hits = loads = 0
    for t, row in enumerate(column.tolist()):
        hits += sum(e in expert for e in row)
        for e in row:
            last[e] = t
        missing = [e for e in row if e not in expert]
        free = [s for s in range(slots) if expert[s] is None]
        victims = sorted((s for s in range(slots) if expert[s] is not None and expert[s] not in row),
                         key=lambda s: (last[expert[s]], s))[:max(len(missing) - len(free), 0)]
        for e, s in zip(missing, free[:len(missing)] + victims):
            expert[s] = e
        loads += len(missing)
    return hits, loads


@pytest.mark.parametrize("seed,k,fraction", [(0, 1, 0.25), (1, 1, 0.5), (2, 2, 0.25), (3, 3, 0.5),
                                             (4, 2, 0.75), (5, 4, 1.0)])
def test_lru_matches_references(tmp_path, seed, k, fraction):
    rng = np.random.default_rng(seed)
    E, T, L = 16, 300, 2
    ids = random_trace(rng, T, L, E, k)
    lens = np.array([100, 50, 0, 150])
    got = replay(load_trace(write(tmp_path, ids, prompt_lens=lens)), "lru", fraction)
    slots = round(fraction * E)
    want = [lru_slots(ids[:, l], slots) for l in range(L)]
    if k == 1:
        assert want == [lru_ordered_dict(ids[:, l], slots) for l in range(L)]
    assert (got.hits, got.loads) == tuple(map(sum, zip(*want)))
    assert got.lookups == T * L * k and got.slots == slots
    assert got.hit_rate == pytest.approx(got.hits / (T * L * k))
    assert got.loads_per_token == pytest.approx(got.loads / T)


def test_belady_and_lru_hand_case(tmp_path):
    # 0 1 2 0 1 2 with 2 slots of 4 experts: LRU always misses; Belady keeps 0 at t=2
    # (next used at 3, 1 at 4) and 2 at t=4 (0 is never used again).
    path = write(tmp_path, np.array([0, 1, 2, 0, 1, 2]).reshape(6, 1, 1), num_experts=4)
    trace = load_trace(path)
    assert trace.num_experts == 4
    lru, bel = replay(trace, "lru", 0.5), replay(trace, "belady", 0.5)
    assert (lru.hits, lru.loads) == (0, 6)
    assert (bel.hits, bel.loads) == (2, 4) and bel.policy == "belady (oracle)"


def test_hits_counted_before_insertion_and_no_reset_between_prompts(tmp_path):
    ids = np.array([[[0, 1]], [[0, 1]], [[0, 1]], [[2, 3]]])
    one = load_trace(write(tmp_path, ids, "a.npz", num_experts=8))
    # a token's own experts are not hits: the first token misses both
    first = replay(load_trace(write(tmp_path, ids[:1], "b.npz", num_experts=8)), "lru", 0.5)
    assert (first.hits, first.loads) == (0, 2)
    # prompts [1, 2, 1]: tokens 2 and 3 reuse the cache of the earlier prompts
    split = load_trace(write(tmp_path, ids, "c.npz", num_experts=8, prompt_lens=[1, 2, 1]))
    for policy in ("lru", "lfu", "cooc", "belady"):
        a, b = replay(one, policy, 0.5), replay(split, policy, 0.5)
        assert (a.hits, a.loads) == (b.hits, b.loads) == (4, 4), policy


def test_cooc_beats_lru_on_structured_trace(tmp_path):
    """Layer 1's experts follow layer 0's (a fixed map, 10% noise) and both cycle through a
    pattern LRU's window cannot hold: layer 1 loads ahead what layer 0's routing predicts,
    hits without many more loads. (Layer 0 hears no previous layer: LRU-like here.)"""
    rng = np.random.default_rng(7)
    E, k, T = 32, 2, 800
    pattern = rng.permutation(E)[:20].reshape(10, 2)  # 10 tokens, 20 experts, 8 slots
    mapping = rng.permutation(E)
    ids = np.zeros((T, 2, k), dtype=np.int64)
    for t in range(T):
        ids[t, 0] = pattern[t % 10]
        ids[t, 1] = mapping[ids[t, 0]]
        if rng.random() < 0.1:
            ids[t, 1, 0] = rng.choice([e for e in range(E) if e not in ids[t, 1]])
    trace = load_trace(write(tmp_path, ids))
    lru, cooc = replay(trace, "lru", 0.25, layers=[1]), replay(trace, "cooc", 0.25, layers=[1])
    assert lru.hit_rate < 0.05, lru.hit_rate
    assert cooc.hit_rate > 0.8 and cooc.loads < 1.15 * lru.loads, (cooc.hit_rate, cooc.loads, lru.loads)


def test_scores_feed_the_score_policy(tmp_path):
    """The trace's weights are the score policy's scores: the heavy expert stays."""
    ids = np.array([[[0, 1]], [[0, 2]], [[0, 3]], [[1, 2]], [[0, 1]]])
    w = np.array([[[0.9, 0.1]], [[0.9, 0.1]], [[0.9, 0.1]], [[0.5, 0.5]], [[0.9, 0.1]]])
    trace = load_trace(write(tmp_path, ids, num_experts=4, gate_probs=w))
    # 3 slots. t=2 places 3: both evict 1 (score: 1 and 2 tie at 0.1/3, 1 is older). t=3
    # places 1: score evicts 3 (mean 0.1/4 against 0's 2.7/4), LRU evicts 0 (0 and 3 were
    # both last used at t=2: the lower slot goes), so t=4 hits both under score, one under LRU.
    got, lru = replay(trace, "score", 0.75), replay(trace, "lru", 0.75)
    assert (got.hits, lru.hits) == (5, 4)


def test_cli_json_and_table(tmp_path):
    rng = np.random.default_rng(3)
    path = write(tmp_path, random_trace(rng, 120, 2, 8, 2), prompt_lens=[60, 60])
    res = CliRunner().invoke(main, ["replay", path, "--cache", "0.25", "--cache", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    assert "skipping policy 'score'" in res.stderr  # the trace has no weights
    rows = json.loads(res.stdout)
    want = run(path, [0.25, 0.5], note=lambda m: None)
    assert [set(r) for r in rows] == [{"policy", "cache_fraction", "hit_rate", "loads_per_token"}] * len(want)
    assert rows == [r.as_dict() for r in want]
    assert [r["policy"] for r in rows[:4]] == ["lru", "lfu", "cooc", "belady (oracle)"]
    res = CliRunner().invoke(main, ["replay", path, "--policy", "lru", "--policy", "belady",
                                    "--tokens", "50", "--layers", "1"])
    assert res.exit_code == 0, res.output
    assert "belady (oracle)" in res.stdout and "50 tokens x 1 layers" in res.stdout
    assert res.stdout.count("\n  lru ") == 1 and "lfu" not in res.stdout


def saved(path, writer):
    writer(path)
    return str(path)


@pytest.mark.parametrize("make,match", [
    (lambda d: str(d / "missing.npz"), "no such trace file"),
    (lambda d: saved(d / "x.npz", lambda f: f.write_text("hello")), "not an .npz file"),
    (lambda d: saved(d / "x.npy", lambda f: np.save(f, np.zeros((2, 1, 1)))), "not an .npz file"),
    (lambda d: saved(d / "o.npz", lambda f: np.savez(f, ids=[[[0]]])), "no 'topk_ids' array"),
    (lambda d: write(d, [[0, 1]]), r"\[tokens, layers, k\]"),
    (lambda d: write(d, [[[0.5]]]), "must hold integers"),
    (lambda d: write(d, [[[0, -1]]]), "negative expert ids"),
    (lambda d: write(d, [[[1, 1]]]), "lists an expert twice"),
    (lambda d: write(d, [[[0]], [[1]]], prompt_lens=[1, 2]), "sum to the 2 tokens"),
    (lambda d: write(d, [[[0]], [[1]]], prompt_lens=[3, -1]), "non-negative"),
    (lambda d: write(d, [[[0]], [[1]]], gate_probs=np.ones((2, 1, 2))), "'gate_probs' has shape"),
    (lambda d: write(d, [[[0]], [[5]]], num_experts=4), "expert id 5 does not exist among 4"),
])
def test_bad_traces(tmp_path, make, match):
    with pytest.raises(TraceError, match=match):
        load_trace(make(tmp_path))


def test_bad_replay_options(tmp_path):
    path = write(tmp_path, np.arange(8).reshape(2, 1, 4), num_experts=16)
    for fraction, match in [(0.0, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"), (-0.25, r"in \(0, 1\]"),
                            (0.125, "2 slots per layer, fewer than the 4 experts")]:
        with pytest.raises(ValueError, match=match):
            run(path, [0.5, fraction])  # checked before the first replay
    with pytest.raises(ValueError, match="unknown policy 'mru'"):
        run(path, [0.5], ["mru"])
    with pytest.raises(ValueError, match="needs router weights"):
        replay(load_trace(path), "score", 0.5)
    with pytest.raises(ValueError, match=r"columns \[3\] do not exist; the trace has columns 0..0"):
        run(path, [0.5], ["lru"], layers=[0, 3])
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        run(path, [0.5], ["lru"], tokens=0)
    res = CliRunner().invoke(main, ["replay", path, "--cache", "0.1"])
    assert res.exit_code != 0 and "fewer than the 4 experts" in res.output
    res = CliRunner().invoke(main, ["replay", path, "--layers", "a,b"])
    assert res.exit_code != 0 and "comma-separated layer columns" in res.output
    res = CliRunner().invoke(main, ["replay", str(tmp_path / "none.npz")])
    assert res.exit_code != 0 and "no such trace file" in res.output


def test_reads_d2moe_trace_format(tmp_path):
    """A trace written by ``d2moe trace`` ([layers, tokens, k], router scores): one prompt."""
    from d2moe_mlx.trace import FORMAT, save_trace

    rng = np.random.default_rng(5)
    ids = random_trace(rng, 60, 2, 8, 2)
    scores = rng.random(ids.shape).astype(np.float32)
    meta = {"format": FORMAT, "model_type": "x", "num_experts": 8, "k": 2, "layers": [0, 1],
            "num_tokens": 60, "scoring": "softmax"}
    save_trace({"ids": ids.transpose(1, 0, 2).astype(np.int16), "scores": scores.transpose(1, 0, 2),
                "tokens": np.arange(60, dtype=np.int32), "meta": meta}, tmp_path / "r.npz")
    trace = load_trace(tmp_path / "r.npz")
    np.testing.assert_array_equal(trace.ids, ids)
    np.testing.assert_allclose(trace.weights, scores)
    same = load_trace(write(tmp_path, ids, gate_probs=scores))
    for policy in ("lru", "score", "cooc"):
        a, b = replay(trace, policy, 0.5), replay(same, policy, 0.5)
        assert (a.hits, a.loads) == (b.hits, b.loads), policy


def test_select_cuts_prompts_and_checks_layers(tmp_path):
    ids = np.arange(120 * 3).reshape(120, 3, 1) % 16
    trace = load_trace(write(tmp_path, ids, prompt_lens=[60, 0, 60]))
    cut, cols = select(trace, 70, [2, 0, 2])
    assert cut.prompt_lens.tolist() == [60, 10] and cut.tokens == 70 and cols == [0, 2]
    np.testing.assert_array_equal(cut.ids, ids[:70])
    whole, cols = select(trace)
    assert whole.tokens == 120 and cols == [0, 1, 2]
