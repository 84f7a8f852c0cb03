"""Family-specific fixes applied while normalising a Hugging Face checkpoint for mlx-lm.

Each fix is named in its family's entry (:mod:`.registry`) and called by
``d2moe_mlx.convert.hf_config``; they are the only places a family's quirks live.
"""

from __future__ import annotations

import re

import mlx.core as mx


def qwen3_config(cfg: dict) -> None:
    """qwen3_moe: mlx-lm needs head_dim and mlp_only_layers spelled out."""
    if cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("mlp_only_layers") is None:
        cfg["mlp_only_layers"] = []


def gpt_oss_config(cfg: dict) -> None:
    """gpt_oss: alternating sliding/full attention when config.json does not list it."""
    if cfg.get("layer_types") is None:
        n = cfg.get("num_hidden_layers", 0)
        cfg["layer_types"] = ["sliding_attention", "full_attention"] * (n // 2)


def deepseek_v2_config(cfg: dict) -> None:
    """deepseek_v2: mlx-lm always builds a yarn rope from rope_scaling; factor 1 is plain rope."""
    rs = cfg.get("rope_scaling")
    if rs is None or rs.get("rope_type", rs.get("type")) == "default":
        cfg["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": 1.0}


def phimoe_weights(config: dict, w: dict[str, mx.array]) -> None:
    """phimoe: mlx-lm's model always has attention and lm_head biases (zeros if absent)."""
    for k in list(w):
        if re.search(r"(self_attn\.[qkvo]_proj|^lm_head)\.weight$", k):
            b = k[: -len("weight")] + "bias"
            if b not in w:
                w[b] = mx.zeros((w[k].shape[0],), dtype=w[k].dtype)


# fam2 ---------------------------------------------------------------------------


def _attention_interval(cfg: dict) -> None:
    """mlx-lm builds a full-attention layer every ``full_attention_interval`` layers;
    transformers lists ``layer_types``: derive the interval, refuse a pattern it cannot say."""
    types = cfg.get("layer_types")
    if not types:
        return
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    interval = full[0] + 1 if full else len(types) + 1
    want = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(len(types))]
    if types != want:
        raise ValueError(f"{cfg.get('model_type')}: layer_types {types} is not one full-attention "
                         "layer every N layers, the only pattern mlx-lm's model builds")
    cfg["full_attention_interval"] = interval


def qwen3_next_config(cfg: dict) -> None:
    """qwen3_next: head_dim, mlp_only_layers and the attention pattern spelled out."""
    qwen3_config(cfg)
    _attention_interval(cfg)
    cfg.setdefault("partial_rotary_factor", 0.25)


def qwen3_5_moe_config(cfg: dict) -> None:
    """qwen3_5_moe: the text part is ``text_config``; its attention pattern as an interval.
    mlx-lm reads rope from ``text_config.rope_parameters`` (transformers' spelling)."""
    text = cfg.get("text_config")
    if text is None:  # a text-only config (qwen3_5_moe_text): mlx-lm reads it whole
        text = cfg
    _attention_interval(text)


_QWEN3_NEXT_NORMS = re.compile(
    r"((input|post_attention)_layernorm|self_attn\.[qk]_norm)\.weight$|^model\.(language_model\.)?norm\.weight$")


def qwen3_next_weights(config: dict, w: dict[str, mx.array]) -> None:
    """qwen3_next / qwen3_5_moe: transformers' RMSNorms scale by (1 + weight), mlx-lm's by
    weight; the conv1d of the linear attention is [C, 1, K] in torch, [C, K, 1] in mlx.
    mlx-lm's sanitize does both only when it sees per-expert (qwen3_next) or torch conv
    (qwen3_5) tensors in the same call, which a layer-by-layer conversion does not give
    it; here they are done per tensor, and sanitize then leaves them alone."""
    for k in list(w):
        v = w[k]
        if "conv1d.weight" in k and v.ndim == 3 and v.shape[-1] != 1:
            w[k] = v.moveaxis(2, 1)
        elif _QWEN3_NEXT_NORMS.search(k) and v.ndim == 1:
            w[k] = v + 1.0


