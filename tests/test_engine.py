"""The expert engine: per-(token, expert) levels against a numpy reference computed pair
by pair, resident and streaming, in both layouts; level switches on streaming models."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import d2moe_mlx.model as d2model
from d2moe_mlx import mwq
from d2moe_mlx.budget import BudgetError, plan_budget
from d2moe_mlx.convert.convert import convert
from d2moe_mlx.engine import engine_of, streaming_of
from d2moe_mlx.layout import make_layout
from d2moe_mlx.levels import PerPair
from d2moe_mlx.model import load_model
from d2moe_mlx.moe import set_level
from d2moe_mlx.packing import unpack_component
from d2moe_mlx.store.reader import Store

BASELINE = 64 << 20
STEP = 512  # the prefill step budgets here are planned with


@pytest.fixture(scope="module")
def stores(hf_checkpoint, tmp_path_factory):
    made = {}

    def get(method):
        if method not in made:
            out = tmp_path_factory.mktemp(f"engine-{method}") / "store"
            made[method] = convert(hf_checkpoint("qwen3_moe"), out, method=method, dense_bits=0,
                                   dtype="float32", calib_tokens=64, seq_len=32).path
        return made[method]

    return get


@pytest.fixture
def fixed_baseline(monkeypatch):
    monkeypatch.setattr(d2model, "current_rss_bytes", lambda: BASELINE)


def _budget(path, slots, layout, parts=None, level=2):
    with Store.open(path) as store:
        spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
        p = plan_budget(1 << 50, store, store.config, make_layout(layout, spec), level, 4, BASELINE,
                        parts=parts, prefill_step=STEP)
    one = p.layers * sum(p.slot_bytes.values())
    return p.baseline + p.dense + p.kv + p.working + (slots + 1) * one


def _reference(path, layer, x, inds, levels):
    """Expert outputs [N, k, H] computed pair by pair in numpy from the store's blocks."""
    with Store.open(path) as store:
        spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
        out = np.zeros((*inds.shape, x.shape[-1]), np.float32)
        for t in range(inds.shape[0]):
            for j in range(inds.shape[1]):
                e, lv = int(inds[t, j]), int(levels[t, j])
                w = {}
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    comps = []
                    for c in range(lv + 1):
                        blk = store.read_block(layer, c, e)
                        packed = {k.split(".", 1)[1]: v for k, v in blk.items() if k.startswith(proj + ".")}
                        shape = (packed["scales"].shape[0], packed["scales"].shape[1] * spec.group_size)
                        comps.append(unpack_component(packed, spec.component_bits(c), shape))
                    w[proj] = mwq.reconstruct(comps, spec.group_size, lv)
                g, u = w["gate_proj"] @ x[t], w["up_proj"] @ x[t]
                out[t, j] = w["down_proj"] @ (g / (1 + np.exp(-g)) * u)
    return out


@pytest.mark.parametrize("streaming", [False, True], ids=["resident", "streaming"])
@pytest.mark.parametrize("method,layout", [("nested", "levels"), ("nested", "planes"), ("rtn", "planes")])
def test_mixed_per_pair_levels_equal_numpy_pair_by_pair(method, layout, streaming, stores, fixed_baseline):
    path = stores(method)
    budget = _budget(path, 4, layout, parts=[0, 1, 2]) if streaming else None
    model, _ = load_model(path, dtype="float32", layout=layout, memory_budget=budget, prefill_step=STEP)
    engine = engine_of(model)
    assert engine.layout.kind == layout and engine.streaming == streaming
    rng = np.random.default_rng(1)
    pattern = rng.integers(0, 3, (6, 2))  # (token, slot) -> level: every level, mixed in each token
    engine.set_policy(PerPair(lambda layer, ids, scores: pattern[:len(ids)], (0, 1, 2)))
    layer, el = next(iter(engine.layers.items()))
    x = rng.normal(size=(6, 64)).astype(np.float32)
    inds = np.stack([rng.permutation(8)[:2] for _ in range(6)]).astype(np.int32)
    got = np.array(el(mx.array(x), mx.array(inds)))
    want = _reference(path, layer, x, inds, pattern)
    assert np.allclose(got, want, atol=2e-5 * max(1.0, np.abs(want).max())), np.abs(got - want).max()
    top = _reference(path, layer, x, inds, np.full_like(pattern, 2))
    assert not np.allclose(got, top, atol=1e-3), "the levels made no difference"
    assert engine.stats.pairs == {lv: int((pattern == lv).sum()) for lv in (0, 1, 2)}


