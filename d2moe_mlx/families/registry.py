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

_GRANITE_RENAMES = ((r"block_sparse_moe\.router\.weight$", "block_sparse_moe.router.layer.weight"),
                    (r"block_sparse_moe\.input_linear\.weight$", "block_sparse_moe.experts.gate_up_proj"),
                    (r"block_sparse_moe\.output_linear\.weight$", "block_sparse_moe.experts.down_proj"))

# <gemma>: the decoder layer is the block: its router reads the residual stream, its experts
# (experts.switch_glu) a normed copy, so the router's logits are tapped at router.proj.
_GEMMA4_NOTES = ("the router reads the decoder layer's residual, the experts a normed copy: "
                 "router logits are read where the layer computes them (router.proj)")
_GEMMA4 = dict(block="", router="router", experts="experts.switch_glu", rule="topk_softmax",
               router_tap="router.proj", expert_scale="router.per_expert_scale",
               expert_count_key="num_experts", gating_keys={"top_k": "top_k_experts"},
               hidden_acts=None, layer_outputs=3, config_fix=fixes.gemma4_config)

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
           hf_defaults={"tie_word_embeddings": False}, renames=_GRANITE_RENAMES),
    Family("phimoe", block="block_sparse_moe", rule="sparsemixer",
           hf_defaults={"rope_theta": 1e6, "rms_norm_eps": 1e-5},
           mlx_lm_limits={"sliding_window": (None,), "input_jitter_noise": (0, 0.0, None)},
           renames=((r"\.mlp\.router\.", ".block_sparse_moe.gate."), (r"\.mlp\.", ".block_sparse_moe.")),
           stack_here=True, weights_fix=fixes.phimoe_weights),
    # fam2
    Family("qwen3_next", shared=("shared_expert",), **_QWEN,
           hf_defaults={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                        "rope_theta": 10000.0},
           stack_here=True, config_fix=fixes.qwen3_next_config,
           weights_fix=fixes.qwen3_next_weights, drop=((r"^mtp\.", "MTP (next-token prediction) layers"),)),
    Family("qwen3_5_moe", shared=("shared_expert",), **_QWEN, stack_here=True,
           config_fix=fixes.qwen3_5_moe_config, weights_fix=fixes.qwen3_next_weights,
           drop=((r"^mtp\.", "MTP (next-token prediction) layers"),
                 (r"^(model\.visual|vision_tower)\.", "vision tower")),
           notes="multimodal checkpoints: the text model converts, the vision tower and MTP "
                 "layers are dropped with a message"),
    Family("minimax_m2", block="block_sparse_moe", rule="sigmoid_bias_norm",
           correction_bias="e_score_correction_bias", stack_here=True,
           hf_defaults={"use_qk_norm": True}, mlx_lm_limits={"scoring_func": ("sigmoid", None)},
           renames=((r"\.mlp\.", ".block_sparse_moe."),), config_fix=fixes.minimax_m2_config),
    Family("lfm2_moe", block="feed_forward", rule="sigmoid_bias", correction_bias="expert_bias",
           expert_count_key="num_experts", stack_here=True,
           hf_defaults={"num_dense_layers": 2, "use_expert_bias": True, "norm_topk_prob": True,
                        "conv_bias": False, "conv_L_cache": 3, "norm_eps": 1e-5,
                        "tie_word_embeddings": True},
           mlx_lm_limits={"tie_word_embeddings": (True, None)}, config_fix=fixes.lfm2_moe_config),
    Family("jamba", block="feed_forward", router="router", rule="topk_softmax",
           expert_count_key="num_experts", stack_here=True,
           hf_defaults={"tie_word_embeddings": False, "expert_layer_period": 2, "expert_layer_offset": 1,
                        "attn_layer_period": 8, "attn_layer_offset": 4, "mamba_d_state": 16,
                        "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 256},
           config_fix=fixes.jamba_config,
           notes="mlx-lm renormalises the top-k router weights, transformers' Jamba router does "
                 "not: logits differ from transformers"),
    Family("granitemoehybrid", block="block_sparse_moe", router="router", rule="topk_softmax",
           shared=("shared_mlp",), hf_defaults={"tie_word_embeddings": False, "position_embedding_type": None},
           renames=_GRANITE_RENAMES, config_fix=fixes.granitemoehybrid_config),
    Family("nemotron_h", block="mixer", rule="deepseek_v3", correction_bias="e_score_correction_bias",
           shared=("shared_experts",), expert_count_key="n_routed_experts",
           hidden_acts=None, config_fix=fixes.nemotron_h_config,
           renames=((r"^model\.", "backbone."),
                    (r"mixer\.experts\.up_proj$", "mixer.switch_mlp.fc1.weight"),
                    (r"mixer\.experts\.down_proj$", "mixer.switch_mlp.fc2.weight")),
           drop=((r"^mtp\.", "MTP (next-token prediction) layers"),),
           notes="mlx-lm zeroes dropped groups' scores, transformers sets -inf: same experts "
                 "only while kept scores + bias > 0; latent MoE refused"),
    Family("mellum", **_QWEN, stack_here=True, config_fix=fixes.mellum_config,
           hf_defaults={"norm_topk_prob": True, "tie_word_embeddings": False},
           drop=((r"^(model\.)?mtp\.", "MTP (next-token prediction) layers"),)),
    # fam1
    Family("glm4_moe", rule="deepseek_v3", correction_bias="e_score_correction_bias", **_DEEPSEEK,
           hf_defaults={"routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                        "first_k_dense_replace": 1, "norm_topk_prob": True, "use_qk_norm": False,
                        "attention_bias": False, "partial_rotary_factor": 0.5,
                        "n_shared_experts": 1, "n_routed_experts": 128},
           mlx_lm_limits={"topk_method": ("noaux_tc", None), "scoring_func": ("sigmoid", None)},
           config_fix=fixes.head_dim_config,
           notes="MTP layers (num_nextn_predict_layers) dropped by mlx-lm's sanitize"),
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
           config_fix=fixes.dense_prefix_config,
           notes="MTP layers dropped; dense first layers read from mlp_layer_types"),
    Family("deepseek_v32", rule="deepseek_v3", correction_bias="e_score_correction_bias",
           **_DEEPSEEK,
           hf_defaults={"routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
                        "num_experts_per_tok": 8, "n_shared_experts": 1, "n_routed_experts": 256,
                        "q_lora_rank": 1536, "index_topk": 2048},
           mlx_lm_limits={"topk_method": ("noaux_tc", None), "scoring_func": ("sigmoid", None)},
           config_fix=fixes.dense_prefix_config,
           notes="sparse-attention indexer: ties among its ReLU'd scores are broken differently "
                 "from transformers (argpartition vs torch.topk)"),
    Family("exaone_moe", rule="deepseek_v3", correction_bias="e_score_correction_bias",
           shared=("shared_experts",), expert_count_key="num_experts",
           hf_defaults={"routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1,
                        "norm_topk_prob": True, "num_shared_experts": 1},
           mlx_lm_limits={"topk_method": ("noaux_tc", None), "scoring_func": ("sigmoid", None)},
           renames=((r"\.mlp\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias"),),
           stack_here=True, config_fix=fixes.moe_layer_flags_config,
           notes="MTP layers dropped; sliding-window layers"),
    Family("afmoe", router="router", experts="experts", shared=("shared_experts",),
           rule="deepseek_v3", correction_bias="expert_bias", correction_on_block=True,
           expert_count_key="num_experts",
           gating_keys={"norm_topk": "route_norm", "scaling": "route_scale"},
           hf_defaults={"mup_enabled": False, "route_norm": True, "n_group": 1, "topk_group": 1,
                        "num_dense_layers": 1, "num_shared_experts": 2, "route_scale": 1.0},
           mlx_lm_limits={"score_func": ("sigmoid", None)}, stack_here=True,
           notes="sliding-window layers; muP input scaling"),
    Family("laguna", shared=("shared_expert",), rule="deepseek_v3",
           correction_bias="e_score_correction_bias", expert_count_key="num_experts",
           gating_keys={"scaling": "moe_routed_scaling_factor",
                        "softcap": "moe_router_logit_softcapping"},
           gating_const={"norm_topk": True, "n_group": 1, "topk_group": 1},
           mlx_lm_limits={"moe_router_score_func": ("sigmoid", None),
                          "moe_apply_router_weight_on_input": (False, None)},
           renames=((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),)),
    Family("kimi_linear", shared=("shared_experts",), rule="deepseek_v3",
           correction_bias="e_score_correction_bias", correction_on_block=True,
           expert_count_key="num_experts",
           gating_keys={"top_k": "num_experts_per_token", "norm_topk": "moe_renormalize",
                        "n_group": "num_expert_group"},
           hf_defaults={"num_experts_per_token": 8, "moe_renormalize": True,
                        "routed_scaling_factor": 2.446, "num_expert_group": 1, "topk_group": 1,
                        "num_shared_experts": 1, "moe_layer_freq": 1},
           mlx_lm_limits={"moe_router_activation_func": ("sigmoid", None)},
           renames=((r"\.(block_sparse_moe|mlp)\.gate\.e_score_correction_bias$",
                     ".mlp.e_score_correction_bias"), (r"\.block_sparse_moe\.", ".mlp."),
                    (r"\.self_attn\.forget_gate\.", ".self_attn.")),
           stack_here=True, sanitize_layer0=False, config_fix=fixes.kimi_linear_config,
           weights_fix=fixes.kimi_linear_weights,
           notes="hybrid stack: KDA linear-attention and MLA layers"),
    Family("mimo_v2_flash", rule="deepseek_v3", correction_bias="e_score_correction_bias",
           **_DEEPSEEK,
           hf_defaults={"routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                        "norm_topk_prob": True, "head_dim": 192, "v_head_dim": 128,
                        "sliding_window": 129, "attention_value_scale": 0.707},
           mlx_lm_limits={"topk_method": ("noaux_tc", None), "scoring_func": ("sigmoid", None)},
           renames=((r"\.self_attn\.sinks$", ".self_attn.attention_sink_bias"),),
           stack_here=True, config_fix=fixes.mimo_v2_flash_config,
           notes="sliding-window layers with attention sinks; transformers-5 config translated "
                 "to the hub's names mlx-lm reads"),
    Family("deepseek", shared=("shared_experts",), expert_count_key="n_routed_experts",
           mlx_lm_limits={"norm_topk_prob": (False, None), "scoring_func": ("softmax", None)},
           hub_remote_code=True, verified="mlx-lm"),
    Family("Klear", experts="experts", shared=("shared_experts",), rule="deepseek_v3",
           correction_bias="expert_bias", correction_on_block=True, expert_count_key="num_experts",
           scaled_output=True, stack_here=True, hub_remote_code=True, verified="mlx-lm",
           notes="the routed output is mixed with the shared expert by a per-token softmax "
                 "coefficient (outside the routing weights)"),
    Family("step3p5", shared=("share_expert",), rule="deepseek_v3", correction_bias="router_bias",
           expert_count_key="moe_num_experts",
           gating_keys={"top_k": "moe_top_k", "norm_topk": "norm_expert_weight",
                        "scaling": "moe_router_scaling_factor"},
           gating_const={"n_group": 1, "topk_group": 1},
           weights_fix=fixes.step3p5_weights, hub_remote_code=True, verified="mlx-lm",
           notes="hub-layout checkpoints (.moe.* names) refused: mlx_lm.convert them first"),
    Family("ernie4_5_moe", expert_count_key="moe_num_experts", shared=("shared_experts",),
           gating_keys={"top_k": "moe_k"}, gating_const={"norm_topk": True},
           hf_defaults={"moe_layer_start_index": 1, "moe_layer_end_index": 27,
                        "moe_layer_interval": 1, "moe_k": 6, "moe_num_shared_experts": 2,
                        "use_bias": False, "tie_word_embeddings": True, "rope_theta": 500000.0},
           mlx_lm_limits={"moe_gate_act": ("softmax", None), "use_bias": (False, None)},
           stack_here=True, weights_fix=fixes.drop_correction_bias,
           notes="mlx-lm ignores the router's score-correction bias (moe_statics), which "
                 "transformers adds before the top-k: expert choice can differ"),
    # <mm>
    Family("minimax_m3_vl", block="block_sparse_moe", shared=("shared_experts",),
           rule="sigmoid_bias_norm", correction_bias="e_score_correction_bias",
           correction_on_block=True, stack_here=True, hidden_acts=None,
           renames=((r"^model\.language_model\.", "language_model.model."),
                    (r"^lm_head\.", "language_model.lm_head."),
                    (r"\.mlp\.gate\.e_score_correction_bias$", ".block_sparse_moe.e_score_correction_bias"),
                    (r"\.mlp\.(experts|gate|shared_experts)\.", r".block_sparse_moe.\1."),
                    (r"\.self_attn\.indexer\.([qk])_(proj|norm)\.", r".self_attn.index_\1_\2.")),
           config_fix=fixes.minimax_m3_vl_config, weights_fix=fixes.minimax_m3_vl_weights,
           drop=((r"^(model\.)?(vision_tower|multi_modal_projector|patch_merge_mlp)\.",
                  "vision tower and projector"),
                 (r"(^|\.)mtp\.", "MTP (next-token prediction) layers")),
           notes="multimodal checkpoints: the text model converts, the vision tower and projector "
                 "are dropped with a message; sparse-attention (lightning indexer) layers; "
                 "rotary_dim read as transformers does (head_dim x partial_rotary_factor)"),
    # </mm>
    # <bailing>
    Family("bailing_moe", shared=("shared_experts",), rule="bailing_moe",
           correction_bias="expert_bias", expert_count_key="num_experts",
           gating_keys={"score_function": "score_function"}, sanitize_layer0=False,
           config_fix=fixes.bailing_norm_head_config, weights_fix=fixes.bailing_norm_head_weights,
           hub_remote_code=True, verified="mlx-lm",
           notes="dense first layers; norm_head (lm_head normalised) applied by the converter"),
    Family("bailing_moe_linear", shared=("shared_experts",), rule="bailing_moe_linear",
           correction_bias="expert_bias", expert_count_key="num_experts",
           gating_keys={"score_function": "score_function"}, sanitize_layer0=False,
           config_fix=fixes.bailing_norm_head_config, weights_fix=fixes.bailing_norm_head_weights,
           hub_remote_code=True, verified="mlx-lm",
           notes="hybrid stack: lightning linear-attention and full-attention layers"),
    Family("bailing_moe_v3", shared=("shared_experts",), rule="bailing_v3",
           correction_bias="expert_bias", expert_count_key="num_experts", sanitize_layer0=False,
           hub_remote_code=True, verified="mlx-lm",
           notes="hybrid stack: KDA linear-attention and gated MLA layers; MTP layers dropped "
                 "by mlx-lm's sanitize"),
    Family("bailing_hybrid", shared=("shared_experts",), rule="bailing_v3",
           correction_bias="expert_bias", expert_count_key="num_experts", sanitize_layer0=False,
           hf_defaults={"q_lora_rank": None, "layer_group_size": 6},
           mlx_lm_limits={"moe_renormalize": (True, None), "norm_topk_prob": (True, None),
                          "kda_safe_gate": (True, None), "score_function": ("sigmoid", None)},
           renames=((r"^model\.embed_tokens\.", "model.word_embeddings."),
                    (r"\.self_attn\.forget_gate\.", ".self_attn."),
                    (r"\.self_attn\.", ".attention."),
                    (r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.gate.expert_bias")),
           config_fix=fixes.bailing_hybrid_config, weights_fix=fixes.bailing_hybrid_weights,
           hub_remote_code=True,  # <ling>: Ling 2.5 checkpoints ship auto_map
           notes="Ling 3 (KDA + gated MLA), run by mlx-lm's bailing_moe_v3 module; mlx-lm sets "
                 "dropped groups' scores to -inf, transformers to 0: same experts while kept "
                 "scores + bias > 0; Ling 2.5 (lightning attention + MLA, other architectures) "
                 "run by mlx-lm's bailing_hybrid module, verified by mlx-lm, top-1 refused"),
    Family("phixtral", block="moe", experts="switch_mlp", rule="topk_softmax", hidden_acts=None,
           config_fix=fixes.phixtral_config, hub_remote_code=True, verified="mlx-lm",
           notes="phi-2 parallel blocks (attention and experts on one LayerNorm), GELU experts "
                 "with biases"),
    # <dsv41>
    Family("deepseek_v41", experts="experts.switch_mlp", rule="score_bias",
           correction_bias="e_score_correction_bias", shared=("shared_experts",),
           expert_count_key="n_routed_experts",
           gating_keys={"temperature": "gate_temp", "score_func": "scoring_func"}, carry=(0,),
           weights_fix=fixes.deepseek_v41_weights, hub_remote_code=True, verified="mlx-lm",
           notes="hyper-connection residual streams, compressed sparse attention; experts in "
                 "mlp.experts.switch_mlp; DeepSeek-layout (fp8/fp4) checkpoints refused: "
                 "mlx_lm.convert them first"),
    Family("kimi_k3", shared=("shared_experts",), rule="deepseek_v3",
           correction_bias="e_score_correction_bias", correction_on_block=True,
           expert_count_key="num_experts",
           gating_keys={"top_k": "num_experts_per_token", "norm_topk": "moe_renormalize",
                        "n_group": "num_expert_group"},
           hidden_acts=None, carry=("blocks",), sanitize_layer0=False,  # mlx-lm refuses non-SiTU
           config_fix=fixes.kimi_k3_config, hub_remote_code=True, verified="mlx-lm",
           drop=((r"^(model\.)?mtp\.", "MTP (next-token prediction) layers"),
                 (r"^(vision_tower|vision_model|multi_modal_projector|mm_projector)\.",
                  "vision tower")),
           notes="hybrid stack: KDA linear-attention and NoPE MLA layers, block attention "
                 "residuals (carried between layers); latent MoE refused"),
    Family("kimi_k25", rule="deepseek_v3", correction_bias="e_score_correction_bias", **_DEEPSEEK,
           config_fix=fixes.text_model_config("deepseek_v3"), hub_remote_code=True,
           renames=((r"^model\.language_model\.", "language_model.model."),
                    (r"^lm_head\.", "language_model.lm_head.")),
           drop=((r"^(model\.)?(vision_tower|vision_model|mm_projector|multi_modal_projector)\.",
                  "vision tower and projector"),),
           notes="multimodal wrapper of a DeepSeek-V3 text model: the text model converts, the "
                 "vision tower and projector are dropped with a message"),
    Family("kimi_vl", rule="deepseek_v3", correction_bias="e_score_correction_bias", **_DEEPSEEK,
           config_fix=fixes.text_model_config("deepseek_v3", normalize=False),
           weights_fix=fixes.kimi_vl_weights, hub_remote_code=True, verified="mlx-lm",
           drop=((r"^(vision_tower|multi_modal_projector)\.", "vision tower and projector"),),
           notes="multimodal wrapper of a DeepSeek-V3 text model (text_config read as written): "
                 "the vision tower is dropped; hub checkpoints with kv_b_proj refused (mlx-lm "
                 "reads only its own saved layout)"),
    # <gemma>
    Family("gemma4_text", **_GEMMA4, notes=_GEMMA4_NOTES),
    Family("gemma4", **_GEMMA4, mlx_lm_limits={"tie_word_embeddings": (True, None)},
           drop=((r"^model\.(vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector)\.",
                  "vision/audio towers"),),
           notes="multimodal checkpoints: the text model converts, the vision and audio towers "
                 "are dropped with a message; " + _GEMMA4_NOTES),
    Family("llama4", block="feed_forward", router="router", experts="experts", rule="topk_sigmoid",
           shared=("shared_expert",), router_tap="router", weights_on_input=True,
           config_fix=fixes.llama4_config,
           drop=((r"^(vision_model|multi_modal_projector)\.", "vision tower"),),
           notes="multimodal checkpoints: the text model converts, the vision tower is dropped "
                 "with a message; the experts run on x * sigmoid(score), so router logits are "
                 "read where the block computes them (its router); text-only llama4_text "
                 "checkpoints are not supported (mlx-lm's llama4_text is a dense model)"),
    # <longcat>
    Family("longcat_flash", router="router", rule="softmax_bias",
           correction_bias="e_score_correction_bias", expert_count_key="n_routed_experts",
           gating_keys={"top_k": "moe_topk", "routed": "n_routed_experts"},
           hf_defaults={"zero_expert_num": 256, "moe_topk": 12, "n_routed_experts": 512,
                        "routed_scaling_factor": 6.0, "expert_ffn_hidden_size": 2048,
                        "ffn_hidden_size": 12288, "q_lora_rank": 1536, "kv_lora_rank": 512,
                        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                        "attention_bias": False, "rope_theta": 10000000.0},
           mlx_lm_limits={"zero_expert_type": ("identity", None), "norm_topk_prob": (False, None)},
           config_fix=fixes.longcat_flash_config, weights_fix=fixes.longcat_flash_weights,
           drop=((r"^model\.mtp\.", "MTP (next-token prediction) layers"),),
           notes="zero (identity) experts: a token's top-k may name expert 0 several times "
                 "(zero picks, weight 0); policies see the routed experts' probabilities "
                 "renormalised among themselves; MTP layers dropped with a message"),
    Family("hunyuan", shared=("shared_mlp",), expert_count_key="num_experts",
           gating_keys={"top_k": "moe_topk"}, gating_const={"norm_topk": False},
           mlx_lm_limits={"use_cla": (False, None), "use_mla": (False, None),
                          "moe_drop_tokens": (False, None), "tie_word_embeddings": (True, None)},
           layer_outputs=2, config_fix=fixes.hunyuan_config, hub_remote_code=True, verified="mlx-lm",
           notes="mlx-lm does not renormalise the top-k weights, Tencent's reference code does: "
                 "routed outputs differ on real checkpoints"),
)}

# <longcat> model types refused by name, with the reason (get_family raises it)
REFUSED: dict[str, str] = {
    "hunyuan_v1_moe": (
        "transformers' HunYuan MoE V1 renormalises the top-k router weights; mlx-lm has no "
        "hunyuan_v1_moe model, and its hunyuan model does not renormalise them and reads other "
        "config keys (use_mixed_mlp_moe, use_cla, num_shared_expert), so the experts would run "
        "with other weights. Tencent's hub checkpoints (model_type 'hunyuan', e.g. "
        "tencent/Hunyuan-A13B-Instruct) are supported, with that difference from their "
        "reference code (docs/FAMILIES.md)"),
}
