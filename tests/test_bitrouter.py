"""D²MoE's trainable bit-width router: training (loss falls, alpha and capacities move the
level mix), storage in the store (round trip, corruption), the LearnedRouting policy
against an independent evaluation, and models loaded with quality="learned" (clear
error without a router; resident and streaming generation; a router forcing the
ceiling is token-identical to exact)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import d2moe_mlx.model as d2model
from d2moe_mlx import mwq
from d2moe_mlx.bitrouter import FEATURES, LearnedRouting, load_bit_router, save_bit_router
from d2moe_mlx.bitrouter_train import split_sequences, train_and_store, train_router
from d2moe_mlx.budget import budget_for_slots
from d2moe_mlx.convert.calibrate import default_calibration_text
from d2moe_mlx.engine import engine_of, policy_parts
from d2moe_mlx.layout import make_layout
from d2moe_mlx.levels import Call
from d2moe_mlx.model import load_model
from d2moe_mlx.store.format import StoreError
from d2moe_mlx.store.reader import Store

BASELINE = 64 << 20


@pytest.fixture(scope="module")
def store(small_store):
    return small_store


@pytest.fixture
def copy(store_copy):
    return store_copy


@pytest.fixture(scope="module")
def model(store):
    m, _ = load_model(store, quality="high", quality_options={"floor": 0})
    yield m
    engine_of(m).close()


def _sequences(n=4, t=24, seed=0):
    return np.random.default_rng(seed).integers(3, 256, size=(n, t)).astype(np.int32)


def test_loss_falls_on_a_tiny_run(model):
    train = _sequences()  # batch = every sequence: the same data each step
    _, history = train_router(model, train, [0, 1, 2], alpha=0.1, steps=14, batch=4, lr=0.1)
    losses = [h["loss"] for h in history]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1e-4
    assert all(math.isfinite(v) for v in losses)


def test_expected_bits_term_and_capacities_move_the_level_mix_down(model):
    train = _sequences(seed=1)
    runs = {a: train_router(model, train, [0, 1, 2], alpha=a, steps=10, batch=4, lr=0.1)[1][-1]
            for a in (0.0, 2.0)}
    assert runs[2.0]["bits"] < runs[0.0]["bits"] - 0.05
    assert runs[2.0]["share"][0] > runs[0.0]["share"][0]
    capped = train_router(model, train, [0, 1, 2], alpha=0.0, steps=10, batch=4, lr=0.1,
                          capacities=[1.0, 1.0, 0.1], top_bias=3.0)[1]
    assert capped[0]["share"][2] > 0.5 and capped[-1]["share"][2] < capped[0]["share"][2] - 0.2


def _features(scores, full):
    """The router's features of every pair, written out pair by pair."""
    n, k = scores.shape
    out = np.zeros((n, k, len(FEATURES)))
    for t in range(n):
        top = full[t].max()
        entropy = -sum(p * math.log(max(p, 1e-6)) for p in full[t]) / math.log(full.shape[1])
        for j in range(k):
            s = scores[t, j]
            rank = sum(scores[t, i] > s for i in range(k)) / (k - 1)
            out[t, j] = [s, math.log(max(s, 1e-6)), s / top, rank, top, entropy]
    return out


def _random_router(layers, experts, levels, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(layers, experts, len(FEATURES), levels)).astype(np.float32),
            rng.normal(size=(layers, experts, levels)).astype(np.float32))


def test_decisions_equal_an_independent_evaluation_and_stay_in_levels_used():
    e, k, n = 16, 4, 9
    weight, bias = _random_router(2, e, 3)
    rng = np.random.default_rng(3)
    for ceiling in (2, 1):
        policy = LearnedRouting(weight, bias, [3, 5], [0, 1, 2], ceiling=ceiling)
        assert policy.levels_used == tuple(range(ceiling + 1)) and policy.needs_scores
        seen = set()
        for trial in range(20):
            logits = rng.normal(size=(n, e)) * 2
            full = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
            ids = np.argsort(-full, -1)[:, :k]
            scores = np.take_along_axis(full, ids, -1)
            layer = (3, 5)[trial % 2]
            d = policy.decide(Call(layer, ids, scores, full, np.ones((3, e), dtype=bool)))
            feats = _features(scores, full)
            i = (3, 5).index(layer)
            want = np.zeros((n, k), dtype=int)
            for t in range(n):
                for j in range(k):
                    z = feats[t, j] @ weight[i, ids[t, j]] + bias[i, ids[t, j]]
                    want[t, j] = min(int(np.argmax(z)), ceiling)
            assert np.array_equal(d.levels, want) and d.ids is None
            seen |= set(np.unique(d.levels).tolist())
        assert seen <= set(policy.levels_used) and len(seen) > 1
    with pytest.raises(ValueError, match="no layer 4"):
        policy.decide(Call(4, ids, scores, full, np.ones((3, e), dtype=bool)))


