"""The streaming runtime (memory_budget): exactness, budget refusal, loader errors,
loader concurrency, eviction safety and slot contents.

Budgets are computed for a wanted number of slots per layer from
:func:`d2moe_mlx.budget.plan_budget`'s own pieces with the process baseline fixed
(``fixed_baseline``), so every test gets exactly the cache size it asks for.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import d2moe_mlx.model as d2model
from d2moe_mlx import mwq
from d2moe_mlx.budget import BudgetError, plan_budget
from d2moe_mlx.cache import READY, PartPool
from d2moe_mlx.convert.convert import convert
from d2moe_mlx.engine import choose_layout, streaming_of
from d2moe_mlx.families import supported
from d2moe_mlx.layout import build_part, make_layout, slot_tensors
from d2moe_mlx.loader import ExpertLoader, float_to_bf16_bits
from d2moe_mlx.memory import format_bytes, parse_size
from d2moe_mlx.model import load_model
from d2moe_mlx.store.format import StoreError
from d2moe_mlx.store.reader import Store

CONVERT = dict(method="rtn", dense_bits=0, dtype="float32", calib_tokens=64, seq_len=32)
BASELINE = 64 << 20  # the process baseline load_model sees (fixed_baseline)
PROMPT = np.random.default_rng(0).integers(3, 256, 48)  # 48 tokens x top-2: every expert
NEW_TOKENS = 12
EXACT_ATOL = 1e-5  # streaming computes the same gather_qmm rows: bitwise equal in practice
TIMEOUT = 60  # seconds a guarded run may take before the test calls it a hang

FULL = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")  # every mode x policy x cache size
LIGHT = ("qwen2_moe", "olmoe", "deepseek_v2", "granitemoe", "phimoe")  # two runs each
# every other registry family, one streaming run each (levels layout, prefetch, score)
OTHER = tuple(f for f in supported() if f not in FULL + LIGHT)
MODES = (("stream", True), ("sync", False), ("naive", False))  # (mode, prefetch)
POLICIES = ("lru", "lfu", "score")


# -- fixtures and helpers ---------------------------------------------------------
@pytest.fixture
def fixed_baseline(monkeypatch):
    monkeypatch.setattr(d2model, "current_rss_bytes", lambda: BASELINE)


@pytest.fixture(scope="module")
def stores(hf_checkpoint, tmp_path_factory):
    """``stores(family, spec=None, method="nested") -> Path``: the tiny checkpoint converted
    once (nested: the levels layout runs it; rtn: the planes layout)."""
    made = {}

    def get(family: str, spec: mwq.MWQSpec | None = None, method: str = "nested"):
        key = (family, spec, method)
        if key not in made:
            out = tmp_path_factory.mktemp(f"store-{family}") / "store"
            made[key] = convert(hf_checkpoint(family), out, spec=spec, **{**CONVERT, "method": method}).path
        return made[key]

    return get


@pytest.fixture(scope="module")
def resident(stores):
    """``resident(family, method) -> (tokens, logits)`` of the all-experts-resident model."""
    done = {}

    def get(family: str, method: str = "nested"):
        if (family, method) not in done:
            model, _ = load_model(stores(family, method=method), dtype="float32")
            done[family, method] = greedy(model)
        return done[family, method]

    return get


STEP = 512  # the prefill step every budget here is planned with (not the auto step)


def pieces(store_path, level=None, act_itemsize=4, layout="auto", **kw):
    """plan_budget's fixed parts and per-slot sizes (a plan with room for every expert)."""
    kw.setdefault("prefill_step", STEP)
    with Store.open(store_path) as store:
        spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
        level = spec.num_levels - 1 if level is None else level
        lay = make_layout(choose_layout(layout, spec, store.manifest, True), spec)
        return plan_budget(1 << 50, store, store.config, lay, level, act_itemsize, BASELINE, **kw)