def test_set_level_on_a_streaming_model_runs_the_next_token_at_that_level(stores, fixed_baseline):
    path = stores("nested")
    budget = _budget(path, 3, "levels")  # room for 3 experts at level 2, so more at level 0
    model, _ = load_model(path, dtype="float32", memory_budget=budget, prefill_step=STEP)
    engine = streaming_of(model)
    x = mx.array([[5, 9, 33, 70, 2, 8, 41, 13]])
    for level in (0, 1, 2):
        want = load_model(path, dtype="float32", level=level)[0](x)
        set_level(model, level)
        assert engine.level == level and engine.plan.total == budget
        assert max(engine.plan.slots.values()) >= 3
        assert mx.allclose(model(x), want, atol=1e-5).item(), level
    assert engine.plan.slots == {2: 3}
    set_level(model, 0)
    assert engine.plan.slots[0] > 3  # a level-0 expert is smaller: more of them fit
    tight = _budget(path, 2, "levels", level=0)
    small, _ = load_model(path, dtype="float32", memory_budget=tight, level=0, prefill_step=STEP)
    with pytest.raises(BudgetError, match="too small"):
        set_level(small, 2)
    assert engine_of(small).level == 0  # refused: still runs at its level
    mx.eval(small(x))


def test_long_inputs_run_in_planned_steps_with_the_same_result(stores, fixed_baseline):
    """A budgeted model computes a forward pass of more tokens than its planned step in
    chunks through the KV cache: the same logits as the resident model's one pass."""
    from mlx_lm.models.cache import make_prompt_cache

    path = stores("nested")
    budget = _budget(path, 3, "levels")
    model, _ = load_model(path, dtype="float32", memory_budget=budget, prefill_step=16, context=256)
    ref, _ = load_model(path, dtype="float32")
    x = mx.array(np.random.default_rng(2).integers(3, 250, (1, 100)))
    calls = []
    engine = streaming_of(model)
    first = engine.layers[min(engine.layers)]
    real = type(first).__call__
    type(first).__call__ = lambda self, xx, idx: (calls.append(xx.shape[1]) if self is first else None,
                                                  real(self, xx, idx))[1]
    try:
        got = model(x, cache=make_prompt_cache(model))
        got_nocache = model(x)
    finally:
        type(first).__call__ = real
    want = ref(x)
    assert calls and max(calls) <= 16, calls  # no pass saw more tokens than planned
    for out in (got, got_nocache):
        assert out.shape == want.shape
        assert np.abs(np.array(out) - np.array(want)).max() <= 1e-4


def test_context_the_budget_reserves_is_never_exceeded(stores, fixed_baseline):
    """Our stream_generate stops where the reserved context is full and says so; mlx-lm's
    own loop gets a ContextError from the model instead of a KV cache past the budget."""
    from mlx_lm.generate import stream_generate as mlx_stream_generate

    from d2moe_mlx import generation
    from d2moe_mlx.limits import ContextError
    from d2moe_mlx.model import load

    path = stores("nested")
    model, tokenizer = load(path, dtype="float32", memory_budget=_budget(path, 3, "levels"), context=64,
                            prefill_step=STEP)
    prompt = list(range(3, 23))  # 20 tokens
    out = list(generation.stream_generate(model, tokenizer, prompt, max_tokens=200))
    assert len(out) == 64 - 20 and out[-1].finish_reason == "context"
    with pytest.raises(ContextError, match="64"):
        list(mlx_stream_generate(model, tokenizer, prompt, max_tokens=200))
    with pytest.raises(ContextError, match="no room"):
        list(generation.stream_generate(model, tokenizer, list(range(3, 70)), max_tokens=5))
    short = list(generation.stream_generate(model, tokenizer, prompt, max_tokens=5))
    assert len(short) == 5 and short[-1].finish_reason == "length"


