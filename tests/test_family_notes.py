"""The family table (``d2moe convert --list-families``) and the family-specific checks
of the converter: what is refused, warned about or accepted, and why."""

from __future__ import annotations

import mlx.core as mx
import pytest
from click.testing import CliRunner

from d2moe_mlx.cli import main
from d2moe_mlx.convert.hf_config import check_supported, normalize_config, normalize_weights
from d2moe_mlx.families import family_table, get_family, supported


def test_list_families_prints_every_family_and_how_it_was_verified():
    result = CliRunner().invoke(main, ["convert", "--list-families"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["family", "verified", "notes"]
    for name, verified, _ in family_table():
        row = next(l for l in lines if l.split()[:1] == [name])
        assert row.split()[1] == verified.split()[0]
        assert get_family(name).verified in ("transformers", "mlx-lm", "none")
    assert f"{len(supported())} families:" in result.output
    ernie = next(l for l in lines if l.startswith("ernie4_5_moe"))
    assert "score-correction bias" in ernie and "use_bias must be False" in ernie


def test_remote_code_accepted_only_where_hub_checkpoints_need_it():
    remote = {"auto_map": {"AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"}}
    assert check_supported({"model_type": "deepseek", **remote}) == "deepseek"
    with pytest.raises(ValueError, match="remote code"):
        check_supported({"model_type": "glm4_moe", **remote})


def test_dense_layers_from_mlp_layer_types():
    cfg = normalize_config({"model_type": "glm4_moe_lite", "hidden_size": 64,
                            "mlp_layer_types": ["dense", "dense", "sparse"]})
    assert cfg["first_k_dense_replace"] == 2
    with pytest.raises(ValueError, match="dense layers followed by sparse"):
        normalize_config({"model_type": "glm4_moe_lite", "mlp_layer_types": ["sparse", "dense"]})
    cfg = normalize_config({"model_type": "exaone_moe", "mlp_layer_types": ["dense", "sparse"]})
    assert cfg["is_moe_layer"] == [False, True]


def test_experts_per_token_under_the_common_name():
    cfg = normalize_config({"model_type": "ernie4_5_moe", "moe_k": 3})
    assert cfg["num_experts_per_tok"] == 3


def test_dropped_correction_bias_warns_only_when_not_zero():
    key = "model.layers.1.mlp.moe_statics.e_score_correction_bias"
    cfg = {"model_type": "ernie4_5_moe"}
    out = normalize_weights("ernie4_5_moe", cfg, {key: mx.zeros((1, 8))})
    assert key not in out
    with pytest.warns(UserWarning, match="expert choice can differ"):
        normalize_weights("ernie4_5_moe", cfg, {key: mx.ones((1, 8))})


def test_step3p5_hub_layout_refused():
    with pytest.raises(ValueError, match="mlx_lm.convert"):
        normalize_weights("step3p5", {"model_type": "step3p5"},
                          {"model.layers.1.moe.gate_proj.weight": mx.zeros((8, 4, 4))})


def test_sliding_layers_refused_where_mlx_lm_has_none():
    with pytest.raises(ValueError, match="sliding-window"):
        normalize_config({"model_type": "dots1", "sliding_window": 4, "use_sliding_window": True,
                          "layer_types": ["full_attention", "sliding_attention"]})


# <gemma>
def test_gemma4_per_layer_config_and_refusals():
    text = {"num_hidden_layers": 2, "head_dim": 16, "layer_types": ["sliding_attention", "full_attention"],
            "attention_k_eq_v": True, "per_layer_config": {"1": {"head_dim": 32, "num_key_value_heads": 1}}}
    cfg = normalize_config({"model_type": "gemma4", "text_config": dict(text), "top_k_experts": None})
    got = cfg["text_config"]
    assert (got["global_head_dim"], got["num_global_key_value_heads"]) == (32, 1)
    assert "per_layer_config" not in got and got["num_kv_shared_layers"] == 0
    assert got["final_logit_softcapping"] is None and got["use_double_wide_mlp"] is False
    cfg = normalize_config({"model_type": "gemma4_text", "num_hidden_layers": 7, "top_k_experts": 4})
    assert cfg["layer_types"][4:] == ["sliding_attention", "full_attention", "full_attention"]
    assert cfg["num_experts_per_tok"] == 4
    for bad in ({"per_layer_config": {"0": {"head_dim": 32}}},  # a sliding layer
                {"per_layer_config": {"1": {"num_key_value_heads": 1}}, "attention_k_eq_v": False},
                {"use_bidirectional_attention": "all"}, {"hidden_activation": "gelu"}):
        with pytest.raises(ValueError, match="gemma4"):
            normalize_config({"model_type": "gemma4_text", **{**text, **bad}})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        check_supported({"model_type": "gemma4", "tie_word_embeddings": False})


def test_llama4_layer_pattern_and_top_k_are_checked():
    text = {"num_hidden_layers": 4, "interleave_moe_layer_step": 2, "moe_layers": [1, 3],
            "no_rope_layers": [1, 1, 1, 0], "rope_parameters": {"rope_type": "default", "rope_theta": 25000.0}}
    cfg = normalize_config({"model_type": "llama4", "text_config": dict(text)})
    assert cfg["text_config"]["rope_theta"] == 25000.0 and cfg["text_config"]["rope_scaling"] is None
    for bad in ({"moe_layers": [0, 2]}, {"no_rope_layers": [1, 0, 1, 0]}, {"num_experts_per_tok": 2}):
        with pytest.raises(ValueError, match="llama4"):
            normalize_config({"model_type": "llama4", "text_config": {**text, **bad}})
    with pytest.raises(ValueError, match="text_config"):
        normalize_config({"model_type": "llama4", **text})
