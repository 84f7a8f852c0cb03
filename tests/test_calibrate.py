"""Store extras, next-layer expert predictors (ridge fit, recall, training) and their use by
prefetch: written by `d2moe calibrate`, exact streaming output, fallback without them."""

from __future__ import annotations

import json
import zlib

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import d2moe_mlx.model as d2model
from d2moe_mlx import mwq
from d2moe_mlx import predictor as P
from d2moe_mlx.budget import budget_for_slots
from d2moe_mlx.cli import main
from d2moe_mlx.engine import streaming_of
from d2moe_mlx.layout import make_layout
from d2moe_mlx.model import load_model
from d2moe_mlx.store import extras as X
from d2moe_mlx.store.format import MANIFEST_NAME, StoreError
from d2moe_mlx.store.outdir import check_out_dir
from d2moe_mlx.store.reader import Store

BASELINE = 64 << 20


@pytest.fixture(scope="module")
def store(small_store):
    return small_store


@pytest.fixture
def copy(store_copy):
    return store_copy


def _manifest(path):
    return json.loads((path / MANIFEST_NAME).read_text())


# -- extras ---------------------------------------------------------------------------------
def test_extra_round_trip_replace_and_absent(copy):
    a = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "ids": np.array([1, 2], np.int64)}
    X.write_extra(copy, "thing_1", a, {"note": "first", "n": 3})
    tensors, meta = X.read_extra(copy, "thing_1")
    assert meta == {"note": "first", "n": 3}
    assert set(tensors) == {"w", "ids"} and all(np.array_equal(tensors[k], a[k]) for k in a)
    entry = _manifest(copy)["extras"]["thing_1"]
    data = (copy / entry["file"]).read_bytes()
    assert entry["bytes"] == len(data) and entry["crc32"] == zlib.crc32(data)
    first = entry["file"]

    from d2moe_mlx.store.reader import Store

    with Store.open(copy) as opened:  # an opened store works as well as its path
        X.write_extra(opened, "thing_1", {"w": np.ones(2, np.float16)}, {"note": "second"})
    tensors, meta = X.read_extra(copy, "thing_1")
    assert meta == {"note": "second"} and tensors["w"].dtype == np.float16
    assert not (copy / first).exists()  # the replaced file is gone
    assert sorted(p.name for p in (copy / "extras").iterdir()) == [
        _manifest(copy)["extras"]["thing_1"]["file"].split("/")[1]]
    assert X.read_extra(copy, "other") is None
    Store.open(copy).close()
    check_out_dir(copy, overwrite=True)  # still "one of our stores": convert may replace it
    with Store.open(copy) as s:
        assert s.verify() == []
    for key in ("Bad", "a/b", "", "x" * 65):
        with pytest.raises(ValueError, match="extra key"):
            X.write_extra(copy, key, a, {})
    with pytest.raises(ValueError):
        X.write_extra(copy, "nan_meta", a, {"x": float("nan")})


def test_a_failed_write_leaves_the_store_as_it_was(copy, monkeypatch):
    X.write_extra(copy, "thing", {"w": np.zeros(3, np.float32)}, {"v": 1})
    before = (copy / MANIFEST_NAME).read_bytes()
    files = sorted(p.name for p in (copy / "extras").iterdir())

    def boom(root, manifest):
        raise OSError("disk full")

    monkeypatch.setattr(X, "_replace_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        X.write_extra(copy, "thing", {"w": np.ones(3, np.float32)}, {"v": 2})
    assert (copy / MANIFEST_NAME).read_bytes() == before
    assert sorted(p.name for p in (copy / "extras").iterdir()) == files  # no new or temp file
    assert X.read_extra(copy, "thing")[1] == {"v": 1}


def test_damaged_extras_are_store_errors_naming_the_file(copy):
    X.write_extra(copy, "thing", {"w": np.arange(64, dtype=np.float32)}, {})
    path = copy / _manifest(copy)["extras"]["thing"]["file"]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=rf"{path.name}.*corrupted"):
        X.read_extra(copy, "thing")
    with Store.open(copy) as s:
        assert any("corrupted" in p for p in s.verify())
    path.unlink()
    with pytest.raises(StoreError, match=rf"{path.name}: file is missing"):
        X.read_extra(copy, "thing")

    def edit(change):
        m = _manifest(copy)
        change(m)
        (copy / MANIFEST_NAME).write_text(json.dumps(m))

    edit(lambda m: m["extras"]["thing"].update(bytes="12"))
    with pytest.raises(StoreError, match="extra 'thing' must be"):
        Store.open(copy)
    edit(lambda m: m["extras"].update(thing={"file": "../x.safetensors", "bytes": 1, "crc32": 0,
                                             "meta": {}}))
    with pytest.raises(StoreError, match="must be extras/thing-"):
        Store.open(copy)
    edit(lambda m: m.update(extras=[1]))
    with pytest.raises(StoreError, match="'extras' must be an object"):
        Store.open(copy)