def test_a_budget_that_holds_every_expert_runs_as_resident(stores, fixed_baseline):
    path = stores("nested")
    with Store.open(path) as store:
        experts = store.num_experts
    model, _ = load_model(path, dtype="float32", memory_budget=_budget(path, experts, "levels"),
                          prefill_step=STEP)
    engine = streaming_of(model)
    assert engine.plan.slots == {2: experts}
    assert all(c.pools[2].all_ready() for c in engine.scheduler.caches.values())  # read at load
    x = mx.array([[5, 9, 33, 70, 2, 8]])
    want = load_model(path, dtype="float32")[0](x)
    assert mx.allclose(model(x), want, atol=1e-5).item()
    s = engine.stats
    assert s.syncs == 0 and s.hit_rate == 1.0 and s.bytes_read == 0  # no sync, no read per token


def test_a_long_prompt_reads_each_needed_expert_once_per_layer(stores, fixed_baseline, monkeypatch):
    """With the prefill step the budget affords (auto), a 300-token prompt goes through
    each layer in one pass: every needed block is read once, in groups of the slots,
    though the cache holds 3 of 8 experts. 64-token passes read blocks again each pass."""
    from collections import Counter

    from mlx_lm.models.cache import make_prompt_cache

    from d2moe_mlx.budget import budget_for_slots

    path = stores("nested")
    real = Store.read_block_scattered
    reads = Counter()

    def counting(self, layer, comp, expert, bufs, verify=True):
        reads[layer, comp, expert] += 1
        return real(self, layer, comp, expert, bufs, verify)

    monkeypatch.setattr(Store, "read_block_scattered", counting)
    prompt = mx.array(np.random.default_rng(3).integers(3, 250, (1, 300)))
    runs = {}
    for step in (None, 64):
        with Store.open(path) as store:
            spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
            budget = budget_for_slots(3, store, make_layout("levels", spec), 2, 4, BASELINE,
                                      context=512, prefill_step=step)
        model, _ = load_model(path, dtype="float32", memory_budget=budget, context=512, prefill_step=step)
        engine = streaming_of(model)
        assert engine.plan.slots == {2: 3}
        reads.clear()
        mx.eval(model(prompt, cache=make_prompt_cache(model)))
        runs[step] = (engine.plan.prefill_step, max(reads.values()), engine.stats.groups)
    auto_step, most, groups = runs[None]
    assert auto_step >= 300 and most == 1 and groups > 0, runs
    assert runs[64][1] > 1, runs  # the control: 64-token passes read blocks again


def test_dual_routing_with_every_pair_at_the_ceiling_is_exact_streaming(stores, fixed_baseline):
    """tau=0 and alpha=0: dual routing gives every pair the ceiling and substitutes
    nothing: the same tokens and logits as exact streaming (and resident)."""
    from mlx_lm.models.cache import make_prompt_cache

    path = stores("nested")
    prompt = mx.array(np.random.default_rng(4).integers(3, 250, (1, 40)))

    def run(**kw):
        budget = _budget(path, 3, "levels", parts=[1, 2] if kw.get("quality") else None)
        model, _ = load_model(path, dtype="float32", memory_budget=budget, prefill_step=STEP, **kw)
        cache = make_prompt_cache(model)
        logits = model(prompt, cache=cache)[:, -1]
        out = []
        for _ in range(8):
            tok = mx.argmax(logits, axis=-1)
            out.append((int(tok.item()), np.array(logits)))
            logits = model(tok[:, None], cache=cache)[:, -1]
        return out, streaming_of(model).stats

    exact, _ = run()
    dual, stats = run(quality="balanced", quality_options=dict(tau=0.0, alpha=0.0))
    assert [t for t, _ in dual] == [t for t, _ in exact]
    assert max(float(np.abs(a - b).max()) for (_, a), (_, b) in zip(dual, exact)) <= 1e-5
    assert set(stats.pairs) == {2} and stats.substituted == 0 and stats.syncs > 0


