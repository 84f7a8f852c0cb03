"""The supported families, one adapter each (see :class:`d2moe_mlx.families.Family`).

``hf_defaults``: transformers' config-class defaults for fields mlx-lm's ModelArgs
reads with a different default (applied only when config.json lacks the field).
``mlx_lm_limits``: config values the HF model honours but mlx-lm's model ignores or
cannot run (field -> allowed values; a missing field counts as allowed).
``renames``: transformers-5 module names (``save_original_format=False``) -> hub names.
"""

from __future__ import annotations

from . import Family
from . import fixes

_QWEN = dict(block="mlp", router="gate", experts="switch_mlp", expert_count_key="num_experts")
_DEEPSEEK = dict(block="mlp", router="gate", experts="switch_mlp", shared=("shared_experts",),
                 expert_count_key="n_routed_experts")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("mixtral", block="block_sparse_moe", rule="topk_softmax",
           hf_defaults={"rope_theta": 1e6}, mlx_lm_limits={"sliding_window": (None,)},
           renames=((r"\.mlp\.", ".block_sparse_moe."),), stack_here=True),
    Family("qwen2_moe", shared=("shared_expert",), **_QWEN,
           hf_defaults={"rope_theta": 10000.0},
           mlx_lm_limits={"norm_topk_prob": (False, None), "use_sliding_window": (False, None)},
           stack_here=True),
    Family("qwen3_moe", **_QWEN,
           hf_defaults={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False,
                        "tie_word_embeddings": False, "rope_theta": 10000.0,
                        "max_position_embeddings": 32768},
           mlx_lm_limits={"use_sliding_window": (False, None)}, config_fix=fixes.qwen3_config),
    Family("olmoe", **_QWEN, hf_defaults={"tie_word_embeddings": False},
           mlx_lm_limits={"clip_qkv": (None,)}, stack_here=True),
    Family("deepseek_v2", rule="deepseek_v2", **_DEEPSEEK,
           hf_defaults={"topk_method": "greedy", "n_shared_experts": 2, "n_routed_experts": 64},
           mlx_lm_limits={"norm_topk_prob": (False, None)}, config_fix=fixes.deepseek_v2_config),
    Family("deepseek_v3", rule="deepseek_v3", correction_bias="e_score_correction_bias", **_DEEPSEEK,
           hf_defaults={"routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
                        "num_experts_per_tok": 8, "first_k_dense_replace": 3,
                        "n_shared_experts": 1, "n_routed_experts": 256},
           mlx_lm_limits={"rope_interleave": (True, None), "topk_method": ("noaux_tc", None),
                          "scoring_func": ("sigmoid", None)}),
    Family("gpt_oss", block="mlp", router="router", experts="experts", rule="topk_softmax",
           hf_defaults={"rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 32.0,
                                         "beta_fast": 32.0, "beta_slow": 1.0,
                                         "original_max_position_embeddings": 4096}},
           mlx_lm_limits={"swiglu_alpha": (1.702, None), "swiglu_limit": (7.0, None)},
           fused_layout="interleaved", hidden_acts=None, config_fix=fixes.gpt_oss_config),
    Family("granitemoe", block="block_sparse_moe", router="router", rule="topk_softmax",
           hf_defaults={"tie_word_embeddings": False},
           renames=((r"block_sparse_moe\.router\.weight$", "block_sparse_moe.router.layer.weight"),
                    (r"block_sparse_moe\.input_linear\.weight$", "block_sparse_moe.experts.gate_up_proj"),
                    (r"block_sparse_moe\.output_linear\.weight$", "block_sparse_moe.experts.down_proj"))),
    Family("phimoe", block="block_sparse_moe", rule="sparsemixer",
           hf_defaults={"rope_theta": 1e6, "rms_norm_eps": 1e-5},
           mlx_lm_limits={"sliding_window": (None,), "input_jitter_noise": (0, 0.0, None)},
           renames=((r"\.mlp\.router\.", ".block_sparse_moe.gate."), (r"\.mlp\.", ".block_sparse_moe.")),
           stack_here=True, weights_fix=fixes.phimoe_weights),
    # fam1
    Family("glm4_moe", rule="deepseek_v3", correction_bias="e_score_correction_bias", **_DEEPSEEK,
           hf_defaults={"routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                        "first_k_dense_replace": 1, "norm_topk_prob": True, "use_qk_norm": False,
                        "attention_bias": False, "partial_rotary_factor": 0.5,
                        "n_shared_experts": 1, "n_routed_experts": 128},
           mlx_lm_limits={"topk_method": ("noaux_tc", None), "scoring_func": ("sigmoid", None)},
           config_fix=fixes.head_dim_config),
    Family("dots1", experts="experts", rule="deepseek_v3",
           correction_bias="e_score_correction_bias", shared=("shared_experts",),
           expert_count_key="n_routed_experts",
           hf_defaults={"first_k_dense_replace": 0, "norm_topk_prob": False, "n_group": 1,
                        "topk_group": 1, "routed_scaling_factor": 1.0},
           stack_here=True, config_fix=fixes.full_attention_only),
    Family("mistral4", rule="mistral4", **_DEEPSEEK,
           hf_defaults={"n_shared_experts": 1, "n_routed_experts": 128, "routed_scaling_factor": 1.0,
                        "n_group": 1, "topk_group": 1, "num_experts_per_tok": 4,
                        "first_k_dense_replace": 0, "norm_topk_prob": True,
                        "rope_interleave": True}),
    Family("glm4_moe_lite", rule="deepseek_v3", correction_bias="e_score_correction_bias",
           **_DEEPSEEK,
           hf_defaults={"n_shared_experts": 1, "n_routed_experts": 64, "routed_scaling_factor": 1.8,
                        "n_group": 1, "topk_group": 1, "num_experts_per_tok": 4,
                        "norm_topk_prob": True, "rope_theta": 10000.0},
           mlx_lm_limits={"topk_method": ("noaux_tc", None), "scoring_func": ("sigmoid", None),
                          "rope_interleave": (True, None)},
           config_fix=fixes.dense_prefix_config),
    Family("deepseek_v32", rule="deepseek_v3", correction_bias="e_score_correction_bias",
           **_DEEPSEEK,
           hf_defaults={"routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
                        "num_experts_per_tok": 8, "n_shared_experts": 1, "n_routed_experts": 256,
                        "q_lora_rank": 1536, "index_topk": 2048},
           mlx_lm_limits={"topk_method": ("noaux_tc", None), "scoring_func": ("sigmoid", None)},
           config_fix=fixes.dense_prefix_config),
    Family("deepseek", shared=("shared_experts",), expert_count_key="n_routed_experts",
           mlx_lm_limits={"norm_topk_prob": (False, None), "scoring_func": ("softmax", None)},
           hub_remote_code=True, verified="mlx-lm"),
    Family("ernie4_5_moe", expert_count_key="moe_num_experts", shared=("shared_experts",),
           gating_keys={"top_k": "moe_k"}, gating_const={"norm_topk": True},
           hf_defaults={"moe_layer_start_index": 1, "moe_layer_end_index": 27,
                        "moe_layer_interval": 1, "moe_k": 6, "moe_num_shared_experts": 2,
                        "use_bias": False, "tie_word_embeddings": True, "rope_theta": 500000.0},
           mlx_lm_limits={"moe_gate_act": ("softmax", None), "use_bias": (False, None)},
           stack_here=True, config_fix=fixes.ernie_config, weights_fix=fixes.drop_correction_bias,
           notes="mlx-lm ignores the router's score-correction bias (moe_statics), which "
                 "transformers adds before the top-k: expert choice can differ"),
)}