# -- fitting and measuring --------------------------------------------------------------------
def test_ridge_equals_lstsq():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 7))
    y = x @ rng.normal(size=(7, 5)) + rng.normal(size=5) + 0.1 * rng.normal(size=(300, 5))
    a = np.concatenate([x, np.ones((300, 1))], axis=1)
    w, b = P.fit_ridge(x, y, alpha=0.0)
    ref = np.linalg.lstsq(a, y, rcond=None)[0]
    np.testing.assert_allclose(np.vstack([w, b]), ref, rtol=1e-4, atol=1e-5)
    # penalised: least squares of [A; sqrt(lam) [I 0]] against [Y; 0]
    alpha = 0.5
    lam = alpha * (x ** 2).sum() / 7
    aug = np.vstack([a, np.sqrt(lam) * np.eye(7, 8)])
    ref = np.linalg.lstsq(aug, np.vstack([y, np.zeros((7, 5))]), rcond=None)[0]
    r = P.Ridge(7, 5)
    r.add(x[:100], y[:100])
    r.add(x[100:], y[100:])  # in chunks: the same statistics
    w, b = r.solve(alpha)
    np.testing.assert_allclose(np.vstack([w, b]), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        P.Ridge(3, 2).solve()


def test_recall_counts_the_true_experts_in_the_top_m():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(50, 10))
    truth = np.stack([rng.choice(10, 3, replace=False) for _ in range(50)])
    for m in (1, 3, 5, 10):
        ref = np.mean([len(set(np.argsort(-s)[:m]) & set(t)) / 3 for s, t in zip(scores, truth)])
        assert P.recall_at(scores, truth, m) == pytest.approx(ref)


def _planted(seed: int, n: int = 200, d: int = 12, e: int = 16, k: int = 2):
    """records(ids) for a fake 3-layer model: layer l's logits are a fixed linear map of the
    previous layer's input (plus a constant), its ids their top-k."""
    maps = np.random.default_rng(99).normal(size=(3, d, e))
    bias = np.random.default_rng(98).normal(size=(3, e))

    def records(ids):
        rng = np.random.default_rng(int(ids[0]))
        xs = [rng.normal(size=(n, d)) for _ in range(3)]
        out = {}
        for l in range(3):
            logits = (xs[l - 1] @ maps[l] + bias[l]) if l else rng.normal(size=(n, e))
            top = np.argsort(-logits, axis=-1)[:, :k]
            own = xs[l - 1] @ rng.normal(size=(d, e)) if l else None  # a router unlike the rule
            out[l * 2] = P.LayerRecord(rng.normal(size=(n, d)), xs[l], logits, top, own)
        return out

    return records


def test_the_predictor_recalls_a_planted_linear_routing_rule():
    records = _planted(0)
    train = [np.array([i]) for i in range(4)]
    test = [np.array([100 + i]) for i in range(2)]
    tensors, meta, report = P.train(records, train, test, alpha=1e-6)
    assert meta["layers"] == [2, 4] and meta["sources"] == {"2": 0, "4": 2}
    assert set(tensors) == {"layer2.weight", "layer2.bias", "layer4.weight", "layer4.bias"}
    assert report.mean("predictor", 2) > 0.99
    assert report.mean("router", 2) < 0.5 and report.mean("pre_attention", 2) < 0.5
    assert report.train_tokens == 800 and report.test_tokens == 400
    with pytest.raises(ValueError, match="held-out"):
        P.train(records, train, [])