def budget_for(store_path, slots: int, **kw) -> int:
    """The smallest budget whose plan gives ``slots`` expert slots per layer (fixed baseline)."""
    p = pieces(store_path, **kw)
    one = p.layers * sum(p.slot_bytes.values())  # one more slot in every pool
    return p.baseline + p.dense + p.kv + p.working + (slots + 1) * one


def stream_model(store_path, slots: int, **kw):
    kw.setdefault("dtype", "float32")
    kw.setdefault("prefill_step", STEP)
    budget = budget_for(store_path, slots, layout=kw.get("layout", "auto"))
    model, _ = load_model(store_path, memory_budget=budget, **kw)
    state = streaming_of(model)
    assert state is not None and set(state.plan.slots.values()) == {slots}, state.plan.slots
    return model, state


def greedy(model, prompt=PROMPT, n=NEW_TOKENS):
    """Greedy decode: (generated tokens, float32 logits of each generated position)."""
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1]
    tokens, rows = [], []
    for _ in range(n):
        logits = logits.astype(mx.float32)
        mx.eval(logits)
        rows.append(np.array(logits))
        tokens.append(int(mx.argmax(logits, axis=-1).item()))
        if len(tokens) < n:
            logits = model(mx.array([[tokens[-1]]]), cache=cache)[:, -1]
    return tokens, np.concatenate(rows)


