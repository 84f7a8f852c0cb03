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