# -- in the runtime -------------------------------------------------------------------------
def _budget(path, slots):
    with Store.open(path) as s:
        spec = mwq.MWQSpec.from_dict(s.manifest["mwq"])
        return budget_for_slots(slots, s, make_layout("levels", spec), spec.num_levels - 1, 4,
                                BASELINE, context=256)


def _decode(model, prompt, n=12):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)
    out = []
    for _ in range(n):
        tok = mx.argmax(logits[:, -1], axis=-1)
        out.append(int(tok.item()))
        logits = model(tok[None], cache=cache)
    return out


def test_calibrate_writes_predictors_that_prefetch_uses_exactly(copy, monkeypatch):
    monkeypatch.setattr(d2model, "current_rss_bytes", lambda: BASELINE)
    result = CliRunner().invoke(main, ["calibrate", str(copy), "--tokens", "768", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["train_tokens"] == 512 and summary["test_tokens"] == 256
    meta = X.read_extra(copy, P.KEY)[1]
    assert meta["layers"] == Store.open(copy).moe_layers[1:]
    prompt = list(range(3, 40))
    resident, _ = load_model(copy, dtype="float32")
    want = _decode(resident, prompt)
    runs = {}
    for name in ("predictor", "gate"):
        model, _ = load_model(copy, dtype="float32", memory_budget=_budget(copy, 3), context=256,
                              prefetch=True)
        engine = streaming_of(model)
        assert isinstance(engine.scheduler.predict, P.LinearPredictor)
        assert engine.scheduler.prefetch_top == meta["prefetch"]
        if name == "gate":  # the router-gate prefetch, for comparison
            engine.scheduler.predict = engine.scheduler.prefetch_top = None
        got = _decode(model, prompt)
        s = engine.stats
        assert got == want, name  # exact streaming
        assert s.predicted > 0 and s.prefetch_loads > 0 and s.syncs <= s.calls, name
        runs[name] = s.syncs
    assert runs["predictor"] == runs["gate"]  # no extra host sync


def test_a_store_without_predictors_prefetches_with_the_router(copy, monkeypatch):
    monkeypatch.setattr(d2model, "current_rss_bytes", lambda: BASELINE)
    model, _ = load_model(copy, dtype="float32", memory_budget=_budget(copy, 3), context=256,
                          prefetch=True)
    engine = streaming_of(model)
    assert engine.scheduler.predict is None
    _decode(model, list(range(3, 20)), n=4)
    assert engine.stats.predicted > 0


def test_a_predictor_that_does_not_fit_the_model_is_refused(copy, monkeypatch):
    monkeypatch.setattr(d2model, "current_rss_bytes", lambda: BASELINE)
    layers = Store.open(copy).moe_layers
    hidden = json.loads((copy / "config.json").read_text())["hidden_size"]
    tensors = {f"layer{l}.weight": np.zeros((hidden + 1, 8), np.float32) for l in layers[1:]}
    tensors.update({f"layer{l}.bias": np.zeros(8, np.float32) for l in layers[1:]})
    meta = {"kind": P.KIND, "layers": layers[1:], "prefetch": 2}
    X.write_extra(copy, P.KEY, tensors, meta)
    with pytest.raises(StoreError, match=r"predictor-[0-9a-f]{8}\.safetensors: layer \d+'s predictor"):
        load_model(copy, dtype="float32", memory_budget=_budget(copy, 3), context=256, prefetch=True)
    load_model(copy, dtype="float32")  # without prefetch the predictors are not read
    X.write_extra(copy, P.KEY, tensors, {**meta, "layers": layers})
    with pytest.raises(StoreError, match="predictors for layers"):
        load_model(copy, dtype="float32", prefetch=True)


def test_calibrate_refuses_a_text_too_short(copy, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\n")
    result = CliRunner().invoke(main, ["calibrate", str(copy), "--text", str(short)])
    assert result.exit_code == 1 and "give a longer --text" in result.output, result.output
    assert "extras" not in _manifest(copy)  # nothing written


def test_calibrate_with_nothing_to_train_is_an_error(copy):
    result = CliRunner().invoke(main, ["calibrate", str(copy), "--no-predictor"])
    assert result.exit_code == 1 and "nothing to calibrate" in result.output
    assert "extras" not in _manifest(copy)