def test_balanced_quality_runs_lower_levels_under_a_tight_cache(stores, fixed_baseline):
    from d2moe_mlx.budget import budget_for_slots

    path = stores("nested")
    with Store.open(path) as store:
        spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
        budget = budget_for_slots(2, store, make_layout("levels", spec), 2, 4, BASELINE,
                                  parts=[1, 2], floor_parts=[1], prefill_step=STEP)
    model, _ = load_model(path, dtype="float32", memory_budget=budget, prefill_step=STEP,
                          quality="balanced", quality_options=dict(alpha=0.9))
    engine = streaming_of(model)
    assert engine.plan.slots == {1: 4, 2: 2}  # the floor level's pool gets twice the slots
    prompt = mx.array(np.random.default_rng(5).integers(3, 250, (1, 24)))
    from mlx_lm.generate import generate_step

    tokens = [int(t) for t, _ in generate_step(prompt[0], model, max_tokens=24)]
    s = engine.stats
    assert len(tokens) == 24 and set(s.pairs) <= {1, 2} and s.pairs.get(1, 0) > 0
    assert abs(sum(s.level_mix.values()) - 1.0) < 1e-9 and s.substitution_rate < 1


def test_substituted_pairs_compute_the_substitute_expert(stores, fixed_baseline):
    """A policy's substitutions reach the compute: each pair runs the expert the decision
    names, at its level (numpy reference computed pair by pair with those ids)."""
    from d2moe_mlx.levels import Decision, LevelPolicy

    class Swap(LevelPolicy):  # the second pair of every token runs expert (e + 1) % 8
        needs_scores = False

        def decide(self, call):
            ids = call.ids.copy()
            ids[:, 1] = (ids[:, 1] + 1) % 8
            clash = ids[:, 1] == ids[:, 0]
            ids[clash, 1] = (ids[clash, 1] + 1) % 8
            return Decision(np.full(ids.shape, 1), ids, len(ids))

        @property
        def levels_used(self):
            return (1,)

    path = stores("nested")
    model, _ = load_model(path, dtype="float32", memory_budget=_budget(path, 4, "levels", level=1),
                          level=1, prefill_step=STEP)
    engine = streaming_of(model)
    engine.set_policy(Swap())
    layer, el = next(iter(engine.layers.items()))
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    inds = np.stack([rng.permutation(8)[:2] for _ in range(3)]).astype(np.int32)
    got = np.array(el(mx.array(x), mx.array(inds)))
    swapped = Swap().decide(type("C", (), {"ids": inds})()).ids
    want = _reference(path, layer, x, swapped, np.full(inds.shape, 1))
    assert np.allclose(got, want, atol=2e-5 * max(1.0, np.abs(want).max()))
    assert engine.stats.substituted == 3


