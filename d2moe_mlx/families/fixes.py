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


def _text_config(cfg: dict, reads: str) -> dict:
    """A multimodal config's ``text_config``; ValueError where it has none (mlx-lm's
    wrapper model reads ``reads`` from it)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{cfg.get('model_type')}: config.json has no text_config; mlx-lm's "
                         f"model reads {reads} from it")
    return text


def minimax_m3_vl_config(cfg: dict) -> None:
    """minimax_m3_vl: transformers rotates ``head_dim * partial_rotary_factor`` channels
    and ignores ``rotary_dim`` (which it still writes, default 64); mlx-lm reads
    ``rotary_dim`` first. Spell it as transformers computes it. The indexer's rope is
    the attention rope cut to ``index_head_dim``: mlx-lm's equals it only when the
    index head holds every rotated channel."""
    text = _text_config(cfg, "the text model's fields")  # a text-only config is refused
    rope = text.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", text.get("partial_rotary_factor"))
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if factor is not None:
        text["rotary_dim"] = int(head_dim * factor)
    hub = text.get("sparse_attention_config") or {}  # the hub's nested spelling
    sparse = [t for t in text.get("layer_types") or [] if t != "full_attention"] \
        or [f for f in hub.get("sparse_attention_freq") or [] if f]
    index_dim = text.get("index_head_dim", hub.get("sparse_index_dim"))
    rotary = text.get("rotary_dim") or head_dim
    if sparse and index_dim is not None and index_dim < rotary:
        raise ValueError(f"minimax_m3_vl: index_head_dim {index_dim} < rotary_dim {rotary}: "
                         "mlx-lm's indexer rope then differs from transformers'")
    for key in ("use_qk_norm", "use_gemma_norm"):  # mlx-lm's switches; transformers always does both
        if text.get(key) is False:
            raise ValueError(f"minimax_m3_vl: {key}=false, but transformers' model always uses "
                             "Gemma-style (1 + weight) RMSNorms with q/k norms; not supported")


_FUSED_GATE_UP = re.compile(r"\.(mlp|shared_experts)\.gate_up_proj\.weight$")


def minimax_m3_vl_weights(config: dict, w: dict[str, mx.array]) -> None:
    """minimax_m3_vl, transformers-5 module layout: the dense MLPs and shared experts
    hold one ``gate_up_proj`` Linear (gate rows first) -> mlx-lm's gate/up projections."""
    for k in [k for k in w if _FUSED_GATE_UP.search(k) and w[k].ndim == 2]:
        gate, up = mx.split(w.pop(k), 2, axis=0)
        w[k.replace(".gate_up_proj.", ".gate_proj.")] = gate
        w[k.replace(".gate_up_proj.", ".up_proj.")] = up


def bailing_norm_head_config(cfg: dict) -> None:
    """bailing_moe / bailing_moe_linear: mlx-lm's sanitize normalises ``lm_head`` when
    ``norm_head`` is set, and fails on any part of the checkpoint without it (a layer, in a
    layer-by-layer conversion); the converter's weights fix normalises it instead
    (:func:`bailing_norm_head_weights`), once, so the normalised config says ``norm_head``
    false and the converted ``lm_head`` is the normalised one."""
    if cfg.get("norm_head"):
        cfg["norm_head"] = False
        cfg["_d2moe_norm_head"] = True


def bailing_norm_head_weights(config: dict, w: dict[str, mx.array]) -> None:
    """Columns of ``lm_head`` divided by their norm (what mlx-lm's sanitize does under
    ``norm_head``), for a raw config that sets it; see :func:`bailing_norm_head_config`."""
    if (config.get("norm_head") or config.get("_d2moe_norm_head")) and "lm_head.weight" in w:
        v = w["lm_head.weight"]
        norm = mx.linalg.norm(v.astype(mx.float32), axis=0, keepdims=True) + 1e-7
        w["lm_head.weight"] = (v / norm).astype(v.dtype)


_PHIXTRAL_NAMES = (  # mlx-lm's ModelArgs name, the hub's (phi-msft), the common name d2moe reads
    ("model_dim", "n_embd", "hidden_size"), ("num_layers", "n_layer", "num_hidden_layers"),
    ("num_heads", "n_head", "num_attention_heads"), ("num_vocab", "vocab_size", "vocab_size"))


