"""Family adapters: for every supported family, the adapter finds the MoE blocks of
mlx-lm's model and its gating rule gives the same top-k and weights as mlx-lm's
own block (observed through the block's output, so nothing of the block is assumed)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from make_test_checkpoints import FAMILIES

from d2moe_mlx.families import family_of, get_family, supported, text_args
from d2moe_mlx.families.taps import recorded, tap, untap
from d2moe_mlx.hooks import hooked
from d2moe_mlx.moe import projection_names


def _block_weights(block, family, x, inds, seen_x):
    """The per-(token, slot) weights mlx-lm's block applies to its experts: the output of
    the module that calls the experts (the block, or its ``experts`` container) with experts
    returning one-hot rows minus with experts returning zeros (shared experts cancel). A
    block weighting its experts' input (llama4, one expert per token): that input over x."""
    k = inds.shape[-1]
    if family.weights_on_input:
        assert k == 1
        return np.array((seen_x / x).astype(mx.float32))[..., :1]
    owner = family.experts_owner(block)

    def run(one_hot: bool):
        def make_fn(_l, _b, _o):
            def fn(xx, idx):
                shape = (*idx.shape, xx.shape[-1])
                if not one_hot:
                    return mx.zeros(shape, xx.dtype)
                eye = mx.eye(k, xx.shape[-1], dtype=xx.dtype)
                return mx.broadcast_to(eye, shape)
            return fn
        with hooked([(0, block)], family, make_fn):
            if owner is block:
                return block(x)
            tap(owner)
            try:
                block(x)
                return recorded(owner, "experts owner")
            finally:
                untap(owner)
    diff = (run(True) - run(False)).astype(mx.float32)
    return np.array(diff)[..., :k]


def _width(switch) -> int:
    """The experts' input width: the router's too (whatever the family's ModelArgs call it)."""
    return getattr(switch, projection_names(switch)[0]).weight.shape[-1]


@pytest.mark.parametrize("name", FAMILIES)
def test_adapter_routes_like_mlx_lm(name, models):
    model = models(name)
    family = family_of(model)
    assert family is get_family(name) and family.name in supported()
    blocks = family.blocks(model)
    assert blocks, f"{name}: no MoE block found"
    layers = [l for l, _ in blocks]
    assert layers == sorted(set(layers))
    gating = family.gating(text_args(model))
    rng = np.random.default_rng(0)
    for layer, block in blocks:
        x = mx.array(rng.normal(size=(2, 5, _width(family.experts_of(block)))).astype(np.float32))
        seen = {}

        def make_fn(_l, b, original):
            def fn(xx, idx):
                seen["x"], seen["idx"] = xx, idx
                seen["logits"] = family.router_logits(b, xx)  # as the engine reads them
                return original(xx, idx)
            return fn

        with hooked([(layer, block)], family, make_fn):
            block(x)
        logits = seen["logits"]
        inds, weights = gating.route(logits, family.correction(block), family.expert_factor(block))
        want_idx = np.sort(np.array(seen["idx"]), -1)
        assert np.array_equal(np.sort(np.array(inds), -1), want_idx), f"{name} layer {layer}"
        # weights keyed by expert id, both sides
        got_w = np.array(weights.astype(mx.float32))
        want_w = _block_weights(block, family, x, seen["idx"], seen["x"])
        # by expert id, then weight (a block may repeat an expert id)
        got_w, want_w = got_w.reshape(inds.shape), want_w.reshape(inds.shape)
        order_got = np.lexsort((got_w, np.array(inds)), axis=-1)
        order_want = np.lexsort((want_w, np.array(seen["idx"])), axis=-1)
        got_sorted = np.take_along_axis(got_w, order_got, -1)
        want_sorted = np.take_along_axis(want_w, order_want, -1)
        if family.scaled_output:  # the block's own per-token factor: compare proportions
            got_sorted = got_sorted / got_sorted.sum(-1, keepdims=True)
            want_sorted = want_sorted / want_sorted.sum(-1, keepdims=True)
        assert np.allclose(got_sorted, want_sorted, atol=1e-5), (name, layer, got_sorted, want_sorted)
        scores = np.array(gating.scores(logits))
        assert scores.shape[-1] == int(getattr(text_args(model), family.expert_count_key))
        if not gating.sigmoid:
            assert np.allclose(scores.sum(-1), 1.0, atol=1e-5)


def test_unknown_family_is_refused_by_name():
    with pytest.raises(ValueError, match="'llama' is not supported.*SwitchGLU.*qwen3_moe"):
        get_family("llama")


def test_hook_is_removed_after_an_error(models):
    model = models("qwen3_moe")
    family = family_of(model)
    (layer, block), *_ = family.blocks(model)
    original = family.experts_of(block)

    def make_fn(*_):
        def fn(x, idx):
            raise RuntimeError("boom")
        return fn

    with pytest.raises(RuntimeError, match="boom"):
        with hooked([(layer, block)], family, make_fn):
            block(mx.zeros((1, 2, text_args(model).hidden_size)))
    assert family.experts_of(block) is original


def test_router_bias_switched_off_reads_as_none():
    """bailing_moe without ``moe_router_enable_expert_bias``: mlx-lm's gate holds
    ``expert_bias = None``; the adapter routes without a bias, like the block."""
    from make_test_checkpoints import _COMMON, MLX_LM_CONFIGS, randomize_mlx_
    from mlx_lm.models import bailing_moe

    cfg = {**_COMMON, **MLX_LM_CONFIGS["bailing_moe"], "model_type": "bailing_moe",
           "moe_router_enable_expert_bias": False, "num_hidden_layers": 2}
    model = bailing_moe.Model(bailing_moe.ModelArgs.from_dict(cfg))
    randomize_mlx_(model)
    family = family_of(model)
    (layer, block), = family.blocks(model)
    assert family.correction(block) is None
    x = mx.array(np.random.default_rng(1).normal(size=(2, 5, 64)).astype(np.float32))
    seen = {}

    def make_fn(_l, _b, original):
        def fn(xx, idx):
            seen["idx"] = idx
            return original(xx, idx)
        return fn

    with hooked([(layer, block)], family, make_fn):
        block(x)
    inds, _ = family.gating(model.args).route(family.router_logits(block, x), None)
    assert np.array_equal(np.sort(np.array(inds), -1), np.sort(np.array(seen["idx"]), -1))