def test_quality_per_request_and_restored_after(stores, fixed_baseline):
    """generate(..., quality=...) runs that request under the preset; the model's own
    policy (exact) is back for the next request: the same text as before."""
    from d2moe_mlx import generation
    from d2moe_mlx.model import load

    path = stores("nested")
    model, tokenizer = load(path, dtype="float32")
    engine = engine_of(model)
    prompt = list(range(3, 23))
    before = generation.generate(model, tokenizer, prompt, max_tokens=10)
    s0 = engine.stats.snapshot()
    generation.generate(model, tokenizer, prompt, max_tokens=10, quality="fast",
                        quality_options=dict(tau=1.0))
    d = engine.stats.delta(s0)
    assert d.pairs.get(0, 0) > 0  # fast: floor 0 for every pair but each token's top one
    assert engine.level == 2  # exact again
    assert generation.generate(model, tokenizer, prompt, max_tokens=10) == before


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_raising_a_level_reads_only_the_components_above(stores, fixed_baseline, dtype, monkeypatch):
    """Levels layout: an expert ready at level 0 loads at level 2 by reading components 1
    and 2 only, and its level-2 slot holds what a fresh read of all three gives."""
    from collections import Counter

    from d2moe_mlx.cache import READY

    path = stores("nested")
    real = Store.read_block_scattered
    reads = Counter()

    def counting(self, layer, comp, expert, bufs, verify=True):
        reads[comp] += 1
        return real(self, layer, comp, expert, bufs, verify)

    monkeypatch.setattr(Store, "read_block_scattered", counting)
    act = getattr(mx, dtype).size
    from d2moe_mlx.budget import budget_for_slots

    with Store.open(path) as store:
        spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
        budget = budget_for_slots(4, store, make_layout("levels", spec), 2, act, BASELINE,
                                  parts=[0, 1, 2], prefill_step=STEP)
    model, _ = load_model(path, dtype=dtype, memory_budget=budget, prefill_step=STEP)
    engine = streaming_of(model)
    layer, el = next(iter(engine.layers.items()))
    x = mx.array(np.random.default_rng(7).normal(size=(1, 64)).astype(np.float32)).astype(getattr(mx, dtype))
    inds = mx.array([[3, 5]])
    engine.set_policy(PerPair(lambda l, ids, s: np.zeros(ids.shape, int), (0, 1, 2)))
    mx.eval(el(x, inds))  # experts 3 and 5 ready at level 0
    reads.clear()
    engine.set_policy(PerPair(lambda l, ids, s: np.full(ids.shape, 2), (0, 1, 2)))
    mx.eval(el(x, inds))
    assert reads == Counter({1: 2, 2: 2}), reads  # components 1 and 2, not 0 again
    pool = engine.scheduler.caches[layer].pools[2]
    engine.scheduler.drain()
    with Store.open(path) as store:
        from d2moe_mlx.layout import build_part

        for e in (3, 5):
            slot = int(pool.slot_of[e])
            assert pool.state[slot] == READY
            blocks = {c: store.read_block(layer, c, e) for c in range(3)}
            fresh = build_part(pool.part, spec, blocks, "t")
            for name, value in fresh.items():
                got = np.array(pool.compute[name][slot].astype(mx.float32)) if pool.compute[name].dtype != mx.uint32 else np.array(pool.compute[name][slot])
                want = value if name.endswith(".weight") else np.array(mx.array(value).astype(getattr(mx, dtype)).astype(mx.float32))
                if name.endswith(".biases") and dtype != "float32":  # summed in two roundings
                    assert np.allclose(got, want, rtol=0, atol=np.abs(want).max() * 2e-3), name
                else:
                    assert np.array_equal(got, want), name


def test_hebf_load_order_and_progressive_waves(stores, fixed_baseline, monkeypatch):
    """Loads go hottest expert first, lower levels first (fifo: as the pairs come); the
    pairs run in waves as their loads land (1 + phases partial computes)."""
    from d2moe_mlx.loader import ExpertLoader

    path = stores("nested")
    budget = _budget(path, 6, "levels", parts=[0, 1, 2])
    ids = np.array([[1, 4], [4, 6], [6, 4], [2, 4], [6, 0]])  # 4: 4 tokens, 6: 3, then 1, 2, 0
    for order, want in (("hebf", [4, 6, 0, 1, 2]), ("fifo", [1, 4, 6, 2, 0])):
        model, _ = load_model(path, dtype="float32", memory_budget=budget, prefill_step=STEP,
                              load_order=order, phases=2)
        engine = streaming_of(model)
        engine.set_policy(PerPair(lambda l, i, s: np.where(i == 4, 2, 1), (1, 2)))
        layer, el = next(iter(engine.layers.items()))
        submitted, computes = [], []
        real = ExpertLoader.submit
        real_compute = type(el).compute
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ExpertLoader, "submit", lambda self, pool, e, s, source=None:
                       (submitted.append((e, pool.part.index)), real(self, pool, e, s, source))[1])
            mp.setattr(type(el), "compute", lambda self, x, parts:
                       (computes.append(1), real_compute(self, x, parts))[1])
            x = mx.array(np.random.default_rng(8).normal(size=(5, 64)).astype(np.float32))
            mx.eval(el(x, mx.array(ids.astype(np.int32))))
        experts = [e for e, _ in submitted]
        assert list(dict.fromkeys(experts)) == want, (order, submitted)
        assert all(p == (2 if e == 4 else 1) for e, p in submitted), submitted  # one level each
        assert len(computes) == 1 + 2  # nothing was ready: two waves, then the merge


