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


def test_minimax_m3_vl_rotary_dim_as_transformers_reads_it():
    """transformers rotates head_dim x partial_rotary_factor channels and ignores the
    rotary_dim it writes; an indexer head narrower than the rotated channels is refused."""
    text = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "rotary_dim": 64,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                "partial_rotary_factor": 0.5},
            "layer_types": ["minimax_m3_sparse", "full_attention"], "index_head_dim": 16}
    cfg = normalize_config({"model_type": "minimax_m3_vl", "text_config": text})
    assert cfg["text_config"]["rotary_dim"] == 8 and text["rotary_dim"] == 64
    with pytest.raises(ValueError, match="index_head_dim 4 < rotary_dim 8"):
        normalize_config({"model_type": "minimax_m3_vl", "text_config": {**text, "index_head_dim": 4}})
    with pytest.raises(ValueError, match="text_config"):
        normalize_config({"model_type": "minimax_m3_vl", **text})
    with pytest.raises(ValueError, match="use_gemma_norm"):
        normalize_config({"model_type": "minimax_m3_vl", "text_config": {**text, "use_gemma_norm": False}})
    # the hub's spelling: SwiGLU-OAI named in hidden_act (mlx-lm's experts ignore it), indexer nested
    hub = {k: v for k, v in text.items() if k not in ("layer_types", "index_head_dim")}
    hub["sparse_attention_config"] = {"sparse_attention_freq": [1, 0], "sparse_index_dim": 4}
    assert check_supported({"model_type": "minimax_m3_vl", "hidden_act": "swigluoai"})
    with pytest.raises(ValueError, match="index_head_dim 4"):
        normalize_config({"model_type": "minimax_m3_vl", "text_config": hub})


def test_minimax_m3_vl_towers_dropped_and_fused_mlps_split():
    from d2moe_mlx.convert.hf_config import dropped_tensors

    names = ["model.vision_tower.blocks.0.attn.qkv.weight", "vision_tower.vision_model.x.weight",
             "multi_modal_projector.linear_1.weight", "patch_merge_mlp.linear_1.weight",
             "model.language_model.layers.0.mlp.gate_up_proj.weight"]
    dropped, message = dropped_tensors("minimax_m3_vl", names)
    assert dropped == set(names[:4]) and "vision tower and projector" in message
    w = {names[-1]: mx.arange(8 * 4, dtype=mx.float32).reshape(8, 4), names[0]: mx.zeros((2,))}
    out = normalize_weights("minimax_m3_vl", {"model_type": "minimax_m3_vl"}, w)
    assert set(out) == {"language_model.model.layers.0.mlp.gate_proj.weight",
                        "language_model.model.layers.0.mlp.up_proj.weight"}
    assert mx.array_equal(out["language_model.model.layers.0.mlp.up_proj.weight"], w[names[-1]][4:])


def test_bailing_norm_head_applied_once_by_the_converter():
    cfg = normalize_config({"model_type": "bailing_moe", "norm_head": True})
    assert cfg["norm_head"] is False  # mlx-lm's sanitize would need lm_head in every part
    layer = {"model.layers.1.mlp.gate.gate_proj.weight": mx.ones((8, 4))}
    assert normalize_weights("bailing_moe", cfg, layer).keys() == layer.keys()
    head = normalize_weights("bailing_moe", cfg, {"lm_head.weight": mx.full((3, 4), 2.0)})
    assert mx.allclose(mx.linalg.norm(head["lm_head.weight"], axis=0), mx.ones(4))