def minimax_m2_config(cfg: dict) -> None:
    """minimax_m2: mlx-lm's ModelArgs needs ``rotary_dim`` (transformers 5 writes
    ``partial_rotary_factor``) and ``shared_intermediate_size`` (unused: no shared expert)."""
    if cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("rotary_dim") is None:
        cfg["rotary_dim"] = int(cfg["head_dim"] * (cfg.get("partial_rotary_factor") or 1.0))
    cfg.setdefault("shared_intermediate_size", 0)


def lfm2_moe_config(cfg: dict) -> None:
    """lfm2_moe: mlx-lm derives the attention layers from ``layer_types`` (transformers'
    default: ``full_attn_idxs``, else every layer a short convolution)."""
    if cfg.get("layer_types") is None:
        full = set(cfg.get("full_attn_idxs") or [])
        cfg["layer_types"] = ["full_attention" if i in full else "conv"
                              for i in range(cfg["num_hidden_layers"])]


def jamba_config(cfg: dict) -> None:
    """jamba: transformers puts experts where ``i % period == offset``, mlx-lm where
    ``(i + offset) % period == 0``; the same layers only when ``2 * offset % period == 0``
    (every released Jamba: period 2, offset 1)."""
    period, offset = cfg.get("expert_layer_period", 2), cfg.get("expert_layer_offset", 1)
    if (2 * offset) % period:
        raise ValueError(f"jamba: expert_layer_offset={offset} with expert_layer_period={period} "
                         "puts the experts in other layers in mlx-lm's model than in transformers'")


def granitemoehybrid_config(cfg: dict) -> None:
    """granitemoehybrid: mlx-lm names the layer kinds ``mamba`` / ``attention``
    (transformers 5: ``linear_attention`` / ``full_attention``)."""
    names = {"linear_attention": "mamba", "full_attention": "attention"}
    if cfg.get("layer_types"):
        cfg["layer_types"] = [names.get(t, t) for t in cfg["layer_types"]]
    _json_floats(cfg, "time_step_limit")


def _json_floats(cfg: dict, key: str) -> None:
    """transformers 5 writes infinities as ``{"__float__": "Infinity"}``: back to floats."""
    value = cfg.get(key)
    if isinstance(value, list):
        cfg[key] = [float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else v
                    for v in value]


def nemotron_h_config(cfg: dict) -> None:
    """nemotron_h: JSON infinities back to floats; a latent MoE (experts on a projection of
    the router's input) is refused: d2moe's score policies read the router from the
    experts' input."""
    _json_floats(cfg, "time_step_limit")
    if cfg.get("moe_latent_size") is not None:
        raise ValueError("nemotron_h: moe_latent_size is set (a latent MoE); d2moe-mlx supports "
                         "Nemotron-H MoE layers whose experts see the router's input")


def mellum_config(cfg: dict) -> None:
    """mellum: mlx-lm builds an MoE block in every layer; refuse dense MLP layers."""
    kinds = set(cfg.get("mlp_layer_types") or ["sparse"])
    if kinds != {"sparse"}:
        raise ValueError(f"mellum: mlp_layer_types {sorted(kinds)}: mlx-lm's mellum model "
                         "has an MoE block in every layer")


def head_dim_config(cfg: dict) -> None:
    """mlx-lm needs head_dim spelled out (transformers derives it from hidden_size)."""
    if cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]


def full_attention_only(cfg: dict) -> None:
    """Families whose mlx-lm model has no sliding-window layers: refuse configs with some."""
    sliding = [i for i, t in enumerate(cfg.get("layer_types") or []) if t != "full_attention"]
    if sliding and cfg.get("use_sliding_window", True) and cfg.get("sliding_window"):
        raise ValueError(f"{cfg.get('model_type')}: layers {sliding} use sliding-window attention, "
                         "which mlx-lm's model does not implement")


