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
    # fam1
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
    # <longcat> two decoder layers of two attention sublayers each; 4 zero experts among 12,
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
# fam1: families transformers lacks (hub checkpoints ship remote code): tiny random
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
    # <longcat> shared MLP mixed in (use_mixed_mlp_moe), QK norm, NTK-alpha rope; per-layer
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
}
HF_FAMILIES = tuple(f for f in FAMILIES if f not in MLX_LM_CONFIGS)  # transformers builds these

# Tensors mlx-lm's model ignores (docs/FAMILIES.md): kept at zero in the test
# checkpoints so that transformers parity measures everything else.
ZEROED = {"ernie4_5_moe": ("e_score_correction_bias",)}

# fam2 ---------------------------------------------------------------------------
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
VISION_CONFIGS: dict[str, dict] = {
    "qwen3_5_moe": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                        patch_size=4, temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16),
}
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
                                    tie_word_embeddings=text["tie_word_embeddings"])
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


# Families transformers does not list under AutoModelForCausalLM (fam1).
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
    """Write a tiny random float32 checkpoint of ``family`` built and saved by mlx-lm."""
    from mlx_lm.utils import _get_classes, save_config, save_model

    cfg = {**_COMMON, "model_type": family, **MLX_LM_CONFIGS[family], **overrides}
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
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"safe_serialization": True, "save_original_format": not fused_experts}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
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
