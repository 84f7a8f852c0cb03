"""Tiny random Hugging Face MoE checkpoints, one per supported family.

Built with transformers' own config and model classes and written with
``save_pretrained`` (safetensors + config.json, float32), so they look like
real hub checkpoints of that family, only small. Weights are re-drawn with
larger spreads than transformers' init so that routing and logits are
non-trivial. A 256-token byte-level tokenizer is written alongside.

    python scripts/make_test_checkpoints.py mixtral /tmp/ckpt
    python scripts/make_test_checkpoints.py --all /tmp/ckpts   # one dir per family
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from d2moe_mlx.convert.hf_config import SUPPORTED_FAMILIES as FAMILIES  # one list of families

# Shared by every family: expert input dims (hidden 64, expert intermediate 128)
# are multiples of the quantizer's group size 64.
_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# Rope theta deliberately different from every mlx-lm ModelArgs default, so a
# config that is read without normalisation gives visibly different logits.
_ROPE = {"rope_type": "default", "rope_theta": 25000.0}
_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)

FAMILY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(
        intermediate_size=128,
        num_local_experts=8,
        num_experts_per_tok=2,
        rope_parameters=_ROPE,
    ),
    "qwen2_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=192,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        qkv_bias=True,
        rope_parameters=_ROPE,
    ),
    "qwen3_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        head_dim=16,
        rope_parameters=_ROPE,
    ),
    "olmoe": dict(
        intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        rope_parameters=_ROPE,
    ),
    "deepseek_v2": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        q_lora_rank=None,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        rope_parameters=_YARN,
        **_MLA,
    ),
    "deepseek_v3": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        q_lora_rank=32,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_parameters=_YARN,
        **_MLA,
    ),
    "gpt_oss": dict(
        num_hidden_layers=2,
        intermediate_size=128,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=6,
        max_position_embeddings=131072,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
    ),
    "granitemoe": dict(
        intermediate_size=128,
        num_local_experts=8,
        num_experts_per_tok=2,
        embedding_multiplier=2.0,
        logits_scaling=4.0,
        residual_multiplier=0.5,
        attention_multiplier=0.0625,
        rope_parameters=_ROPE,
    ),
    "phimoe": dict(
        intermediate_size=128,
        num_local_experts=8,
        num_experts_per_tok=2,
        attention_bias=True,
        lm_head_bias=True,
        router_jitter_noise=0.01,
        rope_parameters=_ROPE,
    ),
    "glm4_moe": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.7,
        use_qk_norm=True,
        attention_bias=True,
        head_dim=32,
        rope_parameters={**_ROPE, "partial_rotary_factor": 0.5},
    ),
    "dots1": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.7,
        rope_parameters=_ROPE,
    ),
    "ernie4_5_moe": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        moe_num_experts=8,
        moe_num_shared_experts=1,
        moe_k=2,
        moe_layer_start_index=1,
        moe_layer_end_index=2,
        use_bias=False,  # mlx-lm has no lm_head bias (mlx_lm_limits)
        rope_parameters=_ROPE,
    ),
    "mistral4": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        q_lora_rank=32,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.7,
        # llama-4 query scaling from position 8 on (the prompt is 16 tokens)
        rope_parameters={**_YARN, "original_max_position_embeddings": 8, "llama_4_scaling_beta": 0.2},
        **_MLA,
    ),
    "glm4_moe_lite": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        mlp_layer_types=["dense", "sparse", "sparse"],
        q_lora_rank=32,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.3,
        rope_parameters=_ROPE,
        **{**_MLA, "v_head_dim": 16},
    ),
    "deepseek_v32": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        mlp_layer_types=["dense", "sparse", "sparse"],
        q_lora_rank=32,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.3,
        index_topk=6,  # sparse attention within the 16-token prompt
        index_head_dim=32,
        # 16 indexer heads: with 2, ReLU'd scores tie at exactly 0 and mlx-lm's argpartition
        # and torch.topk break ties differently (documented in docs/FAMILIES.md)
        index_n_heads=16,
        rope_parameters=_ROPE,
        **_MLA,
    ),
    "exaone_moe": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=2,
        head_dim=16,
        mlp_layer_types=["dense", "sparse", "sparse"],
        first_k_dense_replace=1,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=6,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.3,
        rope_parameters=_ROPE,
    ),
    "afmoe": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=2,
        num_dense_layers=1,
        head_dim=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=6,
        route_scale=1.7,
        mup_enabled=True,
        rope_parameters=_ROPE,
    ),
    "laguna": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=192,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        num_attention_heads_per_layer=[4, 8, 4],
        mlp_layer_types=["dense", "sparse", "sparse"],
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=6,
        moe_routed_scaling_factor=1.7,
        moe_router_logit_softcapping=2.0,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 7000.0, "partial_rotary_factor": 1.0},
        },
    ),
    "kimi_linear": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_token=2,
        mlp_layer_types=["dense", "sparse", "sparse"],
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_head_dim=16,
        linear_num_heads=4,
        linear_conv_kernel_dim=3,
        num_expert_group=2,
        topk_group=1,
        moe_renormalize=True,
        routed_scaling_factor=1.7,
        model_max_length=512,
        rope_parameters=_ROPE,
        **_MLA,
    ),
    "mimo_v2_flash": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        head_dim=32,
        v_head_dim=16,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"],
        sliding_window=7,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.7,
        attention_value_scale=0.6,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 7000.0, "partial_rotary_factor": 0.5},
        },
    ),
    # two decoder layers of two attention sublayers each; 4 zero experts among 12,
    # top-3: tokens pick zero experts (expert 0 named several times in a token)
    "longcat_flash": dict(
        num_hidden_layers=4,
        ffn_hidden_size=96,
        expert_ffn_hidden_size=128,
        n_routed_experts=8,
        zero_expert_num=4,
        moe_topk=3,
        routed_scaling_factor=1.7,
        q_lora_rank=32,
        head_dim=16,
        rope_parameters=_ROPE,
        **_MLA,
    ),
}
# families transformers lacks (hub checkpoints ship remote code): tiny random
# models built with mlx-lm's own ModelArgs + Model and saved in mlx-lm's format
# (save_model + save_config, as ``mlx_lm.convert`` writes them). Plain rope_theta
# here: these configs are read by mlx-lm as written.
MLX_LM_CONFIGS: dict[str, dict] = {
    "deepseek": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        rope_theta=25000.0,
    ),
    "Klear": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        num_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        mlp_only_layers=[0],
        decoder_sparse_step=1,
        norm_topk_prob=True,
        attention_bias=False,
        rope_theta=25000.0,
    ),
    "step3p5": dict(
        num_hidden_layers=3,
        num_attention_groups=2,
        head_dim=16,
        intermediate_size=192,
        moe_intermediate_size=128,
        share_expert_dim=192,
        moe_num_experts=8,
        moe_top_k=2,
        moe_layers_enum="1,2",
        moe_router_scaling_factor=1.7,
        norm_expert_weight=True,
        swiglu_limits=[0.0, 0.6, 0.0],  # clamped SwiGLU experts in layer 1
        swiglu_limits_shared=[0.0, 0.0, 0.6],
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        sliding_window=6,
        attention_other_setting={"num_attention_heads": 8, "num_attention_groups": 2},
        partial_rotary_factors=[0.5, 1.0, 0.5],
        rope_theta=25000.0,
    ),
    # every routing switch off mlx-lm's default (sigmoid vs softmax, expert bias on,
    # groups, scaling); dense layer 0; norm_head on (the converter normalises lm_head)
    "bailing_moe": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=64,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        routed_scaling_factor=1.7,
        n_group=4,
        topk_group=2,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
        norm_head=True,
        rope_theta=25000.0,
    ),
    # hybrid: lightning linear attention (layers 0, 1) and full attention (layer 2)
    "bailing_moe_linear": dict(
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        layer_group_size=3,
        group_norm_size=2,
        head_dim=16,
        norm_topk_prob=False,
        score_function="softmax",
        moe_router_enable_expert_bias=True,
        routed_scaling_factor=1.5,
        n_group=2,
        topk_group=1,
        use_qk_norm=True,
        partial_rotary_factor=0.5,
        rope_theta=25000.0,
    ),
    # hybrid: KDA (layer 0) and gated MLA (layer 1), both MoE (bailing_hybrid, the same
    # mlx-lm module, has a dense layer); sigmoid group-limited routing
    "bailing_moe_v3": dict(
        num_hidden_layers=2,
        intermediate_size=192,
        moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=64,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=3,
        first_k_dense_replace=0,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.7,
        layer_group_size=2,
        head_dim=16,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        short_conv_kernel_size=3,
        kda_lower_bound=-4.0,
        rope_theta=25000.0,
    ),
    # phi-2 parallel blocks; mlx-lm's phixtral has its own config names
    "phixtral": dict(
        num_vocab=256,
        model_dim=64,
        num_heads=4,
        num_layers=2,
        rotary_dim=8,
        num_local_experts=8,
        num_experts_per_tok=3,
    ),
    # DeepSeek-V4.1: hyper-connections (2 streams), window-only layer 0, layer 1 compresses its
    # KV (ratio 2), layer 2 indexes it (top-3); sqrt-softplus routing at temperature 0.7.
    "deepseek_v41": dict(
        num_hidden_layers=3,
        num_attention_heads=4,
        head_dim=32,
        q_lora_rank=32,
        qk_rope_head_dim=16,
        o_groups=2,
        o_lora_rank=16,
        moe_intermediate_size=128,
        n_routed_experts=8,
        num_experts_per_tok=2,
        scoring_func="sqrtsoftplus",
        gate_temp=0.7,
        norm_topk_prob=True,
        routed_scaling_factor=1.7,
        swiglu_limit=0.6,
        sliding_window=4,
        compress_ratios=[0, 2, 2],
        kv_source_layer_ids=[1],
        index_source_layer_ids=[2],
        compress_rope_theta=40000.0,
        index_n_heads=2,
        index_head_dim=32,
        index_topk=3,
        hc_mult=2,
        hc_sinkhorn_iters=3,
        rope_theta=25000.0,
    ),
    # Kimi-K3: KDA linear attention (layers 1, 3 in its 1-based lists) and NoPE MLA (layer 2),
    # block attention residuals every 2 layers, dense layer 0, SiTU experts, grouped sigmoid
    # routing with a correction bias.
    "kimi_k3": dict(
        num_hidden_layers=3,
        num_key_value_heads=4,
        intermediate_size=96,
        hidden_act="situ",
        activation_situ_beta=1.5,
        activation_situ_linear_beta=4.0,
        linear_attn_config={"kda_layers": [1, 3], "full_attn_layers": [2], "num_heads": 2,
                            "head_dim": 16, "short_conv_kernel_size": 3},
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        mla_use_output_gate=True,
        num_experts=8,
        num_experts_per_token=2,
        num_shared_experts=1,
        moe_intermediate_size=128,
        routed_scaling_factor=1.7,
        first_k_dense_replace=1,
        num_expert_group=2,
        topk_group=1,
        attn_res_block_size=2,
    ),
    # Kimi-VL: a DeepSeek-V3 text model (no q_lora, MLA) in text_config, as mlx-lm saves it
    "kimi_vl": dict(
        text_config={**_COMMON, **_MLA, "model_type": "deepseek_v3", "num_hidden_layers": 3,
                     "intermediate_size": 192, "moe_intermediate_size": 128, "n_routed_experts": 8,
                     "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                     "q_lora_rank": None, "n_group": 2, "topk_group": 1, "norm_topk_prob": True,
                     "routed_scaling_factor": 2.2, "rope_theta": 25000.0},
    ),
    # shared MLP mixed in (use_mixed_mlp_moe), QK norm, NTK-alpha rope; per-layer
    # lists as the hub's Hunyuan-A13B config writes them
    "hunyuan": dict(
        num_hidden_layers=3,
        intermediate_size=96,
        moe_intermediate_size=[128, 128, 128],
        num_experts=8,
        moe_topk=[2, 2, 2],
        num_shared_expert=[1, 1, 1],
        use_mixed_mlp_moe=True,
        use_qk_norm=True,
        use_cla=False,
        cla_share_factor=2,
        attention_bias=False,
        tie_word_embeddings=True,
        rope_theta=25000.0,
        rope_scaling={"alpha": 7.0, "factor": 1.0, "type": "dynamic"},
    ),
    # bailing_hybrid as Ling 2.5 (mlx-lm's own bailing_hybrid module, chosen by the
    # architecture): lightning linear attention (layers 0, 1) and MLA (layer 2), dense layer 0,
    # sigmoid group-limited routing; auto_map as the hub's (remote code, never run)
    "bailing_hybrid@lightning": dict(
        architectures=["BailingMoeV2_5ForCausalLM"],
        auto_map={"AutoConfig": "configuration_bailing_moe_v2_5.BailingMoeV2_5Config",
                  "AutoModelForCausalLM": "modeling_bailing_moe_v2_5.BailingMoeV2_5ForCausalLM"},
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=64,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.7,
        score_function="sigmoid",
        norm_topk_prob=True,
        moe_router_enable_expert_bias=True,
        layer_group_size=3,
        group_norm_size=2,
        head_dim=16,
        partial_rotary_factor=0.5,
        use_qk_norm=True,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        num_nextn_predict_layers=0,
        rope_theta=25000.0,
    ),
}
HF_FAMILIES = tuple(f for f in FAMILIES if f not in MLX_LM_CONFIGS)  # transformers builds these

# Tensors mlx-lm's model ignores (docs/FAMILIES.md): kept at zero in the test
# checkpoints so that transformers parity measures everything else.
ZEROED = {"ernie4_5_moe": ("e_score_correction_bias",)}

_LINEAR_ATTN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=16, linear_conv_kernel_dim=3, head_dim=16)
FAMILY_CONFIGS.update({
    # hybrid: gated-delta linear attention + full attention (every 2nd layer), dense layer 0
    "qwen3_next": dict(
        num_hidden_layers=3,
        intermediate_size=96,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
        **_LINEAR_ATTN,
    ),
    "minimax_m2": dict(
        intermediate_size=128,
        num_local_experts=8,
        num_experts_per_tok=3,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
    ),
    # hybrid: short-convolution and attention layers, dense layer 0
    "lfm2_moe": dict(
        num_hidden_layers=3,
        intermediate_size=96,
        moe_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=3,
        num_dense_layers=1,
        use_expert_bias=True,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        conv_L_cache=4,
        norm_eps=1e-5,
        layer_types=["conv", "full_attention", "conv"],
        tie_word_embeddings=True,  # mlx-lm's lfm2_moe has no separate lm_head
        rope_parameters=_ROPE,
    ),
    # hybrid: mamba and attention layers (layer 3), experts in layers 1 (mamba) and 3
    "jamba": dict(
        num_hidden_layers=4,
        intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=3,
        attn_layer_period=4,
        attn_layer_offset=3,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_d_conv=3,
        mamba_expand=2,
        mamba_dt_rank=8,
        use_mamba_kernels=False,
    ),
    # hybrid: mamba2 and attention layers, every layer MoE + shared MLP, granite multipliers
    "granitemoehybrid": dict(
        num_hidden_layers=2,
        intermediate_size=128,
        shared_intermediate_size=64,
        num_local_experts=8,
        num_experts_per_tok=3,
        layer_types=["mamba", "attention"],
        position_embedding_type="rope",
        mamba_n_heads=4,
        mamba_d_head=32,
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_d_conv=3,
        mamba_chunk_size=16,
        embedding_multiplier=2.0,
        logits_scaling=4.0,
        residual_multiplier=0.5,
        attention_multiplier=0.0625,
        rope_parameters=_ROPE,
    ),
    # hybrid: mamba2, MoE (two: prefetch has a next layer), attention and MLP layers; group-limited sigmoid
    "nemotron_h": dict(
        layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "moe"],
        intermediate_size=96,
        head_dim=16,
        moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=64,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=4,  # groups of 2; with groups of 4 an 8-bit expert flips a near-tied group
        topk_group=2,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
        mamba_num_heads=4,
        mamba_head_dim=32,
        n_groups=1,
        ssm_state_size=16,
        conv_kernel=3,
        chunk_size=16,
        use_mamba_kernels=False,
        layer_norm_epsilon=1e-5,
    ),
    # sliding-window and full attention layers, a rope per layer kind
    "mellum": dict(
        intermediate_size=96,
        moe_intermediate_size=128,
        num_local_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        head_dim=16,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        mlp_layer_types=["sparse", "sparse"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 25000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 7000.0}},
    ),
})


# Ling 3 (transformers' BailingHybrid, mlx-lm's bailing_moe_v3 module): KDA linear
# attention (layers 0, 1) and gated MLA (layer 2), dense layer 0, sigmoid group-limited routing.
# head_dim = qk_rope_head_dim: transformers' config writes the rope width as head_dim and reads
# it back as the KDA head width.
FAMILY_CONFIGS["bailing_hybrid"] = dict(
    num_hidden_layers=3,
    intermediate_size=192,
    moe_intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=3,
    num_shared_experts=1,
    first_k_dense_replace=1,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=1.7,
    norm_topk_prob=True,
    layer_group_size=3,
    num_key_value_heads=4,
    head_dim=16,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    short_conv_kernel_size=3,
    kda_lower_bound=-4.0,
    num_mtp_layers=0,
    rope_parameters=_ROPE,
)
# mlx-lm's nemotron_h zeroes the scores of dropped groups, transformers sets them to -inf: the
# same experts while every kept score + bias > 0, which a non-negative bias guarantees
POSITIVE_BIAS = ("nemotron_h",)
# multimodal configs: the text part in text_config (vision tower kept tiny)
TEXT_CONFIGS: dict[str, dict] = {
    "qwen3_5_moe": dict(
        num_hidden_layers=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=3,
        layer_types=["linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        **_LINEAR_ATTN,
    ),
}


# kimi_k25: a DeepSeek-V3 text model (MLA, yarn rope, grouped sigmoid routing) in a
# multimodal wrapper with a one-block vision tower
TEXT_CONFIGS["kimi_k25"] = dict(
    num_hidden_layers=3,
    intermediate_size=192,
    moe_intermediate_size=128,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    q_lora_rank=32,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=1.7,
    rope_parameters=_YARN,
    **_MLA,
)
VISION_CONFIGS: dict[str, dict] = {
    "kimi_k25": dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                     patch_size=4, pos_emb_height=4, pos_emb_width=4, pos_emb_time=2),
    "qwen3_5_moe": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                        patch_size=4, temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16),
}


# hybrid: dense layer 0; lightning-indexer sparse attention in layers 0-1 (blocks of 4 keys,
# top-2 blocks of the 16-token prompt kept), full attention in layer 2; SwiGLU-OAI experts
# clamped; rotary_dim left at transformers' default 64 (transformers ignores it)
TEXT_CONFIGS["minimax_m3_vl"] = dict(
    num_hidden_layers=3,
    intermediate_size=128,
    dense_intermediate_size=96,
    shared_intermediate_size=64,
    num_local_experts=8,
    num_experts_per_tok=3,
    head_dim=16,
    routed_scaling_factor=1.7,
    swiglu_alpha=1.3,
    swiglu_limit=1.0,
    mlp_layer_types=["dense", "sparse", "sparse"],
    layer_types=["minimax_m3_sparse", "minimax_m3_sparse", "full_attention"],
    index_n_heads=2,
    index_head_dim=16,
    index_block_size=4,
    index_topk_blocks=2,
    index_local_blocks=1,
    rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
)
VISION_CONFIGS["minimax_m3_vl"] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, patch_size=4, temporal_patch_size=1,
                                       spatial_merge_size=1, image_size=16)
TOP_CONFIGS: dict[str, dict] = {"minimax_m3_vl": dict(projector_hidden_size=64)}  # multimodal wrapper


# the router reads the residual, the experts a normed copy (router logits tapped);
# every layer MoE; sliding + full attention with their own ropes, final logit soft cap
_GEMMA4_TEXT = dict(
    num_hidden_layers=2,
    head_dim=16,
    intermediate_size=96,
    moe_intermediate_size=128,
    num_experts=8,
    top_k_experts=2,
    enable_moe_block=True,
    hidden_size_per_layer_input=0,
    sliding_window=6,
    layer_types=["sliding_attention", "full_attention"],
    final_logit_softcapping=15.0,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 7000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                        "rope_theta": 25000.0}},
)
FAMILY_CONFIGS["gemma4_text"] = dict(**_GEMMA4_TEXT, global_head_dim=32)
TEXT_CONFIGS.update({
    # the 26B-A4B's attention: full-attention layers with K = V and one kv head (mlx-lm's
    # multimodal gemma4 has no untied lm_head: tied, as every gemma4 checkpoint)
    "gemma4": dict(**_GEMMA4_TEXT, global_head_dim=32, attention_k_eq_v=True,
                   num_global_key_value_heads=1, tie_word_embeddings=True),
    # mlx-lm's llama4 needs 4 layers (rope and chunked attention in all but every 4th) and
    # routes to 1 expert; MoE every 2nd layer; chunks of 8 tokens and attention temperature
    # tuning from position 8, so both show in 16 tokens
    "llama4": dict(
        num_hidden_layers=4,
        head_dim=16,
        intermediate_size=128,
        intermediate_size_mlp=96,
        num_local_experts=8,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        attention_chunk_size=8,
        floor_scale=8,
        attn_scale=0.2,
        rope_parameters=_ROPE,
    ),
})
VISION_CONFIGS.update({
    "gemma4": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16),
    "llama4": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
                   image_size=32, patch_size=16),
})
# transformers 5.24's Llama4ForConditionalGeneration.forward fails on text-only input (it
# reads outputs.image_outputs, which its language model's output lacks): the text logits
# come from its language model (family -> attribute of the loaded model).
HF_TEXT_MODEL = {"llama4": "language_model"}
# gemma4's router RMS-normalises its input and scales it by scale / sqrt(hidden): with norm-like
# scales (~1) its tiny logits are near-ties (a top-level quantization flips an expert); scaled
# up, routing is as decisive as the other families' (family -> (tensor suffix, factor)).
SCALED = {"gemma4_text": ("router.scale", 4.0), "gemma4": ("router.scale", 4.0)}
for _name in TEXT_CONFIGS:
    FAMILY_CONFIGS.setdefault(_name, {})


def auto_class(family: str):
    """transformers' auto class of ``family``'s checkpoints (multimodal: image-text-to-text)."""
    import transformers

    if family in TEXT_CONFIGS:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def make_config(family: str, **overrides):
    """The transformers config object of the tiny ``family`` checkpoint."""
    from transformers import AutoConfig

    if family in MLX_LM_CONFIGS:
        raise ValueError(f"{family}: transformers lacks this family; make_checkpoint builds it "
                         "with mlx-lm's classes")
    if family not in FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if family in TEXT_CONFIGS:  # multimodal: text part in text_config, a tiny vision tower
        text = {**_COMMON, **TEXT_CONFIGS[family], **overrides}
        return AutoConfig.for_model(family, text_config=text, vision_config=VISION_CONFIGS.get(family, {}),
                                    tie_word_embeddings=text["tie_word_embeddings"],
                                    **TOP_CONFIGS.get(family, {}))
    kwargs = {**_COMMON, **FAMILY_CONFIGS[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def randomize_(model, seed: int = 0, buffers: bool = False, positive_bias: bool = False) -> None:
    """Re-draw every parameter so activations and routing are far from uniform."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            if "embed_tokens" in name:
                std, mean = 1.0, 0.0
            elif leaf in ("sinks", "e_score_correction_bias") or leaf.endswith("bias"):
                std, mean = 0.1, 0.0
            elif p.ndim == 1:  # norm weights
                std, mean = 0.1, 1.0
            elif any(r in name for r in (".gate.", ".router.", "shared_expert_gate")):
                std, mean = 0.5, 0.0  # decisive, varied routing
            else:
                std, mean = 0.08, 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * std + mean)
        for name, b in sorted(model.named_buffers()) if buffers else ():
            if name.endswith("e_score_correction_bias"):  # score-correction biases kept as buffers
                bias = torch.randn(b.shape, generator=gen) * 0.1
                b.copy_(bias.abs() if positive_bias else bias)


