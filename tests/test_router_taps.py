"""Families whose router does not read the experts' input (gemma4: the decoder layer's
residual; llama4: experts on x * sigmoid(score)) read the router logits where the block
computes them (families/taps.py). The calibration and trace probes get them through the
family adapter, for layers that return a tuple (gemma4) too."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from d2moe_mlx.calibration import record_layers
from d2moe_mlx.families import family_of, text_args
from d2moe_mlx.families.taps import is_tapped
from d2moe_mlx.hooks import hooked
from d2moe_mlx.trace import record_trace

TAPPED = ("gemma4_text", "llama4")
IDS = np.array([3, 17, 42, 99, 5, 63, 120, 7, 88, 31, 2, 77], dtype=np.int32)


class _Bytes:
    def encode(self, text: str) -> list[int]:
        return list(text.encode())


@pytest.mark.parametrize("family", TAPPED)
def test_tap_is_put_back_and_keeps_the_parameters(family, models):
    model = models(family)
    fam = family_of(model)
    (_, block), *_ = fam.blocks(model)
    router = block
    for part in fam.router_tap.split("."):
        router = router[part]
    def params():  # all but the experts' (the hook below stands in for them)
        return [(k, id(v)) for k, v in tree_flatten(model.parameters()) if ".experts." not in k]

    before = params()
    with pytest.raises(RuntimeError, match="not tapped"):
        fam.router_logits(block, mx.zeros((1, 1, 64)))
    with hooked(fam.blocks(model), fam, lambda l, b, o: o):
        assert is_tapped(router)
        assert params() == before  # the same module, in the same place, with its weights
    assert not is_tapped(router) and "_d2moe_out" not in router.__dict__


@pytest.mark.parametrize("family", TAPPED)
def test_calibration_records_the_routing_of_the_call(family, models):
    """record_layers: the recorded logits route to the experts the block dispatched."""
    model = models(family)
    fam = family_of(model)
    records = record_layers(model, IDS)
    assert sorted(records) == [l for l, _ in fam.blocks(model)]
    gating = fam.gating(text_args(model))
    by_layer = dict(fam.blocks(model))
    for n, (layer, rec) in enumerate(sorted(records.items())):
        assert rec.logits.shape == (len(IDS), 8) and rec.x.shape == (len(IDS), 64)
        inds, _ = gating.route(mx.array(rec.logits), fam.correction(by_layer[layer]))
        assert np.array_equal(np.sort(np.array(inds), -1), np.sort(rec.ids, -1)), layer
        assert (rec.gate_prev is None) == (n == 0)


@pytest.mark.parametrize("family", TAPPED)
def test_trace_scores_are_the_router_probabilities_of_the_call(family, models):
    model = models(family)
    fam = family_of(model)
    records = record_layers(model, IDS)
    trace = record_trace(model, _Bytes(), bytes(IDS.tolist()).decode("latin-1"), chunk=5)
    gating = fam.gating(text_args(model))
    for row, layer in enumerate(trace["meta"]["layers"]):
        probs = np.array(gating.scores(mx.array(records[layer].logits)))
        ids = trace["ids"][row].astype(np.int64)
        assert np.array_equal(np.sort(ids, -1), np.sort(records[layer].ids, -1))
        assert np.allclose(trace["scores"][row], np.take_along_axis(probs, ids, -1), atol=1e-5)


def test_tap_survives_quantization(models):
    """mlx-lm quantizes a model after it is built (d2moe hooks it while building): the
    router's quantized Linear is tapped too."""
    import mlx.nn as nn

    from d2moe_mlx.families.taps import tap

    linear = nn.Linear(64, 8)
    tap(linear)
    holder = nn.Module()
    holder.proj = linear
    nn.quantize(holder, group_size=64, bits=8)
    assert isinstance(holder.proj, nn.QuantizedLinear) and is_tapped(holder.proj)
    y = holder.proj(mx.ones((1, 64)))
    assert holder.proj.__dict__["_d2moe_out"] is y


def test_quantized_dense_store_runs_a_score_policy(hf_checkpoint, tmp_path):
    """The converter's default store (8-bit dense weights, router included) with a policy
    that reads router scores in every call."""
    from d2moe_mlx import load_model
    from d2moe_mlx.convert.convert import convert

    store = convert(hf_checkpoint("gemma4_text"), tmp_path / "store", dtype="float32",
                    calib_tokens=64, seq_len=32)
    model, _ = load_model(store.path, quality="balanced", dtype="float32")
    out = model(mx.array([IDS.tolist()]))
    assert np.isfinite(np.array(out)).all()