def guarded(fn, timeout=TIMEOUT):
    """Run ``fn`` in a thread; fail on a hang; returns ("ok", value) or ("error", exception).

    (Not for deepseek_v3: mlx-lm's model keeps arrays made on the main thread's stream,
    and evaluating them on another thread fails, resident or streaming alike.)"""
    out = {}

    def target():
        try:
            out["ok"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            out["error"] = err

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"no result after {timeout} s: the run hangs"
    return next(iter(out.items()))


def assert_same_as_resident(family, got, want, state, *, prefetch=False):
    tokens, logits = got
    assert tokens == want[0], f"{family}: streamed tokens {tokens} != resident {want[0]}"
    diff = float(np.abs(logits - want[1]).max())
    assert diff <= EXACT_ATOL, f"{family}: logits differ by {diff}"
    s = state.stats
    assert s.groups > 0, "the prompt did not take the grouped prefill path"
    assert s.bytes_read > 0 and s.hit_rate < 1, (s.bytes_read, s.hit_rate)
    assert s.tokens == len(PROMPT) + NEW_TOKENS - 1
    if prefetch:
        assert s.predicted > 0 and s.prefetch_loads > 0, s


# -- 1. exact-mode token identity ---------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode,prefetch", MODES, ids=[m for m, _ in MODES])
@pytest.mark.parametrize("size", ["top_k", "middle"])
@pytest.mark.parametrize("family", FULL)
def test_streaming_matches_resident(family, size, mode, prefetch, policy, stores, resident,
                                    fixed_baseline):
    path = stores(family)
    p = pieces(path)
    slots = p.top_k if size == "top_k" else (p.top_k + p.num_experts) // 2
    assert slots < p.num_experts
    model, state = stream_model(path, slots, mode=mode, prefetch=prefetch, cache_policy=policy)
    assert_same_as_resident(family, greedy(model), resident(family), state, prefetch=prefetch)


@pytest.mark.parametrize("family", FULL)
def test_planes_layout_matches_resident(family, stores, resident, fixed_baseline):
    """A store not fitted nested runs in the planes layout (one pass per component)."""
    path = stores(family, method="rtn")
    model, state = stream_model(path, pieces(path).top_k, prefetch=True)
    assert state.layout.kind == "planes" and len(state.plan.slots) == 3
    assert_same_as_resident(family, greedy(model), resident(family, "rtn"), state, prefetch=True)


@pytest.mark.parametrize("method", ["nested", "rtn"], ids=["levels", "planes"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_same_shape_path_matches_resident(family, overlap, method, stores, resident, fixed_baseline):
    """The GPU's computation path (every partial call keeps the resident call's shape,
    other experts on the zero slot), forced on the CPU: still the resident output."""
    path = stores(family, method=method)
    model, state = stream_model(path, pieces(path).top_k, overlap=overlap)
    state.scheduler.same_shapes = True
    assert_same_as_resident(family, greedy(model), resident(family, method), state)


LIGHT_RUNS = [(f, "stream", f != "granitemoe", "lru" if f == "granitemoe" else "score") for f in LIGHT]
LIGHT_RUNS += [(f, "sync", False, "lfu") for f in LIGHT]


@pytest.mark.parametrize("family,mode,prefetch,policy", LIGHT_RUNS,
                         ids=[f"{f}-{m}-{p}" for f, m, _, p in LIGHT_RUNS])
def test_streaming_matches_resident_other_families(family, mode, prefetch, policy, stores,
                                                   resident, fixed_baseline):
    method = "rtn" if mode == "sync" else "nested"  # both layouts on every family
    path = stores(family, method=method)
    model, state = stream_model(path, pieces(path).top_k, mode=mode, prefetch=prefetch,
                                cache_policy=policy)
    assert_same_as_resident(family, greedy(model), resident(family, method), state, prefetch=prefetch)


@pytest.mark.parametrize("family", OTHER)  # hybrids, multimodal, sigmoid routers...: the
def test_streaming_matches_resident_every_family(family, stores, resident, fixed_baseline):
    path = stores(family)
    model, state = stream_model(path, pieces(path).top_k, mode="stream", prefetch=True,
                                cache_policy="score")
    assert_same_as_resident(family, greedy(model), resident(family), state, prefetch=True)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_prefetch_with_slow_reads(family, stores, resident, fixed_baseline, monkeypatch):
    """Reads slower than compute: a mispredicted prefetch still loading holds a slot of
    the next layer when its call comes; with top_k slots that call must wait for it,
    not fail (CacheFullError) nor compute with a missing expert."""
    real = Store.read_block_scattered

    def slow(self, *args, **kw):
        time.sleep(0.01)
        return real(self, *args, **kw)

    monkeypatch.setattr(Store, "read_block_scattered", slow)
    path = stores(family)
    model, state = stream_model(path, pieces(path).top_k, prefetch=True)
    assert_same_as_resident(family, greedy(model), resident(family), state, prefetch=True)
    assert state.stats.predicted_right < state.stats.predicted  # some prefetches were wrong


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_cooc_loads_ahead_match_resident(family, stores, resident, fixed_baseline):
    """cooc hears the previous layer's routing (on_route) and the scheduler loads ahead what
    it predicts (a tiny lift: nearly every seen pair): more loads, never another output."""
    path = stores(family)
    model, state = stream_model(path, pieces(path).top_k, cache_policy="cooc",
                                policy_options={"lift": 0.01})
    assert_same_as_resident(family, greedy(model), resident(family), state)
    assert state.stats.prefetch_loads > 0 and state.stats.predicted == 0


@pytest.mark.parametrize("prefetch,policy", [(True, "lru"), (False, "score")], ids=["prefetch", "score"])
def test_granitemoe_router_for_prefetch_and_score(prefetch, policy, stores, resident, fixed_baseline):
    path = stores("granitemoe")
    model, state = stream_model(path, pieces(path).top_k, prefetch=prefetch, cache_policy=policy)
    assert_same_as_resident("granitemoe", greedy(model), resident("granitemoe"), state,
                            prefetch=prefetch)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_mlx_lm_generate_step_and_stream_generate(family, stores, fixed_baseline):
    from mlx_lm.generate import generate_step, stream_generate

    from d2moe_mlx import load

    path = stores(family)
    prompt = mx.array(PROMPT)

    def run(model, tokenizer):
        steps = [(int(t), np.array(lp)) for t, lp in generate_step(prompt, model, max_tokens=NEW_TOKENS)]
        streamed = [r.token for r in stream_generate(model, tokenizer, PROMPT.tolist(),
                                                     max_tokens=NEW_TOKENS)]
        return [t for t, _ in steps], np.stack([lp for _, lp in steps]), streamed

    want_tokens, want_lp, want_streamed = run(*load(path, dtype="float32"))
    model, tokenizer = load(path, dtype="float32", memory_budget=budget_for(path, pieces(path).top_k), prefill_step=STEP,
                            prefetch=True)
    tokens, lp, streamed = run(model, tokenizer)
    assert tokens == want_tokens and streamed == want_streamed == want_tokens[:len(streamed)]
    assert float(np.abs(lp - want_lp).max()) <= EXACT_ATOL
    s = streaming_of(model).stats
    assert s.groups > 0 and s.bytes_read > 0 and s.hit_rate < 1


# -- 2. budget refusal ------------------------------------------------------------------
def test_budget_too_small_refused_before_loading(stores, fixed_baseline, monkeypatch):
    path = stores("qwen3_moe")
    need = budget_for(path, pieces(path).top_k)
    loads = []
    real = d2model.mlx_load_model
    monkeypatch.setattr(d2model, "mlx_load_model", lambda *a, **k: (loads.append(1), real(*a, **k))[1])
    for small in (need - 1, need // 2, BASELINE):
        with pytest.raises(BudgetError) as err:
            load_model(path, memory_budget=small, dtype="float32", prefill_step=STEP)
        msg = str(err.value)
        suggested = re.search(r"smallest budget that works is ([0-9.]+ [KMGT]B)", msg).group(1)
        assert need <= parse_size(suggested) <= 1.1 * need + (16 << 20), (need, suggested)
        assert format_bytes(small) in msg
    assert loads == [], "the model was (partly) loaded before the budget was refused"
    model, _ = load_model(path, memory_budget=need, dtype="float32", prefill_step=STEP)
    assert loads == [1] and set(streaming_of(model).plan.slots.values()) == {pieces(path).top_k}


def test_smallest_budget_in_message_is_stable_and_loads(stores):
    """With the real process baseline: the size the error names, passed back as it is
    printed, loads; two refusals name the same size."""
    path = stores("mixtral")
    said = []
    for _ in range(2):
        with pytest.raises(BudgetError, match="smallest budget that works") as err:
            load_model(path, memory_budget="1MB", dtype="float32")
        said.append(re.search(r"smallest budget that works is ([0-9.]+ [KMGT]B)", str(err.value)).group(1))
    assert said[0] == said[1], said
    model, _ = load_model(path, memory_budget=said[0], dtype="float32")
    state = streaming_of(model)
    assert min(state.plan.slots.values()) >= state.plan.top_k
    tokens, _ = greedy(model, n=2)
    assert len(tokens) == 2


# -- 3. loader errors ------------------------------------------------------------------
@pytest.fixture(scope="module")
def needed_block(stores):
    """(layer, component, expert) of a block the prompt reads in the last MoE layer."""
    path = stores("qwen3_moe")
    with Store.open(path) as store:
        layer, comp = store.moe_layers[-1], store.num_components(store.moe_layers[-1]) - 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(d2model, "current_rss_bytes", lambda: BASELINE)
        model, state = stream_model(path, pieces(path).top_k + 1)
    model(mx.array(PROMPT)[None])
    pool = next(p for p in state.scheduler.caches[layer].pools if p is not None and p.part.hi == comp)
    experts = pool.resident_experts()
    assert experts.size
    return layer, comp, int(experts[0])


def _damaged_copy(stores, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(stores("qwen3_moe"), copy)
    return copy


def _generate(model):
    return greedy(model, n=3)


@pytest.mark.parametrize("mode,prefetch", MODES, ids=[m for m, _ in MODES])
@pytest.mark.parametrize("damage", ["truncate", "checksum", "missing"])
def test_loader_error_names_file_and_block(damage, mode, prefetch, stores, needed_block, tmp_path,
                                           fixed_baseline):
    path = _damaged_copy(stores, tmp_path)
    layer, comp, expert = needed_block
    model, state = stream_model(path, pieces(path).top_k, mode=mode, prefetch=prefetch)
    file = state.store.expert_file(layer, comp)
    stride, block = state.store.block_stride(layer, comp), state.store.block_bytes(layer, comp)
    # The runtime opens expert files on first read: damage them after load, before use.
    assert not state.store._fds
    if damage == "truncate":  # expert 0 whole, expert 1 cut mid-block, the rest gone
        os.truncate(file, stride + block // 2)
        want = ["truncated", f"layer {layer} component {comp} expert"]
    elif damage == "checksum":
        with open(file, "r+b") as f:
            f.seek(expert * stride + block // 3)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x5A]))
        want = ["checksum mismatch", f"layer {layer} component {comp} expert {expert}"]
    else:
        os.rename(file, file.with_name(file.name + ".moved"))
        want = [f"layer {layer} component {comp} expert", "No such file"]
    for attempt in range(2):  # a retry must fail again, not compute with a zeroed slot
        kind, value = guarded(lambda: _generate(model))
        assert kind == "error", f"attempt {attempt}: generation succeeded on a damaged store"
        assert isinstance(value, StoreError), repr(value)
        msg = str(value)
        assert str(file) in msg and all(w in msg for w in want), msg


def test_every_read_is_verified_after_eviction(stores, needed_block, tmp_path, fixed_baseline):
    """Damage after a clean reply: the next reply that reads a damaged, evicted block
    again fails (every read from disk is checked, by default), and verify=False is the
    documented way to skip the check."""
    path = _damaged_copy(stores, tmp_path)
    layer, comp, expert = needed_block
    model, state = stream_model(path, pieces(path).top_k, prefetch=True)
    assert state.loader.verify is True
    assert guarded(lambda: _generate(model))[0] == "ok"
    file = state.store.expert_file(layer, comp)
    stride, block = state.store.block_stride(layer, comp), state.store.block_bytes(layer, comp)
    with open(file, "r+b") as f:  # the fd is open now: corrupt the bytes it will read
        for e in range(state.store.num_experts):
            f.seek(e * stride + block // 2)
            f.write(b"\xff\x00\xff\x00")
    kind, value = guarded(lambda: _generate(model))
    assert kind == "error" and isinstance(value, StoreError), value
    assert "checksum mismatch" in str(value) and str(file) in str(value)
    unchecked, state = stream_model(path, pieces(path).top_k, verify=False)
    assert state.loader.verify is False
    assert guarded(lambda: _generate(unchecked))[0] == "ok"  # garbage in, no error: the switch works


def test_dense_files_are_the_listed_ones_and_verified(stores, tmp_path):
    path = _damaged_copy(stores, tmp_path)
    dense = sorted(path.glob("model*.safetensors"))[0]
    extra = path / "model-extra.safetensors"
    shutil.copy(dense, extra)
    with pytest.raises(StoreError, match="unexpected: model-extra.safetensors"):
        load_model(path, dtype="float32")
    extra.unlink()
    data = bytearray(dense.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dense.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{re.escape(str(dense))}: checksum mismatch"):
        load_model(path, dtype="float32")


# -- 4. loader concurrency ---------------------------------------------------------------
def _pool(store, part_kind="planes", part=0, capacity=2, act=mx.float32):
    spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
    p = make_layout(part_kind, spec).parts[part]
    layer = store.moe_layers[0]
    return PartPool(layer, p, slot_tensors(p, store.layout(layer, 0), spec.group_size), capacity,
                    store.num_experts, act), spec


@pytest.mark.parametrize("threads", [4, 0])
def test_same_block_requested_while_in_flight_is_read_once(threads, stores, monkeypatch):
    with Store.open(stores("qwen3_moe")) as store:
        layer = store.moe_layers[0]
        pool, spec = _pool(store)
        reads = []
        real = store.read_block_scattered

        def slow(*args, **kw):
            reads.append(args[:3])
            time.sleep(0.3)
            return real(*args, **kw)

        monkeypatch.setattr(store, "read_block_scattered", slow)
        loader = ExpertLoader(store, spec, threads=threads)
        start = threading.Barrier(6)
        futures = []
        lock = threading.Lock()

        def submit_many():
            start.wait()
            # In-caller reads (threads=0) block the submitting thread: it asks once.
            for _ in range(25 if threads else 1):
                f = loader.submit(pool, 3, 1)
                with lock:
                    futures.append(f)

        workers = [threading.Thread(target=submit_many) for _ in range(6)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(TIMEOUT)
        assert not any(w.is_alive() for w in workers)
        assert all(f.result(TIMEOUT) == store.block_bytes(layer, 0) for f in futures)
        assert len(futures) == (150 if threads else 6) and len({id(f) for f in futures}) == 1
        assert reads == [(layer, 0, 3)]
        assert loader.blocks_read == 1 and loader.bytes_read == store.block_bytes(layer, 0)
        # Another slot is another read; the finished request is not cached forever either.
        loader.submit(pool, 3, 0).result(TIMEOUT)
        loader.submit(pool, 3, 1).result(TIMEOUT)
        assert loader.blocks_read == 3
        loader.close()


def test_request_after_the_read_finished_reads_again(stores, monkeypatch):
    """A finished read is not "in flight", even before the loader has forgotten it: in
    between, the slot may have held another expert, so the same request must read again."""
    with Store.open(stores("qwen3_moe")) as store:
        layer = store.moe_layers[0]
        pool, spec = _pool(store)
        loader = ExpertLoader(store, spec, threads=3)
        forget = loader._forget
        monkeypatch.setattr(loader, "_forget", lambda key: (time.sleep(0.5), forget(key)))
        name = "up_proj.weight"
        loader.submit(pool, 3, 1).result(TIMEOUT)  # expert 3 in slot 1 ...
        loader.submit(pool, 4, 1).result(TIMEOUT)  # ... evicted for expert 4 ...
        assert np.array_equal(pool.views[name][1], store.read_block(layer, 0, 4)[name])
        loader.submit(pool, 3, 1).result(TIMEOUT)  # ... and back: read it again
        assert loader.blocks_read == 3
        assert np.array_equal(pool.views[name][1], store.read_block(layer, 0, 3)[name])
        loader.close()


# -- 5. the cache's state machine -------------------------------------------------------------
@pytest.fixture
def cache(stores):
    from d2moe_mlx.cache import ExpertCache
    from d2moe_mlx.policies import LRUPolicy

    with Store.open(stores("qwen3_moe")) as store:
        pool, _ = _pool(store, capacity=3)
        yield ExpertCache(pool.layer, [pool], LRUPolicy(store.num_experts)), pool


def test_acquire_never_evicts_pinned_or_loading_slots(cache):
    from d2moe_mlx.cache import CacheFullError

    lc, pool = cache
    pins, loads = lc.acquire(0, np.array([0, 1, 2]))
    assert loads == [(0, 0), (1, 1), (2, 2)] and sorted(pins.tolist()) == [0, 1, 2]
    assert not pool.ready(np.array([0, 1, 2])).any()  # loading, not ready
    lc.loaded(0, 0)
    lc.loaded(0, 2)  # expert 1 still loading
    lc.release(0, pins)
    for e in (0, 1, 2):  # 0 is used first (least recent), 2 last
        lc.policy.on_access(np.array([e]))
    held, _ = lc.acquire(0, np.array([0]))  # a computation reads expert 0
    assert sorted(pool.evictable().tolist()) == [2]  # 0 pinned, 1 loading
    pins5, loads = lc.acquire(0, np.array([5]))
    assert loads == [(5, 2)]  # not 0 (least recent, but pinned) nor 1 (loading)
    assert pool.slot_of[2] == -1 and pool.slot_of[5] == 2
    table = np.array(pool.table)
    assert table[2] == pool.zero_slot and table[0] == 0  # evicted: pairs of 2 read zeros
    before = (pool.slot_of.copy(), pool.expert_of.copy(), pool.state.copy(), pool.pins.copy())
    with pytest.raises(CacheFullError, match="only 0 slots are free or evictable"):
        lc.acquire(0, np.array([6]))  # 0 pinned, 1 and 5 loading
    after = (pool.slot_of, pool.expert_of, pool.state, pool.pins)
    assert all((a == b).all() for a, b in zip(before, after)), "a refused acquire changed state"
    with pytest.raises(RuntimeError, match="in use"):
        lc._evict(pool, 0)  # pinned
    lc.loaded(0, 2)
    lc.release(0, pins5)
    lc.release(0, held)
    with pytest.raises(RuntimeError, match="unpinned more often"):
        lc.release(0, held)


def test_a_failed_load_frees_its_slot_and_is_loaded_again(cache):
    lc, pool = cache
    pins, loads = lc.acquire(0, np.array([4]))
    (e, slot), = loads
    lc.failed(0, slot)
    lc.release(0, pins)
    assert pool.slot_of[4] == -1 and not pool.ready(np.array([4]))[0]
    assert np.array(pool.table)[4] == pool.zero_slot  # never computed from the failed slot
    _, again = lc.acquire(0, np.array([4]))
    assert again and again[0][0] == 4  # placed and loaded again, not taken as resident
    with pytest.raises(RuntimeError, match="was not loading"):
        lc.failed(0, pool.slot_of[0] if pool.slot_of[0] >= 0 else pool.capacity - 1)


def test_failed_load_in_a_call_is_retried_not_computed(stores, fixed_baseline, monkeypatch):
    """One read fails once: the call raises; the next call reads the block again and the
    output equals the resident one."""
    path = stores("qwen3_moe")
    model, state = stream_model(path, pieces(path).top_k)
    real = Store.read_block_scattered
    failed = []

    def flaky(self, layer, comp, expert, bufs, verify=True):
        if not failed:
            failed.append((layer, comp, expert))
            raise StoreError("simulated I/O error")
        return real(self, layer, comp, expert, bufs, verify)

    monkeypatch.setattr(Store, "read_block_scattered", flaky)
    with pytest.raises(StoreError, match="simulated"):
        greedy(model, n=1)
    monkeypatch.setattr(Store, "read_block_scattered", real)
    ref, _ = load_model(path, dtype="float32")
    assert greedy(model)[0] == greedy(ref)[0]


# -- 6. slot contents equal the store -------------------------------------------------------
def _host(a: mx.array) -> np.ndarray:
    """numpy copy of an MLX array (bfloat16 as its uint16 words: numpy has no bfloat16)."""
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


def _check_slots(state, act_dtype):
    checked = 0
    for layer, lc in state.scheduler.caches.items():
        for pool in lc.pools:
            if pool is None:
                continue
            for slot in np.flatnonzero(pool.state == READY):
                expert = int(pool.expert_of[slot])
                blocks = {c: state.store.read_block(layer, c, expert) for c in pool.part.components}
                want = build_part(pool.part, state.spec, blocks, "test")
                for name, value in want.items():
                    got = _host(pool.compute[name][int(slot)])  # what gather_qmm reads
                    if name.endswith(".weight"):
                        assert got.dtype == np.uint32 and np.array_equal(got, value), name
                    else:
                        _same_float(got, value, act_dtype, name)
                checked += 1
            assert all((v[pool.zero_slot] == 0).all() for v in pool.views.values())
    assert checked > 0


def _same_float(got: np.ndarray, want: np.ndarray, act_dtype, name):
    if act_dtype == mx.bfloat16:
        want_bits = np.array(mx.array(want).astype(mx.bfloat16).view(mx.uint16))
        assert np.array_equal(float_to_bf16_bits(want), want_bits), name
        assert got.dtype == np.uint16 and np.array_equal(got, want_bits), name
    else:
        dt = np.dtype(str(act_dtype).split(".")[-1])
        assert np.array_equal(got.astype(np.float32), want.astype(dt).astype(np.float32)), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("levels,layout", [("2,4,8", "levels"), ("2,4,8", "planes"),
                                           ("2,3,4", "levels"), ("2,3,4", "planes")])
def test_slots_hold_the_store_blocks(levels, layout, dtype, stores, fixed_baseline):
    spec = mwq.DEFAULT_SPEC if levels == "2,4,8" else mwq.MWQSpec(2, (1, 1), 64)
    path = stores("qwen3_moe", spec if levels != "2,4,8" else None, method="nested")
    act = getattr(mx, dtype)
    p = pieces(path, act_itemsize=act.size, layout=layout)
    budget = budget_for(path, p.top_k + 1, act_itemsize=act.size, layout=layout)
    model, _ = load_model(path, dtype=dtype, memory_budget=budget, prefetch=True, layout=layout,
                          prefill_step=STEP)
    state = streaming_of(model)
    assert state.layout.kind == layout
    assert mwq.MWQSpec.from_dict(state.store.manifest["mwq"]) == spec
    greedy(model, n=4)
    _check_slots(state, act)


def test_float_to_bf16_bits_matches_mlx():
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x00000001, 0x807FFFFF,
                        0x3F808000, 0x3F818000, 0x3F80FFFF, 0x477FF000], dtype=np.uint32)  # ties, edges
    x = np.concatenate([words, special]).view(np.float32)
    got = float_to_bf16_bits(x)
    want = np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16))
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.isnan(np.array(mx.array(got[nan]).view(mx.bfloat16).astype(mx.float32))).all()


# -- 7. batches: mlx-lm's BatchGenerator --------------------------------------------------
BATCH_PROMPTS = [np.random.default_rng(s).integers(3, 256, n).tolist() for s, n in
                 ((1, 9), (2, 23), (3, 4), (4, 40))]
BATCH_RUNS = [(f, "stream") for f in FULL + LIGHT] + [(f, m) for f in ("qwen3_moe", "gpt_oss")
                                                      for m in ("sync", "naive")]


@pytest.mark.parametrize("family,mode", BATCH_RUNS, ids=[f"{f}-{m}" for f, m in BATCH_RUNS])
def test_batch_generator_gives_each_sequence_its_tokens_alone(family, mode, stores, fixed_baseline):
    """Four sequences of different lengths through mlx-lm's BatchGenerator (batch_generate)
    get the tokens each gets decoded alone, resident and streaming (exact policy)."""
    from mlx_lm.generate import batch_generate, generate_step

    from d2moe_mlx import load

    path = stores(family)

    def alone(model, prompt):
        return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=8)]

    resident, tokenizer = load(path, dtype="float32")
    want = [alone(resident, p) for p in BATCH_PROMPTS]
    budget = budget_for(path, pieces(path).top_k + 1, batch=4)
    model, tokenizer = load(path, dtype="float32", memory_budget=budget, mode=mode, batch=4,
                            prefill_step=STEP)
    for m in ((resident, model) if mode == "stream" else (model,)):
        got = batch_generate(m, tokenizer, BATCH_PROMPTS, max_tokens=8, return_token_ids=True)
        assert [list(map(int, t)) for t in got.token_ids] == want, (family, mode)
    assert streaming_of(model).plan.batch == 4 and streaming_of(model).stats.bytes_read > 0


@pytest.mark.parametrize("mode,policy,same", [("sync", "lfu", False), ("naive", "lru", False),
                                              ("stream", "cooc", False), ("stream", "lru", True)])
def test_repeated_expert_ids_in_every_mode(mode, policy, same, stores, resident, fixed_baseline):
    """longcat_flash's tokens name expert 0 several times (zero-expert picks): with top-k
    slots every mode and policy, and the GPU's same-shape path, give the resident model's
    tokens and logits."""
    path = stores("longcat_flash")
    model, state = stream_model(path, pieces(path).top_k, mode=mode, cache_policy=policy)
    # off the CPU, only same-shape partials are bitwise equal to the resident model (the
    # GPU's default); other shapes run other kernels (seen on the H200: 4.6e-4 in logits)
    state.scheduler.same_shapes = same or mx.default_device() != mx.cpu
    assert_same_as_resident("longcat_flash", greedy(model), resident("longcat_flash"), state)
