"""bailing_hybrid as Ling 2.5: mlx-lm's own ``bailing_hybrid`` module (lightning linear
attention + MLA), chosen by the checkpoint's architecture, through the same family adapter
as Ling 3 (transformers' BailingHybrid, run by mlx-lm's ``bailing_moe_v3``). A tiny model
built and saved by mlx-lm, converted by d2moe, goes through the checks every registry
family gets (test_families, test_runtime_parity, test_streaming), with their own code."""

from __future__ import annotations

import pytest
import test_families
import test_runtime_parity
import test_streaming
from make_test_checkpoints import make_checkpoint

import d2moe_mlx.model as d2model
from d2moe_mlx.convert.convert import convert
from d2moe_mlx.convert.hf_config import load_mlx_reference
from d2moe_mlx.model import load_model

VARIANT = "bailing_hybrid@lightning"  # make_test_checkpoints: model_type bailing_hybrid


@pytest.fixture(scope="module")
def lightning(tmp_path_factory):
    """(checkpoint, store) of the tiny mlx-lm-saved Ling 2.5 model, converted once (nested)."""
    root = tmp_path_factory.mktemp("ling25")
    ckpt = make_checkpoint(VARIANT, root / "hf")
    store = convert(ckpt, root / "store", **{**test_streaming.CONVERT, "method": "nested"})
    return ckpt, store.path


def test_mlx_lm_runs_its_bailing_hybrid_module(lightning):
    model, cfg = load_mlx_reference(lightning[0])
    assert type(model).__module__ == "mlx_lm.models.bailing_hybrid"
    assert cfg["architectures"] == ["BailingMoeV2_5ForCausalLM"] and "auto_map" in cfg
    kinds = [type(layer.attention).__name__ for layer in model.layers]
    assert kinds == ["LinearAttention", "LinearAttention", "MultiLatentAttention"]


def test_adapter_routes_like_mlx_lm(lightning):
    model = load_mlx_reference(lightning[0], dtype="float32")[0]
    test_families.test_adapter_routes_like_mlx_lm("bailing_hybrid", lambda _: model)


def test_adapter_routes_like_mlx_lm_without_bias_or_groups():
    """The gate's other branches: expert bias switched off (``expert_bias`` None), one group."""
    from make_test_checkpoints import _COMMON, MLX_LM_CONFIGS, randomize_mlx_
    from mlx_lm.models import bailing_hybrid

    cfg = {**_COMMON, **MLX_LM_CONFIGS[VARIANT], "model_type": "bailing_hybrid",
           "moe_router_enable_expert_bias": False, "n_group": 1, "topk_group": 1}
    model = bailing_hybrid.Model(bailing_hybrid.ModelArgs.from_dict(cfg))
    randomize_mlx_(model)
    test_families.test_adapter_routes_like_mlx_lm("bailing_hybrid", lambda _: model)


def test_levels_match_mlx_lm_with_reconstructed_experts(lightning):
    test_runtime_parity.test_levels_match_mlx_lm_with_reconstructed_experts((VARIANT, *lightning))


def test_top_level_close_to_full_precision(lightning):
    test_runtime_parity.test_top_level_close_to_full_precision((VARIANT, *lightning))


def test_streaming_with_top_k_slots_matches_resident(lightning, monkeypatch):
    monkeypatch.setattr(d2model, "current_rss_bytes", lambda: test_streaming.BASELINE)
    store = lightning[1]
    want = test_streaming.greedy(load_model(store, dtype="float32")[0])
    test_streaming.test_streaming_matches_resident_every_family(
        VARIANT, lambda _: store, lambda _: want, None)


def _hub_layout(src, dst):
    """``src`` (mlx-lm-saved) in the hub's layout, as mlx-lm's sanitize reads it: per-expert
    tensors, ``gate.weight``, MLA's ``kv_b_proj`` (un-absorbed), and an MTP layer appended
    after the base ones (a copy of the last layer)."""
    import json
    import shutil

    import mlx.core as mx

    from d2moe_mlx.convert.hf_config import load_hf_weights

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    heads, nope, v_dim = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    w, out = load_hf_weights(src), {}
    for k, v in w.items():
        if ".switch_mlp." in k:
            out.update({k.replace(".switch_mlp.", f".experts.{e}."): v[e]
                        for e in range(v.shape[0])})
        elif k.endswith(".gate.gate_proj.weight"):
            out[k.replace(".gate.gate_proj.", ".gate.")] = v
        elif k.endswith(".embed_q.weight"):  # [H, r, nope]^T + unembed_out [H, v, r]: kv_b_proj
            unembed = w[k.replace("embed_q", "unembed_out")]
            kv = mx.concatenate([v.swapaxes(-1, -2), unembed], axis=1)
            out[k.replace("embed_q", "kv_b_proj")] = kv.reshape(heads * (nope + v_dim), -1)
        elif not k.endswith(".unembed_out.weight"):
            out[k] = v
    n = cfg["num_hidden_layers"]
    out.update({k.replace(f".layers.{n - 1}.", f".layers.{n}."): v for k, v in list(out.items())
                if k.startswith(f"model.layers.{n - 1}.")})
    mx.save_safetensors(str(dst / "model.safetensors"), out)
    (dst / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    return dst


def test_hub_layout_converts_as_the_mlx_lm_saved_model(lightning, tmp_path):
    import mlx.core as mx
    import numpy as np

    ckpt, store = lightning
    hub = _hub_layout(ckpt, tmp_path / "hub")
    tokens = mx.array([[5, 17, 200, 33, 64, 99, 3, 150]])
    want = np.array(load_mlx_reference(ckpt)[0](tokens))
    assert np.array_equal(np.array(load_mlx_reference(hub)[0](tokens)), want)
    ours = convert(hub, tmp_path / "store", **{**test_streaming.CONVERT, "method": "nested"}).path
    got = np.array(load_model(ours, dtype="float32")[0](tokens))
    assert np.array_equal(got, np.array(load_model(store, dtype="float32")[0](tokens)))