def test_a_higher_level_of_an_expert_ready_lower_is_evicted_first(stores):
    from d2moe_mlx.cache import ExpertCache, PartPool
    from d2moe_mlx.policies import LRUPolicy

    with Store.open(stores("nested")) as store:
        spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
        part = make_layout("levels", spec).parts[2]
        from d2moe_mlx.layout import slot_tensors

        pool = PartPool(0, part, slot_tensors(part, store.layout(store.moe_layers[0], 0), 64), 3, 8,
                        mx.float32)
    cache = ExpertCache(0, [pool], LRUPolicy(8))
    pins, loads = cache.acquire(0, np.array([0, 1, 2]))
    for _, s in loads:
        cache.loaded(0, s)
    cache.release(0, pins)
    for e in (0, 1, 2):  # 0 least recent
        cache.policy.on_access(np.array([e]))
    spare = np.zeros(8, dtype=bool)
    spare[2] = True  # expert 2 is also ready at a lower level
    _, loads = cache.acquire(0, np.array([5]), spare)
    assert pool.slot_of[2] == -1 and pool.slot_of[0] >= 0  # 2 went first, not LRU's 0


def test_presets_fit_a_budget_with_fewer_than_top_k_slots_above_the_floor(stores, fixed_baseline):
    """A budget that gives exact 3 slots at the ceiling holds 2 (= top-k) at the floor
    and 1 above under a per-pair policy: a token whose pairs all want the ceiling runs
    its lower-scored pair at the floor in one pass (numpy reference pair by pair), and
    decoding needs no grouped calls."""
    from mlx_lm.generate import generate_step

    from d2moe_mlx.budget import budget_for_slots

    path = stores("nested")
    with Store.open(path) as store:
        spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
        layout = make_layout("levels", spec)
        budget = budget_for_slots(3, store, layout, 2, 4, BASELINE, prefill_step=STEP)
        with pytest.raises(BudgetError, match="floor and one above"):  # less: refused
            plan_budget(budget_for_slots(1, store, layout, 2, 4, BASELINE, prefill_step=STEP),
                        store, store.config, layout, 2, 4, BASELINE, prefill_step=STEP,
                        parts=[1, 2], floor_parts=[1])
    model, _ = load_model(path, dtype="float32", memory_budget=budget, prefill_step=STEP)
    engine = streaming_of(model)
    seen = {}

    def ceiling_for_all(layer, ids, scores):
        seen["scores"] = scores
        return np.full(ids.shape, 2)

    engine.set_policy(PerPair(ceiling_for_all, (1, 2), needs_scores=True))
    assert engine.plan.slots == {1: 2, 2: 1}
    layer, el = next(iter(engine.layers.items()))
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, 64)).astype(np.float32)
    inds = np.array([[3, 6]], dtype=np.int32)
    groups = engine.stats.groups
    got = np.array(el(mx.array(x), mx.array(inds)))
    assert engine.stats.groups == groups  # one pass
    levels = np.where(seen["scores"] == seen["scores"].max(), 2, 1)
    assert sorted(levels[0].tolist()) == [1, 2]
    want = _reference(path, layer, x, inds, levels)
    assert np.allclose(got, want, atol=2e-5 * max(1.0, np.abs(want).max())), np.abs(got - want).max()
    prompt = mx.array(np.random.default_rng(8).integers(3, 250, (1, 16)))
    steps = generate_step(prompt[0], model, max_tokens=10)
    next(steps)
    groups = engine.stats.groups
    assert len([t for t, _ in steps]) == 9 and engine.stats.groups == groups