def phixtral_config(cfg: dict) -> None:
    """phixtral: mlx-lm's ModelArgs reads ``model_dim`` / ``num_layers`` / ``num_heads`` /
    ``num_vocab`` (else phi-2's sizes), hub configs write ``n_embd`` / ``n_layer`` /
    ``n_head`` / ``vocab_size``: mlx-lm's names from the hub's where missing, then the
    common names d2moe reads (budgets, calibration) from mlx-lm's."""
    for mlx_name, hub_name, common in _PHIXTRAL_NAMES:
        if cfg.get(mlx_name) is None and cfg.get(hub_name) is not None:
            cfg[mlx_name] = cfg[hub_name]
        if cfg.get(mlx_name) is None:
            raise ValueError(f"phixtral: the config has neither {mlx_name!r} nor {hub_name!r}")
        cfg[common] = cfg[mlx_name]
    cfg["num_key_value_heads"] = cfg["num_heads"]  # phi-2 attention: one kv head per head
    cfg["intermediate_size"] = 4 * cfg["model_dim"]  # mlx-lm's phixtral experts: 4 x model_dim


_BAILING_V3_ARCH = "BailingMoeV3ForCausalLM"  # mlx-lm runs it with its bailing_moe_v3 module


def _bailing_kda_layer(config: dict, layer: int) -> bool:
    """Whether mlx-lm's bailing_moe_v3 builds layer ``layer`` as KDA (else MLA)."""
    n, group = config["num_hidden_layers"], config.get("layer_group_size", 6)  # transformers' default
    return not ((layer + 1) % group == 0 or layer >= n // group * group)


def bailing_lightning(config: dict) -> bool:
    """Whether mlx-lm runs this bailing_hybrid checkpoint with its own ``bailing_hybrid``
    module (Ling 2.5: lightning linear attention + MLA; architectures
    ``BailingMoeV2_5ForCausalLM`` or none), as ``mlx_lm.utils._get_classes`` decides: only
    ``BailingMoeV3ForCausalLM`` is remapped to ``bailing_moe_v3``. transformers'
    ``BailingHybridForCausalLM`` (its only bailing_hybrid model) is Ling 3 (KDA), so d2moe
    runs it with ``bailing_moe_v3`` too."""
    arch = config.get("architectures") or ()
    return not set([arch] if isinstance(arch, str) else arch) & {_BAILING_V3_ARCH,
                                                                 "BailingHybridForCausalLM"}


def _bailing_lightning_config(cfg: dict) -> None:
    """Ling 2.5 (mlx-lm's bailing_hybrid module): mlx-lm reads the config as written. Its
    gate matches the family's rule (``bailing_v3``: sigmoid, dropped groups -inf, weights
    renormalised) while scores are sigmoid and renormalised (the family's limits) and more
    than one expert is picked (one expert keeps its raw score there): refused otherwise."""
    if (cfg.get("num_experts_per_tok") or 0) < 2:
        raise ValueError(f"bailing_hybrid: num_experts_per_tok={cfg.get('num_experts_per_tok')}; "
                         "d2moe-mlx runs lightning-attention bailing_hybrid models that route "
                         "each token to 2 or more experts (mlx-lm's gate does not renormalise "
                         "one expert's weight, the family's gating rule does)")


def bailing_hybrid_config(cfg: dict) -> None:
    """bailing_hybrid with KDA + MLA layers (Ling 3, transformers' BailingHybrid): mlx-lm
    runs it with its ``bailing_moe_v3`` module, chosen by the architecture
    ``BailingMoeV3ForCausalLM``; transformers 5 writes its own names for what that module
    reads. Other architectures run mlx-lm's own ``bailing_hybrid`` module (lightning
    linear attention + MLA, :func:`bailing_lightning`)."""
    if bailing_lightning(cfg):
        return _bailing_lightning_config(cfg)
    cfg["architectures"] = [_BAILING_V3_ARCH]
    for ours, theirs in (("num_experts_per_tok", "num_experts_per_token"),
                         ("n_group", "num_expert_group"), ("norm_topk_prob", "moe_renormalize"),
                         ("max_position_embeddings", "model_max_length"),
                         ("head_dim", "linear_head_dim")):
        if cfg.get(theirs) is not None:
            cfg[ours] = cfg[theirs]
    cfg.setdefault("moe_shared_expert_intermediate_size", cfg.get("moe_intermediate_size"))
    dense_prefix_config(cfg)
    want = ["linear_attention" if _bailing_kda_layer(cfg, i) else "full_attention"
            for i in range(cfg["num_hidden_layers"])]
    if cfg.get("layer_types") and cfg["layer_types"] != want:
        raise ValueError(f"bailing_hybrid: layer_types {cfg['layer_types']} is not the pattern "
                         f"mlx-lm builds from layer_group_size={cfg.get('layer_group_size', 6)} "
                         f"({want})")


_BAILING_OUT = re.compile(r"layers\.(\d+)\.attention\.(dense|o_proj)\.")


def bailing_hybrid_weights(config: dict, w: dict[str, mx.array]) -> None:
    """bailing_hybrid: transformers names every attention output ``o_proj`` (its hub
    format: ``dense``), mlx-lm's KDA layers ``o_proj`` and its MLA layers ``dense``; and
    transformers 5's module layout has one ``conv1d`` over q, k and v concatenated ->
    the hub's ``q_conv1d`` / ``k_conv1d`` / ``v_conv1d``. Lightning-attention checkpoints
    (mlx-lm's bailing_hybrid module reads their names as written) are left alone."""
    if bailing_lightning(config):
        return
    for k in list(w):
        m = _BAILING_OUT.search(k)
        if m:
            want = "o_proj" if _bailing_kda_layer(config, int(m.group(1))) else "dense"
            w[k[:m.start(2)] + want + k[m.end(2):]] = w.pop(k)
    for k in [k for k in w if k.endswith(".attention.conv1d.weight")]:
        for name, part in zip("qkv", mx.split(w.pop(k), 3, axis=0)):
            w[k.replace(".conv1d.", f".{name}_conv1d.")] = part


def deepseek_v41_weights(config: dict, w: dict[str, mx.array]) -> None:
    """deepseek_v41: DeepSeek's own tensor names (``layers.N.ffn.experts.E.w1``, fp8/fp4 weights
    with ue8m0 scales) are renamed, stacked and repacked into MLX's quantized layout by
    mlx-lm's sanitize; d2moe's layer-by-layer conversion of that is untested (no test
    checkpoint in that layout): refuse it rather than guess."""
    hub = [k for k in w if not k.startswith(("model.", "lm_head."))]
    if hub:
        raise ValueError(f"deepseek_v41: DeepSeek-layout tensors ({hub[0]}, ...) are not supported "
                         "yet: convert the checkpoint with mlx_lm.convert first, then with d2moe")


def kimi_k3_config(cfg: dict) -> None:
    """kimi_k3: a latent MoE (experts on a projection of the router's input,
    ``routed_expert_hidden_size``) is refused: d2moe's score policies read the router from
    the experts' input. The text fields may sit at the top or in ``text_config``."""
    for part in (cfg, cfg.get("text_config") or {}):
        if part.get("routed_expert_hidden_size") is not None:
            raise ValueError("kimi_k3: routed_expert_hidden_size is set (a latent MoE); d2moe-mlx "
                             "supports Kimi-K3 MoE layers whose experts see the router's input")


def text_model_config(family: str, normalize: bool = True):
    """A config fix for a multimodal wrapper whose text model is ``family``'s (kimi_k25:
    DeepSeek-V3 in ``text_config``): the text config is checked and normalised by that
    family's adapter (its defaults, limits and rope spelling), as a text-only checkpoint of
    it would be; its own ``model_type`` is kept. ``normalize=False``: checked only (mlx-lm
    reads it as written, kimi_vl)."""

    def fix(cfg: dict) -> None:
        from d2moe_mlx.convert.hf_config import check_supported, normalize_config

        text = _text_config(cfg, f"the {family} text model")
        inner = {k: v for k, v in text.items() if k not in ("auto_map", "model_file")}
        inner["model_type"] = family
        check_supported(inner)
        if not normalize:
            return
        normalized = normalize_config(inner)
        normalized["model_type"] = text.get("model_type", family)
        cfg["text_config"] = normalized

    fix.__doc__ = f"The text model of the wrapper: {family}'s config, normalised by its adapter."
    return fix


def kimi_vl_weights(config: dict, w: dict[str, mx.array]) -> None:
    """kimi_vl: mlx-lm's model has DeepSeek-V3's absorbed MLA (``embed_q``/``unembed_out``)
    and its sanitize does not split the hub's ``kv_b_proj``: refuse such checkpoints."""
    hub = [k for k in w if k.endswith("kv_b_proj.weight")]
    if hub:
        raise ValueError(f"kimi_vl: {hub[0]}: mlx-lm's kimi_vl model does not read kv_b_proj "
                         "tensors (its sanitize leaves them unsplit); only checkpoints saved by "
                         "mlx-lm >= 0.32 convert")


# transformers' Gemma4TextConfig defaults where mlx-lm's ModelArgs has others
_GEMMA4_DEFAULTS = {"num_kv_shared_layers": 0, "use_double_wide_mlp": False,
                    "final_logit_softcapping": None, "num_key_value_heads": 4,
                    "num_attention_heads": 8, "hidden_size": 2304, "intermediate_size": 9216,
                    "num_hidden_layers": 30}


def gemma4_config(cfg: dict) -> None:
    """gemma4 / gemma4_text: the text config (``text_config`` of a multimodal one) with
    transformers' defaults where mlx-lm's differ; transformers 5's ``per_layer_config``
    (head_dim / kv heads of the full-attention layers) as mlx-lm's ``global_head_dim`` /
    ``num_global_key_value_heads``; settings mlx-lm's model does not run are refused."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        text = cfg
    for k, v in _GEMMA4_DEFAULTS.items():
        text.setdefault(k, v)
    if text.get("layer_types") is None:  # transformers: 5 sliding layers, then a full one
        n = text["num_hidden_layers"]
        text["layer_types"] = ["sliding_attention" if (i + 1) % 6 and i < n - 1 else "full_attention"
                               for i in range(n)]
    for key, allowed in (("hidden_activation", ("gelu_pytorch_tanh", None)),
                         ("use_bidirectional_attention", (None,)), ("attention_bias", (False, None))):
        if text.get(key) not in allowed:
            raise ValueError(f"{cfg.get('model_type')}: {key}={text.get(key)!r} is not supported "
                             f"by mlx-lm's gemma4 model (allowed: {allowed})")
    per_layer = text.pop("per_layer_config", None)
    if per_layer is None:
        return
    full = {i for i, t in enumerate(text["layer_types"]) if t == "full_attention"}
    values = {tuple(sorted(v.items())) for v in per_layer.values()}
    keys = {k for v in per_layer.values() for k in v}
    if {int(i) for i in per_layer} != full or len(values) != 1 or not keys <= {"head_dim", "num_key_value_heads"} \
            or ("num_key_value_heads" in keys and not text.get("attention_k_eq_v")):
        raise ValueError(f"{cfg.get('model_type')}: per_layer_config {per_layer} is not one "
                         "head_dim (and, with attention_k_eq_v, kv heads) for every full-attention "
                         "layer, the only per-layer setting mlx-lm's gemma4 model has")
    override = dict(values.pop())
    text["global_head_dim"] = override.get("head_dim", text.get("head_dim", 256))
    if "num_key_value_heads" in override:
        text["num_global_key_value_heads"] = override["num_key_value_heads"]


def llama4_config(cfg: dict) -> None:
    """llama4: mlx-lm reads ``rope_theta`` / ``rope_scaling`` from ``text_config`` (transformers
    5 writes ``rope_parameters``) and hard-codes the layer pattern: rope (and chunked
    attention) in every layer but each 4th, MoE every ``interleave_moe_layer_step``-th."""
    from d2moe_mlx.convert.hf_config import _read_rope_parameters

    text = _text_config(cfg, "the text model")
    _read_rope_parameters(text)
    text.setdefault("rope_scaling", None)
    n, step = text["num_hidden_layers"], text.get("interleave_moe_layer_step", 1)
    checks = {"no_rope_layers": [int((i + 1) % 4 != 0) for i in range(n)],
              "layer_types": ["chunked_attention" if (i + 1) % 4 else "full_attention" for i in range(n)],
              "moe_layers": list(range(step - 1, n, step))}
    for key, want in checks.items():
        if text.get(key) is not None and list(text[key]) != want:
            raise ValueError(f"llama4: {key}={text[key]} differs from the only pattern mlx-lm's "
                             f"llama4 model builds ({want})")
    if text.get("num_experts_per_tok", 1) != 1:
        raise ValueError(f"llama4: num_experts_per_tok={text['num_experts_per_tok']}; mlx-lm's "
                         "llama4 model routes each token to 1 expert")


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