def test_save_load_round_trip_and_a_corrupted_file(copy):
    weight, bias = _random_router(2, 8, 3)
    save_bit_router(copy, dict(weight=weight, bias=bias, layers=np.array([0, 1])),
                    dict(levels=[0, 1, 2], alpha=0.1))
    with Store.open(copy) as s:  # the store still opens, and holds the router
        weights, meta = load_bit_router(s)
    assert np.array_equal(weights["weight"], weight) and np.array_equal(weights["bias"], bias)
    assert weights["layers"].tolist() == [0, 1] and meta["levels"] == [0, 1, 2]
    assert meta["alpha"] == 0.1 and tuple(meta["features"]) == FEATURES
    with Store.open(copy) as s:
        path = copy / s.manifest["extras"]["bit_router"]["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="extra 'bit_router' is corrupted.*d2moe calibrate"):
        load_bit_router(copy)
    path.unlink()
    with pytest.raises(StoreError, match="missing"):
        load_bit_router(copy)


def test_quality_learned_without_a_router_is_a_clear_error(store):
    with pytest.raises(ValueError, match=r"has no trained bit-width router; run `d2moe calibrate "
                                         r".* --bit-router`"):
        load_model(store, quality="learned")


def _greedy(model, prompt, n=8):
    cache = make_prompt_cache(model)
    y = model(mx.array(prompt)[None], cache=cache)[0, -1].argmax()
    out = [int(y)]
    for _ in range(n - 1):
        y = model(y.reshape(1, 1), cache=cache)[0, -1].argmax()
        out.append(int(y))
    return out


def _budget(path, policy):
    with Store.open(path) as s:
        spec = mwq.MWQSpec.from_dict(s.manifest["mwq"])
        lay = make_layout("levels", spec)
        parts, floor = policy_parts(policy, lay)
        return budget_for_slots(3, s, lay, 2, 4, BASELINE, context=128, parts=parts,
                                floor_parts=floor)


def test_learned_models_generate_and_a_ceiling_router_is_exact(copy, monkeypatch):
    monkeypatch.setattr(d2model, "current_rss_bytes", lambda: BASELINE)
    prompt = [5, 77, 130, 9, 200, 41]
    exact, _ = load_model(copy)
    want = _greedy(exact, prompt)
    engine_of(exact).close()
    weight = np.zeros((2, 8, len(FEATURES), 3), np.float32)
    bias = np.zeros((2, 8, 3), np.float32)
    bias[..., 2] = 10.0  # every pair at the ceiling
    save_bit_router(copy, dict(weight=weight, bias=bias, layers=np.array([0, 1])), dict(levels=[0, 1, 2]))
    for budget in (None, _budget(copy, LearnedRouting(weight, bias, [0, 1], [0, 1, 2]))):
        m, _ = load_model(copy, quality="learned", memory_budget=budget, context=128)
        engine = engine_of(m)
        assert isinstance(engine.policy, LearnedRouting) and engine.streaming == (budget is not None)
        assert _greedy(m, prompt) == want
        assert set(engine.stats.pairs) == {2}
        engine.close()
    weight, bias = _random_router(2, 8, 3, seed=4)  # a router that mixes levels
    save_bit_router(copy, dict(weight=weight, bias=bias, layers=np.array([0, 1])), dict(levels=[0, 1, 2]))
    m, _ = load_model(copy, quality="learned", memory_budget=budget, context=128)
    got = _greedy(m, prompt)
    assert len(got) == 8 and len(engine_of(m).stats.pairs) > 1 and engine_of(m).stats.hit_rate < 1
    engine_of(m).close()


def test_train_and_store_keeps_a_router_the_learned_quality_loads(copy):
    metrics = train_and_store(copy, text=default_calibration_text()[:3000], alpha=0.1, steps=3,
                              seq_len=32, batch=2)
    assert metrics["steps"] == 3 and metrics["held_out_tokens"] > 0
    held = metrics["held_out"]
    assert held["kl"] >= 0 and 0 <= held["agree"] <= 1 and 2 <= held["bits"] <= 8
    assert abs(sum(held["mix"].values()) - 1) < 1e-6
    weights, meta = load_bit_router(copy)
    assert meta["levels"] == [0, 1, 2] and meta["metrics"]["steps"] == 3
    m, _ = load_model(copy, quality="learned", quality_options={"alpha": 0.25})
    assert engine_of(m).policy.alpha == 0.25
    engine_of(m).close()
    with pytest.raises(ValueError, match="too few"):
        split_sequences(np.arange(10), 32)