def test_store_expert_modules_checked_whatever_the_layer_list_is_called():
    """The engine checks the store's expert modules by what follows the layer index,
    so GPT-2-style ``transformer.h.N`` layers (phixtral) pass and another block does not."""
    from pathlib import Path
    from types import SimpleNamespace

    from d2moe_mlx.engine import _check_blocks
    from d2moe_mlx.families import get_family
    from d2moe_mlx.store.format import StoreError

    def store(modules):
        return SimpleNamespace(path=Path("s"), manifest={"switch_modules": modules,
                                                         "model_type": "phixtral"})

    phixtral, blocks = get_family("phixtral"), [(0, None), (1, None)]
    _check_blocks(store({"0": "transformer.h.0.moe.switch_mlp", "1": "transformer.h.1.moe.switch_mlp"}),
                  phixtral, blocks)
    for wrong in ({"0": "transformer.h.0.moe.switch_mlp"},
                  {"0": "transformer.h.0.moe.switch_mlp", "1": "transformer.h.1.mlp.switch_mlp"}):
        with pytest.raises(StoreError, match="re-run d2moe convert"):
            _check_blocks(store(wrong), phixtral, blocks)


@pytest.mark.parametrize("mixed", [False, True], ids=["exact", "mixed"])
@pytest.mark.parametrize("mode", ["stream", "sync", "naive"])
def test_an_expert_repeated_within_a_token_is_read_once_and_computed_per_pair(
        mode, mixed, stores, fixed_baseline, monkeypatch):
    """A block may name one expert several times in a token's top-k (longcat_flash sends
    its zero-expert picks to expert 0): with exactly top-k slots every call still fits,
    a repeated expert takes one slot and is read once per call, and each pair is
    computed; one level or mixed levels, decode and prefill calls, against numpy."""
    from d2moe_mlx.loader import ExpertLoader

    path = stores("nested")
    budget = _budget(path, 3, "levels", parts=[0, 1, 2]) if mixed else _budget(path, 2, "levels", parts=[2])
    model, _ = load_model(path, dtype="float32", memory_budget=budget, prefill_step=STEP, mode=mode,
                          layout="levels")
    engine = streaming_of(model)
    current = {}
    if mixed:
        engine.set_policy(PerPair(lambda l, i, s: current["levels"], (0, 1, 2)))
    layer, el = next(iter(engine.layers.items()))
    want_slots = [4, 2, 2] if mixed else [None, None, 2]  # exactly top-k slots at levels 1, 2
    assert [p and p.capacity for p in el.cache.pools] == want_slots
    reads = []
    real = ExpertLoader.load
    monkeypatch.setattr(ExpertLoader, "load", lambda self, pool, e, s, source=None:
                        (reads.append((e, pool.part.index)), real(self, pool, e, s, source))[1])
    rng = np.random.default_rng(3)
    calls = [[[3, 3]], [[5, 5]], [[5, 1]], [[1, 1]], [[6, 6], [6, 6], [2, 2]], [[4, 4], [4, 4]],
             [[0, 0], [7, 0], [0, 0]]]
    for n, ids in enumerate(map(np.array, calls)):
        levels = rng.integers(0, 3, ids.shape) if mixed and n % 2 else np.full(ids.shape, 2)
        current["levels"] = levels
        reads.clear()
        x = rng.normal(size=(len(ids), 64)).astype(np.float32)
        got = np.array(el(mx.array(x), mx.array(ids.astype(np.int32))))
        engine.scheduler.drain()
        want = _reference(path, layer, x, ids, levels)
        assert np.allclose(got, want, atol=2e-5 * max(1.0, np.abs(want).max())), (ids, levels)
        assert len(set(reads)) == len(reads), f"{ids.tolist()}: an expert read twice: {reads}"
        assert {e for e, _ in reads} <= set(ids.reshape(-1).tolist()), reads