# Families transformers does not list under AutoModelForCausalLM.
CAUSAL_LM_CLASSES = {"mistral4": "Mistral4ForCausalLM"}


def causal_lm_class(family: str):
    """transformers' model class of ``family``'s checkpoints: its own causal-LM class where
    the auto class lacks it, image-text-to-text for multimodal ones, else the causal-LM auto class."""
    import transformers

    if family in CAUSAL_LM_CLASSES:
        return getattr(transformers, CAUSAL_LM_CLASSES[family])
    return auto_class(family)


def randomize_mlx_(model, seed: int = 0) -> None:
    """:func:`randomize_` for an mlx-lm model (same spreads, numpy's generator)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    new = []
    for name, p in sorted(tree_flatten(model.parameters())):
        leaf = name.rsplit(".", 1)[-1]
        if "embed_tokens" in name:
            std, mean = 1.0, 0.0
        elif leaf in ("sinks", "e_score_correction_bias") or leaf.endswith("bias"):
            std, mean = 0.1, 0.0
        elif p.ndim == 1:  # norm weights
            std, mean = 0.1, 1.0
        elif any(r in name for r in (".gate.", ".router.", "shared_expert_gate")):
            std, mean = 0.5, 0.0
        else:
            std, mean = 0.08, 0.0
        new.append((name, mx.array(rng.normal(mean, std, p.shape).astype(np.float32))))
    model.load_weights(new, strict=True)


def make_mlx_lm_checkpoint(family: str, out_dir: Path, seed: int = 0, *, tokenizer: bool = True,
                           **overrides) -> Path:
    """Write a tiny random float32 checkpoint of ``family`` built and saved by mlx-lm
    (``family@variant``: another checkpoint kind of the model_type ``family``)."""
    from mlx_lm.utils import _get_classes, save_config, save_model

    cfg = {**_COMMON, "model_type": family.split("@")[0], **MLX_LM_CONFIGS[family], **overrides}
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    randomize_mlx_(model, seed)
    out_dir = Path(out_dir)
    save_model(out_dir, model)
    save_config(cfg, out_dir / "config.json")
    if tokenizer and cfg["vocab_size"] >= 256:
        write_byte_tokenizer(out_dir)
    return out_dir


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-in for each byte (what ByteLevel BPE vocabularies use).
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))


def write_byte_tokenizer(out_dir: Path) -> None:
    """A 256-token byte-level tokenizer (token id = byte value, no merges);
    bos/eos/pad are bytes 1/2/0, matching the configs' token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=b2u[1], eos_token=b2u[2], pad_token=b2u[0])
    fast.save_pretrained(out_dir)