def drop_correction_bias(config: dict, w: dict[str, mx.array]) -> None:
    """Families whose mlx-lm block has no score-correction bias (ernie4_5_moe's
    ``moe_statics``): drop it, warning when it is not zero (routing then differs)."""
    import warnings

    for k in [k for k in w if k.endswith("e_score_correction_bias")]:
        if mx.any(w.pop(k) != 0).item():
            warnings.warn(f"{config.get('model_type')}: {k} is not zero but mlx-lm's model "
                          "ignores it; expert choice can differ from transformers", stacklevel=2)


def dense_prefix_config(cfg: dict) -> None:
    """transformers 5 lists ``mlp_layer_types`` ("dense"/"sparse" per layer); mlx-lm's
    DeepSeek-like models read ``first_k_dense_replace``: the leading dense layers."""
    types = cfg.get("mlp_layer_types")
    if not types:
        return
    k = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    if any(t != "sparse" for t in types[k:]):
        raise ValueError(f"{cfg.get('model_type')}: mlp_layer_types {types} is not dense layers "
                         "followed by sparse ones, which is all mlx-lm's model can build")
    if cfg.get("first_k_dense_replace") is None:
        cfg["first_k_dense_replace"] = k
    elif cfg["first_k_dense_replace"] != k:
        raise ValueError(f"{cfg.get('model_type')}: first_k_dense_replace="
                         f"{cfg['first_k_dense_replace']} contradicts mlp_layer_types {types}")


def moe_layer_flags_config(cfg: dict) -> None:
    """exaone_moe: mlx-lm reads ``is_moe_layer`` (a flag per layer), transformers 5 writes
    ``mlp_layer_types``."""
    types = cfg.get("mlp_layer_types")
    if cfg.get("is_moe_layer") is None and types:
        cfg["is_moe_layer"] = [t == "sparse" for t in types]


def step3p5_weights(config: dict, w: dict[str, mx.array]) -> None:
    """step3p5: mlx-lm's sanitize renames hub tensors (``.moe.*``) and adds 1 to every norm
    weight when it sees them; the final norm comes in a part without ``.moe.`` names, so a
    part-by-part conversion would miss it: refuse hub-layout checkpoints."""
    hub = [k for k in w if ".moe." in k]
    if hub:
        raise ValueError(f"step3p5: hub-layout tensors ({hub[0]}, ...) are not supported yet: "
                         "convert the checkpoint with mlx_lm.convert first, then with d2moe")


def kimi_linear_config(cfg: dict) -> None:
    """kimi_linear: transformers 5 writes ``layer_types`` and ``linear_*`` keys, mlx-lm
    reads the hub's ``linear_attn_config`` (1-based KDA / full-attention layer lists)."""
    dense_prefix_config(cfg)
    types = cfg.get("layer_types")
    if cfg.get("linear_attn_config") is None and types:
        cfg["linear_attn_config"] = {
            "kda_layers": [i + 1 for i, t in enumerate(types) if t == "linear_attention"],
            "full_attn_layers": [i + 1 for i, t in enumerate(types) if t == "full_attention"],
            "head_dim": cfg.get("linear_head_dim"), "num_heads": cfg.get("linear_num_heads"),
            "short_conv_kernel_size": cfg.get("linear_conv_kernel_dim", 4)}


def kimi_linear_weights(config: dict, w: dict[str, mx.array]) -> None:
    """kimi_linear, transformers-5 module layout: one ``conv1d`` over q, k and v
    concatenated -> the hub's ``q_conv1d`` / ``k_conv1d`` / ``v_conv1d``."""
    for k in [k for k in w if k.endswith("self_attn.conv1d.weight")]:
        for name, part in zip("qkv", mx.split(w.pop(k), 3, axis=0)):
            w[k.replace(".conv1d.", f".{name}_conv1d.")] = part


