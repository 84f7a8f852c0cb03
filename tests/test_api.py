"""The Python API: mlx-lm compatible load / generate / stream_generate."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate as mlx_generate
from mlx_lm.generate import stream_generate as mlx_stream_generate

import d2moe_mlx
from d2moe_mlx.convert.convert import convert
from d2moe_mlx.engine import engine_of
from d2moe_mlx.experts import ExpertLayer
from d2moe_mlx.moe import set_level
from d2moe_mlx.store.format import StoreError


@pytest.fixture(scope="module")
def store(hf_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "store"
    return convert(hf_checkpoint("qwen3_moe"), out, dense_bits=4, dtype="float32",
                   calib_tokens=128, seq_len=32).path


def test_mlx_lm_generate_accepts_our_model(store):
    model, tokenizer = d2moe_mlx.load(store, dtype="float32")
    ours = d2moe_mlx.generate(model, tokenizer, "hello", max_tokens=10)
    theirs = mlx_generate(model, tokenizer, "hello", max_tokens=10)
    assert ours == theirs and len(ours) > 0
    tokens = [r.token for r in mlx_stream_generate(model, tokenizer, "hello", max_tokens=10)]
    assert tokens == [r.token for r in d2moe_mlx.stream_generate(model, tokenizer, "hello", max_tokens=10)]
    assert len(tokens) == 10 or tokens[-1] in tokenizer.eos_token_ids


def test_level_switch_changes_compute_and_matches_fresh_load(store):
    x = mx.array([[5, 9, 33, 70, 2, 8]])
    fresh = {lv: d2moe_mlx.load_model(store, level=lv, dtype="float32")[0](x) for lv in (0, 1, 2)}
    assert not mx.allclose(fresh[0], fresh[2], atol=1e-3).item()  # levels do differ
    model, _ = d2moe_mlx.load_model(store, dtype="float32")
    for lv in (0, 2, 1):  # down and up: the next call runs at the new level
        set_level(model, lv)
        assert engine_of(model).level == lv
        assert mx.allclose(model(x), fresh[lv], atol=1e-5).item(), lv
    with pytest.raises(ValueError, match="level 7 does not exist"):
        set_level(model, 7)
    with pytest.raises(ValueError, match="needs a model loaded by d2moe"):
        set_level(mx, 0)


def test_dense_weights_are_mlx_lm_quantized_and_experts_mwq(store):
    model, _ = d2moe_mlx.load_model(store, dtype="float32")
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert "QuantizedLinear" in kinds and "ExpertLayer" in kinds and "SwitchGLU" not in kinds
    engine = engine_of(model)
    assert engine.spec.num_levels == 3 and engine.layout.kind == "levels"  # nested by default
    layers = [m for _, m in model.named_modules() if isinstance(m, ExpertLayer)]
    assert sorted(el.layer for el in layers) == sorted(engine.scheduler.caches)


def test_bad_paths_and_levels(store, tmp_path, hf_checkpoint):
    with pytest.raises(StoreError, match="d2moe convert"):
        d2moe_mlx.load(hf_checkpoint("qwen3_moe"))
    with pytest.raises(StoreError):
        d2moe_mlx.load(tmp_path)
    with pytest.raises(ValueError, match="level 7 does not exist"):
        d2moe_mlx.load(store, level=7)


def test_store_config_mismatch_is_refused(store, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    original = (copy / "config.json").read_text()
    config = json.loads(original)
    config["moe_intermediate_size"] //= 2
    text = json.dumps(config)
    (copy / "config.json").write_text(text + " " * (len(original) - len(text)))  # same size: passes open()
    with pytest.raises(StoreError, match="does not belong to this config"):
        d2moe_mlx.load_model(copy)
