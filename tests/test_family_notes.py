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


# <longcat>
def test_hunyuan_per_layer_lists_and_what_mlx_lm_cannot_run():
    hub = {"model_type": "hunyuan", "hidden_size": 64, "num_attention_heads": 4,
           "attention_head_dim": 16, "moe_topk": [8, 8], "moe_intermediate_size": [96, 96],
           "num_shared_expert": [1, 1]}
    cfg = normalize_config(hub)
    assert (cfg["moe_topk"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
            cfg["num_shared_expert"]) == (8, 8, 96, 1)
    with pytest.raises(ValueError, match="moe_topk.*differs between layers"):
        normalize_config({**hub, "moe_topk": [8, 4]})
    with pytest.raises(ValueError, match="attention_head_dim"):
        normalize_config({**hub, "attention_head_dim": 32})
    with pytest.raises(ValueError, match="use_cla"):
        check_supported({**hub, "use_cla": True})


def test_transformers_hunyuan_v1_moe_refused_by_name_with_the_reason():
    with pytest.raises(ValueError, match="'hunyuan_v1_moe' is not supported.*renormalises"):
        check_supported({"model_type": "hunyuan_v1_moe"})


def test_longcat_flash_config_and_zero_expert_tensors():
    cfg = normalize_config({"model_type": "longcat_flash", "num_layers": 3,
                            "expert_ffn_hidden_size": 128, "moe_topk": 4})
    assert (cfg["num_hidden_layers"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
            cfg["zero_expert_type"], cfg["mla_scale_q_lora"]) == (6, 4, 128, "identity", True)
    with pytest.raises(ValueError, match="norm_topk_prob"):
        check_supported({"model_type": "longcat_flash", "norm_topk_prob": True})
    from d2moe_mlx.convert.hf_config import dropped_tensors

    dropped, message = dropped_tensors("longcat_flash", ["model.mtp.layers.0.mlp.gate_proj.weight",
                                                         "model.layers.0.mlp.router.classifier.weight"])
    assert dropped == {"model.mtp.layers.0.mlp.gate_proj.weight"} and "MTP" in message
    raw = {"model_type": "longcat_flash", "n_routed_experts": 2, "hidden_size": 4}
    w = {f"model.layers.0.mlp.experts.{e}.{p}.weight": mx.zeros((4, 4))
         for e in range(3) for p in ("gate_proj", "up_proj")}
    assert sorted(normalize_weights("longcat_flash", raw, w)) == sorted(
        k for k in w if ".experts.2." not in k)
    fused = normalize_weights("longcat_flash", raw, {
        "model.layers.0.mlp.experts.gate_up_proj": mx.zeros((3, 8, 4)),
        "model.layers.0.mlp.experts.down_proj": mx.zeros((2, 4, 4))})
    assert {k: v.shape[0] for k, v in fused.items()} == {
        f"model.layers.0.mlp.switch_mlp.{p}.weight": 2 for p in ("gate_proj", "up_proj", "down_proj")}


def test_hunyuan_hub_layout_loads_as_the_mlx_lm_saved_model(hf_checkpoint, tmp_path):
    """A hub-layout hunyuan checkpoint (per-expert tensors, remote code, the hub config's
    per-layer lists and norm_topk_prob) gives mlx-lm's model of the same weights."""
    import json
    import shutil

    import numpy as np

    from d2moe_mlx.convert.hf_config import load_hf_weights, load_mlx_reference

    src = hf_checkpoint("hunyuan")
    hub = shutil.copytree(src, tmp_path / "hub", ignore=shutil.ignore_patterns("*.safetensors"))
    out = {}
    for k, v in load_hf_weights(src).items():
        for e in range(v.shape[0] if ".switch_mlp." in k else 0):
            out[k.replace(".switch_mlp.", f".experts.{e}.")] = v[e]
        if ".switch_mlp." not in k:
            out[k] = v
    mx.save_safetensors(str(hub / "model.safetensors"), out)
    cfg = json.loads((src / "config.json").read_text())
    assert isinstance(cfg["moe_topk"], list)
    cfg.update(auto_map={"AutoModelForCausalLM": "hunyuan.HunYuanMoEV1ForCausalLM"},
               norm_topk_prob=True, attention_head_dim=16, use_mla=False)
    (hub / "config.json").write_text(json.dumps(cfg))
    tokens = mx.array([[5, 17, 200, 33, 64, 99, 3, 150]])
    want = np.array(load_mlx_reference(src)[0](tokens))
    assert np.array_equal(np.array(load_mlx_reference(hub)[0](tokens)), want)
