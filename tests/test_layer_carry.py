"""The converter's layer-by-layer calibration feeds every decoder layer the input the
model's own forward gives it, also where layers carry state besides the hidden state
(Family.carry: deepseek_v41's hyper-connection mix, kimi_k3's block attention residuals)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from d2moe_mlx.convert import calibrate
from d2moe_mlx.convert.hf_config import load_mlx_reference
from d2moe_mlx.families import family_of
from d2moe_mlx.moe import decoder_layers

TOKENS = mx.array([[3, 17, 42, 99, 5, 63, 120, 7, 88, 31, 2, 77], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]])


class _Recorder:
    """Calls the real layer and keeps its hidden-state input (other attributes: the layer's)."""

    def __init__(self, layer, seen: list):
        self._layer, self._seen = layer, seen

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def __call__(self, x, *args, **kwargs):
        self._seen.append(np.array(x))
        return self._layer(x, *args, **kwargs)


@pytest.mark.parametrize("name", ["deepseek_v41", "kimi_k3", "deepseek"])
def test_layer_by_layer_inputs_match_the_model_forward(name, hf_checkpoint):
    model, _ = load_mlx_reference(hf_checkpoint(name), dtype="float32")
    family = family_of(model)
    layers = decoder_layers(model)
    saved, seen = list(layers), []
    try:
        layers[:] = [_Recorder(layer, seen) for layer in saved]
        mx.eval(model(TOKENS))
    finally:
        layers[:] = saved

    state, calls = calibrate.layer_calls(model, TOKENS, family.carry)
    for l, call in enumerate(calls):
        x = state[0] if family.carry else state
        assert np.allclose(np.array(x), seen[l], atol=1e-5), f"{name}: input of layer {l}"
        state = calibrate.run_layer(model, family, l, state, call, None)