# Tensor names transformers' original-format save gets wrong, put back to the hub's:
# kimi_k25's vision rename blocks -> layers, reversed on save, hits the text layers too.
HUB_NAMES = {"kimi_k25": ((r"^language_model\.model\.blocks\.", "language_model.model.layers."),)}


def rename_saved(out_dir: Path, renames) -> None:
    """Rename tensors of the safetensors files in ``out_dir`` (regex, replacement), index included."""
    import re

    from safetensors.numpy import load_file, save_file

    def new(name: str) -> str:
        for pattern, repl in renames:
            name = re.sub(pattern, repl, name)
        return name

    for f in sorted(Path(out_dir).glob("*.safetensors")):
        save_file({new(k): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    index = Path(out_dir) / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {new(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def make_checkpoint(
    family: str,
    out_dir: Path,
    seed: int = 0,
    *,
    max_shard_size: str | int | None = None,
    fused_experts: bool = False,
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """Write a tiny random float32 HF checkpoint of ``family`` to ``out_dir``.

    ``overrides`` replace config fields. ``max_shard_size`` (e.g. "200KB") is
    passed to ``save_pretrained`` to get a multi-shard checkpoint.
    ``fused_experts=True`` saves transformers-5's in-memory expert layout
    (``experts.gate_up_proj`` / ``experts.down_proj``) instead of the original
    per-expert hub layout. ``tokenizer`` adds a byte-level tokenizer (when the
    vocabulary has >= 256 ids). Returns ``out_dir``.
    """
    if family in MLX_LM_CONFIGS:
        if fused_experts or max_shard_size is not None:
            raise ValueError(f"{family}: an mlx-lm-saved checkpoint has one layout")
        return make_mlx_lm_checkpoint(family, out_dir, seed, tokenizer=tokenizer, **overrides)
    import torch

    torch.manual_seed(seed)
    config = make_config(family, **overrides)
    cls = causal_lm_class(family)
    model = cls.from_config(config, dtype=torch.float32) if hasattr(cls, "from_config") \
        else cls._from_config(config, dtype=torch.float32)
    # Score-correction biases are buffers in transformers: re-drawn for every family, so a
    # dropped bias changes the routing (nemotron_h's kept positive: see POSITIVE_BIAS).
    randomize_(model, seed, buffers=True, positive_bias=family in POSITIVE_BIAS)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith(ZEROED.get(family, ())):
                p.zero_()
            if family in SCALED and name.endswith(SCALED[family][0]):
                p.mul_(SCALED[family][1])
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"safe_serialization": True, "save_original_format": not fused_experts}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    if not fused_experts and family in HUB_NAMES:
        rename_saved(out_dir, HUB_NAMES[family])
    if tokenizer and config.get_text_config().vocab_size >= 256:
        write_byte_tokenizer(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("family", nargs="?", help=f"one of: {', '.join(FAMILIES)}")
    p.add_argument("out", type=Path)
    p.add_argument("--all", action="store_true", help="every family, in OUT/<family>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default=None)
    p.add_argument("--fused-experts", action="store_true")
    p.add_argument("--no-tokenizer", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="config override, e.g. --set num_hidden_layers=3")
    args = p.parse_args(argv)
    if args.all == bool(args.family):
        p.error("give either FAMILY or --all")
    overrides = {}
    for item in args.set:
        k, v = item.split("=", 1)
        overrides[k] = json.loads(v)
    families = FAMILIES if args.all else (args.family,)
    for fam in families:
        out = args.out / fam if args.all else args.out
        make_checkpoint(fam, out, args.seed, max_shard_size=args.max_shard_size,
                        fused_experts=args.fused_experts, tokenizer=not args.no_tokenizer, **overrides)
        print(f"{fam}: {out}")


if __name__ == "__main__":
    main()