def test_bailing_hybrid_config_read_for_mlx_lm_bailing_moe_v3():
    raw = {"model_type": "bailing_hybrid", "architectures": ["BailingHybridForCausalLM"],
           "num_hidden_layers": 4, "layer_group_size": 2, "num_experts_per_token": 3,
           "num_expert_group": 2, "moe_renormalize": True, "model_max_length": 64,
           "head_dim": 8, "linear_head_dim": 16, "moe_intermediate_size": 32,
           "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]}
    cfg = normalize_config(raw)
    assert cfg["architectures"] == ["BailingMoeV3ForCausalLM"]  # mlx-lm's bailing_moe_v3 module
    assert (cfg["num_experts_per_tok"], cfg["n_group"], cfg["max_position_embeddings"],
            cfg["head_dim"], cfg["first_k_dense_replace"]) == (3, 2, 64, 16, 1)
    assert cfg["moe_shared_expert_intermediate_size"] == 32
    with pytest.raises(ValueError, match="layer_group_size=2"):
        normalize_config({**raw, "layer_types": ["linear_attention"] * 4})
    # other architectures: mlx-lm's bailing_hybrid module (Ling 2.5), config as written
    ling25 = {**raw, "architectures": ["BailingMoeV2_5ForCausalLM"], "num_experts_per_tok": 3}
    assert normalize_config(ling25)["architectures"] == ["BailingMoeV2_5ForCausalLM"]
    assert "moe_shared_expert_intermediate_size" not in normalize_config(ling25)
    with pytest.raises(ValueError, match="2 or more experts"):  # mlx-lm keeps a raw weight
        normalize_config({**ling25, "num_experts_per_tok": 1})
    with pytest.raises(ValueError, match="moe_renormalize"):
        check_supported({**raw, "moe_renormalize": False})


def test_bailing_hybrid_output_projection_named_per_layer_kind():
    cfg = {"model_type": "bailing_hybrid", "num_hidden_layers": 3, "layer_group_size": 3,
           "architectures": ["BailingHybridForCausalLM"]}
    w = {f"model.layers.{i}.self_attn.o_proj.weight": mx.zeros((2, 2)) for i in range(3)}
    out = normalize_weights("bailing_hybrid", cfg, w)
    assert sorted(out) == ["model.layers.0.attention.o_proj.weight",  # KDA
                           "model.layers.1.attention.o_proj.weight",
                           "model.layers.2.attention.dense.weight"]  # MLA
    # Ling 2.5 (lightning + MLA): every output projection is mlx-lm's "dense"
    w = {f"model.layers.{i}.attention.dense.weight": mx.zeros((2, 2)) for i in range(3)}
    ling25 = {**cfg, "architectures": ["BailingMoeV2_5ForCausalLM"]}
    assert normalize_weights("bailing_hybrid", ling25, w).keys() == w.keys()


def test_phixtral_hub_config_names():
    cfg = normalize_config({"model_type": "phixtral", "n_embd": 64, "n_layer": 2, "n_head": 4,
                            "vocab_size": 256, "num_local_experts": 4})
    assert (cfg["model_dim"], cfg["num_layers"], cfg["num_heads"], cfg["num_vocab"]) == (64, 2, 4, 256)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (64, 2, 4)
    with pytest.raises(ValueError, match="n_embd"):
        normalize_config({"model_type": "phixtral", "n_layer": 2})


def test_dsv41_families_refuse_what_mlx_lm_cannot_read():
    with pytest.raises(ValueError, match="DeepSeek-layout.*mlx_lm.convert"):
        normalize_weights("deepseek_v41", {"model_type": "deepseek_v41"},
                          {"layers.1.ffn.experts.0.w1.weight": mx.zeros((4, 4))})
    assert normalize_weights("deepseek_v41", {"model_type": "deepseek_v41"},
                             {"model.layers.1.mlp.gate.weight": mx.zeros((8, 4))})
    with pytest.raises(ValueError, match="latent MoE"):
        normalize_config({"model_type": "kimi_k3", "text_config": {"routed_expert_hidden_size": 32}})
    with pytest.raises(ValueError, match="kv_b_proj"):
        normalize_weights("kimi_vl", {"model_type": "kimi_vl"},
                          {"language_model.model.layers.1.self_attn.kv_b_proj.weight": mx.zeros((4, 4))})
    # a wrapper's text model is held to its own family's limits
    for wrapper in ("kimi_k25", "kimi_vl"):
        with pytest.raises(ValueError, match="scoring_func='softmax'"):
            normalize_config({"model_type": wrapper, "text_config": {"scoring_func": "softmax"}})


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
