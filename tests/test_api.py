"""The Python API: mlx-lm compatible load / generate / stream_generate."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate as mlx_generate
from mlx_lm.generate import stream_generate as mlx_stream_generate

import d2moe_mlx
from d2moe_mlx.convert.convert import convert
from d2moe_mlx.moe import MWQSwitchLinear, set_level
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
    top, _ = d2moe_mlx.load_model(store, dtype="float32")
    base, _ = d2moe_mlx.load_model(store, level=0, dtype="float32")
    x = mx.array([[5, 9, 33, 70, 2, 8]])
    set_level(top, 0)  # the top-level model holds every level; level 0 must equal a level-0 load
    assert mx.allclose(top(x), base(x), atol=1e-5).item()
    with pytest.raises(ValueError, match="level 1 is not loaded"):
        set_level(base, 1)


def test_dense_weights_are_mlx_lm_quantized_and_experts_mwq(store):
    model, _ = d2moe_mlx.load_model(store, dtype="float32")
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert "QuantizedLinear" in kinds and "MWQSwitchLinear" in kinds
    assert all(m.num_levels == 3 for _, m in model.named_modules() if isinstance(m, MWQSwitchLinear))


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