def mimo_v2_flash_config(cfg: dict) -> None:
    """mimo_v2_flash: mlx-lm reads the hub's config (``hybrid_layer_pattern``,
    ``moe_layer_freq``, ``swa_*``); transformers 5 writes ``layer_types``,
    ``mlp_layer_types`` and rope per layer type, and builds sliding layers with twice
    the kv heads and attention sinks, a window of ``sliding_window_size + 1``."""
    types, mlp = cfg.get("layer_types"), cfg.get("mlp_layer_types")
    if cfg.get("hybrid_layer_pattern") is not None or not types or not mlp:
        return
    rope = cfg.get("rope_parameters") or {}
    full, swa = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    factors = {full.get("partial_rotary_factor", 0.334), swa.get("partial_rotary_factor", 0.334)}
    if len(factors) != 1:
        raise ValueError("mimo_v2_flash: mlx-lm's model has one partial_rotary_factor for both "
                         f"layer types, the config has {sorted(factors)}")
    cfg.update(
        hybrid_layer_pattern=[int(t == "sliding_attention") for t in types],
        moe_layer_freq=[int(t == "sparse") for t in mlp],
        add_swa_attention_sink_bias=True, add_full_attention_sink_bias=False,
        sliding_window_size=cfg["sliding_window"],  # mlx-lm's window counts the query too
        layernorm_epsilon=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=full.get("rope_theta", 5_000_000.0), swa_rope_theta=swa.get("rope_theta", 10_000.0),
        partial_rotary_factor=factors.pop(),
        swa_num_attention_heads=cfg["num_attention_heads"],
        swa_num_key_value_heads=2 * cfg["num_key_value_heads"],
        swa_head_dim=cfg.get("head_dim", 192), swa_v_head_dim=cfg.get("v_head_dim", 128))
    cfg.setdefault("n_shared_experts", None)
    cfg.setdefault("topk_method", "noaux_tc")
    cfg.setdefault("scoring_func", "sigmoid")
    cfg["rope_scaling"] = None


# <longcat>
def longcat_flash_config(cfg: dict) -> None:
    """longcat_flash: mlx-lm's ModelArgs needs what transformers hard-codes (MLA's q/kv
    LoRA scaling, always on; identity zero experts); ``num_layers`` counts decoder layers
    of two attention sublayers each, which d2moe's KV-cache budget counts as
    ``num_hidden_layers``."""
    cfg.setdefault("attention_method", "MLA")  # (mlx-lm reads it, uses none other)
    cfg.setdefault("zero_expert_type", "identity")
    cfg.setdefault("mla_scale_q_lora", True)
    cfg.setdefault("mla_scale_kv_lora", True)
    if cfg.get("num_layers") is None:  # (transformers' default: 28)
        cfg["num_layers"] = cfg["num_hidden_layers"] // 2 if cfg.get("num_hidden_layers") else 28
    cfg.setdefault("num_hidden_layers", 2 * cfg["num_layers"])
    cfg.setdefault("moe_intermediate_size", cfg["expert_ffn_hidden_size"])


_EXPERT_PROJ = re.compile(r"\.experts\.(\d+)\.\w+\.\w+$")


def longcat_flash_weights(config: dict, w: dict[str, mx.array]) -> None:
    """longcat_flash: transformers gives the zero (identity) experts gate/up tensors it
    never uses (per expert in the hub layout, rows of the fused ``gate_up_proj``); mlx-lm's
    model has the routed experts only, so the others are dropped."""
    n = config.get("n_routed_experts", 512)
    for k in list(w):
        m = _EXPERT_PROJ.search(k)
        if m and int(m.group(1)) >= n:
            del w[k]
        elif re.search(r"\.switch_mlp\.(gate|up)_proj\.weight$", k) and w[k].shape[0] > n:
            w[k] = w[k][:n]


def hunyuan_config(cfg: dict) -> None:
    """hunyuan: the hub's configs list top-k, expert width and shared experts per layer;
    d2moe's gating and budgets take one value: equal lists become it, others are refused.
    mlx-lm's attention derives head_dim from hidden_size: another one is refused."""
    for key in ("moe_topk", "moe_intermediate_size", "num_shared_expert"):
        value = cfg.get(key)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ValueError(f"hunyuan: {key}={value} differs between layers; d2moe-mlx "
                                 "runs one value for every layer")
            cfg[key] = value[0]
    head_dim = cfg.get("attention_head_dim")
    if head_dim is not None and head_dim != cfg["hidden_size"] // cfg["num_attention_heads"]:
        raise ValueError(f"hunyuan: attention_head_dim={head_dim} but mlx-lm's model uses "
                         "hidden_size // num_attention_heads")
