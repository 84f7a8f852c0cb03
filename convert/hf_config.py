"""Hugging Face MoE checkpoint -> what mlx-lm's model classes read.

transformers 5 writes configs and (optionally) weights that mlx-lm 0.32 reads
wrongly or not at all:

* ``rope_parameters`` replaces ``rope_theta`` / ``rope_scaling``: mlx-lm then
  silently uses its own default theta.
* qwen3_moe configs name the expert count ``num_local_experts``.
* transformers-5 in-memory expert layouts (``experts.gate_up_proj`` /
  ``experts.down_proj``, saved with ``save_original_format=False``) and the
  module renames that come with them.
* Several mlx-lm ``sanitize`` methods only look at layer 0, so they cannot
  stack experts when given one layer's tensors (streaming conversion).

``normalize_config`` and ``normalize_weights`` fix these; mlx-lm's own
``Model.sanitize`` still runs afterwards (it does the rest: fp8 dequant,
MLA kv_b split, tied lm_head, ...).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import mlx.core as mx

# Model types whose experts are an mlx-lm SwitchGLU and whose HF logits we
# matched (tests/test_hf_parity.py).
SUPPORTED_FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
    "phimoe",
)

# Module path of the SwitchGLU inside a decoder layer, per family.
SWITCH_MLP_PATH = {
    "mixtral": "block_sparse_moe.switch_mlp",
    "phimoe": "block_sparse_moe.switch_mlp",
    "granitemoe": "block_sparse_moe.switch_mlp",
    "gpt_oss": "mlp.experts",
    **{f: "mlp.switch_mlp" for f in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")},
}

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")

# HF config-class defaults for fields that mlx-lm's ModelArgs reads with a
# *different* default. Applied only when the field is missing from config.json.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"rope_theta": 1e6},
    "qwen2_moe": {"rope_theta": 10000.0},
    "qwen3_moe": {"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False,
                  "tie_word_embeddings": False, "rope_theta": 10000.0, "max_position_embeddings": 32768},
    "olmoe": {"tie_word_embeddings": False},
    "deepseek_v2": {"topk_method": "greedy", "n_shared_experts": 2, "n_routed_experts": 64},
    "deepseek_v3": {"routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
                    "first_k_dense_replace": 3, "n_shared_experts": 1, "n_routed_experts": 256},
    "gpt_oss": {"rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                 "beta_slow": 1.0, "original_max_position_embeddings": 4096}},
    "granitemoe": {"tie_word_embeddings": False},
    "phimoe": {"rope_theta": 1e6, "rms_norm_eps": 1e-5},
}

# Config values the HF model honours but mlx-lm's model ignores or cannot run:
# field -> allowed values (a missing field is taken as allowed).
_MLX_LM_LIMITS: dict[str, dict[str, tuple]] = {
    "qwen2_moe": {"norm_topk_prob": (False, None), "use_sliding_window": (False, None)},
    "qwen3_moe": {"use_sliding_window": (False, None)},
    "olmoe": {"clip_qkv": (None,)},
    "mixtral": {"sliding_window": (None,)},
    "phimoe": {"sliding_window": (None,), "input_jitter_noise": (0, 0.0, None)},
    "deepseek_v2": {"norm_topk_prob": (False, None)},
    "deepseek_v3": {"rope_interleave": (True, None), "topk_method": ("noaux_tc", None),
                    "scoring_func": ("sigmoid", None)},
    "gpt_oss": {"swiglu_alpha": (1.702, None), "swiglu_limit": (7.0, None)},
}


def check_supported(config: dict) -> str:
    """Return the config's model_type, or raise ValueError saying why not."""
    if config.get("auto_map") or config.get("model_file"):
        raise ValueError(
            "this checkpoint needs remote code (config has 'auto_map'/'model_file'); "
            "d2moe-mlx only runs architectures implemented in mlx-lm and never "
            "executes code shipped with a checkpoint"
        )
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported: d2moe-mlx replaces the "
            "experts of an mlx-lm model, which must be an mlx-lm SwitchGLU; "
            f"supported (verified against transformers): {', '.join(SUPPORTED_FAMILIES)}"
        )
    hidden_act = config.get("hidden_act", "silu")
    if model_type != "gpt_oss" and hidden_act not in ("silu", "swish"):
        raise ValueError(f"{model_type}: hidden_act={hidden_act!r} unsupported (mlx-lm uses silu)")
    for field, allowed in _MLX_LM_LIMITS.get(model_type, {}).items():
        if config.get(field) not in allowed:
            raise ValueError(
                f"{model_type}: {field}={config.get(field)!r} is not supported by "
                f"mlx-lm's {model_type} model (allowed: {allowed})"
            )
    return model_type


def _rope_scaling(model_type: str, rope: dict) -> dict | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        # mlx-lm's deepseek_v2 always builds its yarn rope from rope_scaling;
        # factor 1 makes it plain rope.
        return {"type": "yarn", "rope_type": "yarn", "factor": 1.0} if model_type == "deepseek_v2" else None
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")}
    scaling["type"] = scaling["rope_type"] = rope_type
    return scaling


def normalize_config(config: dict) -> dict:
    """A copy of an HF config.json dict that mlx-lm's ModelArgs reads correctly."""
    cfg = copy.deepcopy(config)
    model_type = cfg.get("model_type")
    for k, v in _HF_DEFAULTS.get(model_type, {}).items():
        if k not in cfg and not (k.startswith("rope_") and "rope_parameters" in cfg):
            cfg[k] = copy.deepcopy(v)

    # transformers 5: rope_parameters replaces rope_theta + rope_scaling.
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and ("rope_theta" in rope or "rope_type" in rope):
        if "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = _rope_scaling(model_type, rope)
        for k in ("original_max_position_embeddings", "partial_rotary_factor"):
            if k in rope and k not in cfg:
                cfg[k] = rope[k]
    elif model_type == "deepseek_v2" and cfg.get("rope_scaling") is None:
        cfg["rope_scaling"] = _rope_scaling(model_type, {})

    # Expert count: each family's ModelArgs reads one of these names.
    count = next((cfg[k] for k in _EXPERT_COUNT_KEYS if cfg.get(k) is not None), None)
    if count is not None:
        key = {"qwen2_moe": "num_experts", "qwen3_moe": "num_experts", "olmoe": "num_experts",
               "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts"}.get(
            model_type, "num_local_experts")
        cfg.setdefault(key, count)
        if cfg[key] is None:
            cfg[key] = count

    if model_type == "qwen3_moe":
        if cfg.get("head_dim") is None:
            cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        if cfg.get("mlp_only_layers") is None:
            cfg["mlp_only_layers"] = []
    if model_type == "gpt_oss" and cfg.get("layer_types") is None:
        n = cfg.get("num_hidden_layers", 0)
        cfg["layer_types"] = ["sliding_attention", "full_attention"] * (n // 2)
    return cfg


# ---------------------------------------------------------------------------
# weights

# transformers-5 module names (save_original_format=False) -> hub/mlx-lm names.
_RENAMES: dict[str, list[tuple[str, str]]] = {
    "mixtral": [(r"\.mlp\.", ".block_sparse_moe.")],
    "phimoe": [(r"\.mlp\.router\.", ".block_sparse_moe.gate."), (r"\.mlp\.", ".block_sparse_moe.")],
    "granitemoe": [(r"block_sparse_moe\.router\.weight$", "block_sparse_moe.router.layer.weight"),
                   (r"block_sparse_moe\.input_linear\.weight$", "block_sparse_moe.experts.gate_up_proj"),
                   (r"block_sparse_moe\.output_linear\.weight$", "block_sparse_moe.experts.down_proj")],
}
_PER_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(\w+)\.(\w+)$")
_W_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
# mlx-lm's sanitize stacks per-expert tensors of these families only if layer 0
# is in the dict it is given (granitemoe: and every layer), so we stack here.
_STACK_HERE = ("mixtral", "phimoe", "qwen2_moe", "olmoe")


def _expert_count(model_type: str, config: dict) -> int:
    cfg = normalize_config(config)
    return {"deepseek_v2": cfg.get("n_routed_experts"), "deepseek_v3": cfg.get("n_routed_experts")}.get(
        model_type, cfg.get("num_local_experts", cfg.get("num_experts")))


def _split_fused(model_type: str, config: dict, prefix: str, name: str, v: mx.array) -> dict:
    """``experts.gate_up_proj`` / ``experts.down_proj`` (+ gpt_oss biases) -> SwitchGLU keys."""
    out = {}
    dst = prefix + "." + SWITCH_MLP_PATH[model_type].rsplit(".", 1)[-1]
    hidden = config["hidden_size"]
    if model_type == "gpt_oss":
        # [E, H, 2I] and [E, I, H], gate/up interleaved along 2I: y = x @ W.
        if name == "gate_up_proj":
            out[f"{dst}.gate_proj.weight"] = mx.contiguous(v[..., ::2].swapaxes(-1, -2))
            out[f"{dst}.up_proj.weight"] = mx.contiguous(v[..., 1::2].swapaxes(-1, -2))
        elif name == "gate_up_proj_bias":
            out[f"{dst}.gate_proj.bias"] = mx.contiguous(v[..., ::2])
            out[f"{dst}.up_proj.bias"] = mx.contiguous(v[..., 1::2])
        elif name == "down_proj":
            out[f"{dst}.down_proj.weight"] = mx.contiguous(v.swapaxes(-1, -2))
        elif name == "down_proj_bias":
            out[f"{dst}.down_proj.bias"] = v
        return out
    # transformers-5 layout: gate_up [E, 2I, H] (gate rows first), down [E, H, I].
    if name == "gate_up_proj":
        if v.shape[-1] != hidden and v.shape[-2] == hidden:
            v = v.swapaxes(-1, -2)
        inter = v.shape[-2] // 2
        out[f"{dst}.gate_proj.weight"] = mx.contiguous(v[..., :inter, :])
        out[f"{dst}.up_proj.weight"] = mx.contiguous(v[..., inter:, :])
    elif name == "down_proj":
        if v.shape[-2] != hidden and v.shape[-1] == hidden:
            v = v.swapaxes(-1, -2)
        out[f"{dst}.down_proj.weight"] = v
    return out


def normalize_weights(model_type: str, config: dict, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Turn (a subset of) an HF checkpoint's tensors into what ``Model.sanitize`` expects.

    Works on any subset that holds whole layers (e.g. one layer's tensors at a
    time). Returns a new dict; the input is not modified.
    """
    out: dict[str, mx.array] = {}
    groups: dict[tuple[str, str, str], dict[int, mx.array]] = {}
    for k, v in weights.items():
        for pat, rep in _RENAMES.get(model_type, ()):
            k = re.sub(pat, rep, k)
        head, _, name = k.rpartition(".experts.")
        if head and name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            if model_type == "gpt_oss" or v.ndim == 3 or name.endswith("_bias"):
                out.update(_split_fused(model_type, config, head, name, v))
                continue
        m = _PER_EXPERT.match(k)
        if m and model_type in _STACK_HERE:
            prefix, e, proj, leaf = m.groups()
            groups.setdefault((prefix, _W_NAMES.get(proj, proj), leaf), {})[int(e)] = v
            continue
        out[k] = v
    if groups:
        n = _expert_count(model_type, config)
        dst = SWITCH_MLP_PATH[model_type].rsplit(".", 1)[-1]
        for (prefix, proj, leaf), experts in groups.items():
            if sorted(experts) != list(range(n)):
                raise ValueError(
                    f"{prefix}.experts: got experts {sorted(experts)} of {n} for "
                    f"{proj}.{leaf}; pass a layer's experts together"
                )
            out[f"{prefix}.{dst}.{proj}.{leaf}"] = mx.stack([experts[e] for e in range(n)])
    if model_type == "phimoe":
        _phimoe_zero_biases(config, out)
    return out


def _phimoe_zero_biases(config: dict, w: dict[str, mx.array]) -> None:
    # mlx-lm's phimoe always has attention and lm_head biases.
    for k in list(w):
        if re.search(r"(self_attn\.[qkvo]_proj|^lm_head)\.weight$", k):
            b = k[: -len("weight")] + "bias"
            if b not in w:
                w[b] = mx.zeros((w[k].shape[0],), dtype=w[k].dtype)


# ---------------------------------------------------------------------------
# reference model


def load_config(hf_dir: str | Path) -> dict:
    """The raw config.json of an HF checkpoint directory."""
    with open(Path(hf_dir) / "config.json") as f:
        return json.load(f)


def apply_mlx_lm_fixes(model, config: dict) -> None:
    """Post-build fixes so an mlx-lm model matches transformers (in place).

    Call on any model built from mlx-lm's classes (``build_model`` does).
    Raw or normalised config. Today: mlx-lm's yarn ropes always round the
    correction range, transformers honours ``truncate: false`` (gpt-oss sets
    it; 7e-4 logit error at 16 tokens, growing with position).
    """
    cfg = normalize_config(config)
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) != "yarn" or rs.get("truncate", True):
        return
    base, factor = cfg["rope_theta"], rs["factor"]
    orig = rs.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    for _, m in model.named_modules():
        freqs = getattr(m, "_freqs", None)
        if not isinstance(freqs, mx.array) or "Yarn" not in type(m).__name__:
            continue
        dims = 2 * freqs.shape[0]

        def corr(rot):
            return dims * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = max(corr(beta_fast), 0), min(corr(beta_slow), dims - 1)
        if low == high:
            high += 0.001
        ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
        mask = 1.0 - ramp
        extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        m._freqs = factor * extra / (factor * mask + (1 - mask))


def build_model(config: dict):
    """Build mlx-lm's model (random weights) for an HF config dict.

    Checks support, normalises the config, builds ``Model(ModelArgs)`` with
    mlx-lm's own classes and applies the few post-build fixes mlx-lm needs to
    match transformers. Returns ``(model, normalized_config)``.
    """
    from mlx_lm.utils import _get_classes

    check_supported(config)
    cfg = normalize_config(config)
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    apply_mlx_lm_fixes(model, cfg)
    return model, cfg


def load_hf_weights(hf_dir: str | Path) -> dict[str, mx.array]:
    """All tensors of an HF checkpoint directory (lazy ``mx.load``), any sharding."""
    weights: dict[str, mx.array] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    return weights


def load_mlx_reference(hf_dir: str | Path):
    """mlx-lm's full-precision model of an HF checkpoint directory.

    ``build_model`` on its config.json, then the weights through
    ``normalize_weights`` and mlx-lm's ``Model.sanitize``, loaded with
    ``strict=True`` (checkpoint dtype kept). Returns ``(model, normalized_config)``.
    """
    raw = load_config(hf_dir)
    model, cfg = build_model(raw)
    weights = normalize_weights(raw["model_type"], raw, load_hf_weights(hf_dir))
    weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model, cfg
