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

import mlx.core as mx

from d2moe_mlx.families import Family, get_family, is_known, supported

SUPPORTED_FAMILIES = supported()  # kept for callers of the old name

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _family(config: dict) -> Family:
    return get_family(config.get("model_type"))


def check_supported(config: dict) -> str:
    """Return the config's model_type, or raise ValueError saying why not."""
    remote_ok = is_known(config.get("model_type")) and _family(config).hub_remote_code
    if (config.get("auto_map") or config.get("model_file")) and not remote_ok:
        raise ValueError(
            "this checkpoint needs remote code (config has 'auto_map'/'model_file'); "
            "d2moe-mlx only runs architectures implemented in mlx-lm and never "
            "executes code shipped with a checkpoint"
        )
    model_type = config.get("model_type")
    family = _family(config)
    hidden_act = config.get("hidden_act", "silu")
    if family.hidden_acts is not None and hidden_act not in family.hidden_acts:
        raise ValueError(f"{model_type}: hidden_act={hidden_act!r} unsupported (mlx-lm uses "
                         f"{' / '.join(family.hidden_acts)})")
    for field, allowed in family.mlx_lm_limits.items():
        if config.get(field) not in allowed:
            raise ValueError(
                f"{model_type}: {field}={config.get(field)!r} is not supported by "
                f"mlx-lm's {model_type} model (allowed: {allowed})"
            )
    return model_type


def _rope_scaling(rope: dict) -> dict | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")}
    scaling["type"] = scaling["rope_type"] = rope_type
    return scaling


def _read_rope_parameters(cfg: dict) -> None:
    """transformers 5: rope_parameters replaces rope_theta + rope_scaling."""
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and ("rope_theta" in rope or "rope_type" in rope):
        if "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = _rope_scaling(rope)
        for k in ("original_max_position_embeddings", "partial_rotary_factor"):
            if k in rope and k not in cfg:
                cfg[k] = rope[k]


def normalize_config(config: dict) -> dict:
    """A copy of an HF config.json dict that mlx-lm's ModelArgs reads correctly."""
    cfg = copy.deepcopy(config)
    family = _family(cfg)
    for k, v in family.hf_defaults.items():
        if k not in cfg and not (k.startswith("rope_") and "rope_parameters" in cfg):
            cfg[k] = copy.deepcopy(v)

    _read_rope_parameters(cfg)

    # Expert count: each family's ModelArgs reads one of these names.
    count = next((cfg[k] for k in _EXPERT_COUNT_KEYS if cfg.get(k) is not None), None)
    if count is not None and cfg.get(family.expert_count_key) is None:
        cfg[family.expert_count_key] = count
    if family.config_fix is not None:
        family.config_fix(cfg)
    cfg = _lift_text_config(cfg)
    # Experts per token also under the common name where the family spells it
    # otherwise (ernie's moe_k, gemma4's top_k_experts, also in text_config):
    # budgets and profiles read num_experts_per_tok.
    top_k = family.gating_keys.get("top_k")
    if top_k and cfg.get("num_experts_per_tok") is None and cfg.get(top_k) is not None:
        cfg["num_experts_per_tok"] = cfg[top_k]
    return cfg


def _lift_text_config(cfg: dict) -> dict:
    """Multimodal: the text model's fields (text_config, normalised) also at the top, where
    d2moe reads them (budget, calibration); mlx-lm's wrapper ModelArgs reads text_config."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        return cfg
    for k, v in text.items():
        if k not in cfg and k != "model_type":
            cfg[k] = copy.deepcopy(v)
    _read_rope_parameters(cfg)
    return cfg


# ---------------------------------------------------------------------------
# weights

_PER_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(\w+)\.(\w+)$")
_W_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _expert_count(config: dict) -> int:
    return normalize_config(config)[_family(config).expert_count_key]


def _split_fused(family: Family, config: dict, prefix: str, name: str, v: mx.array) -> dict:
    """``experts.gate_up_proj`` / ``experts.down_proj`` (+ gpt_oss biases) -> SwitchGLU keys."""
    out = {}
    dst = prefix + "." + family.experts
    hidden = normalize_config(config)["hidden_size"]
    if family.fused_layout == "interleaved":
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


def dropped_tensors(model_type: str, names) -> tuple[set[str], str]:
    """The checkpoint tensors ``model_type``'s text model does not use (the family's
    ``drop`` patterns: vision/audio towers, MTP layers) and a message saying what they are."""
    family = get_family(model_type)
    dropped: set[str] = set()
    parts = []
    for pattern, what in family.drop:
        hit = {n for n in names if re.search(pattern, n) and n not in dropped}
        if hit:
            dropped |= hit
            parts.append(f"{len(hit)} tensors of the {what}")
    message = ""
    if parts:
        message = (f"dropped {', '.join(parts)}: d2moe converts and runs the {model_type} "
                   "text model only")
    return dropped, message


def normalize_weights(model_type: str, config: dict, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Turn (a subset of) an HF checkpoint's tensors into what ``Model.sanitize`` expects.

    Works on any subset that holds whole layers (e.g. one layer's tensors at a
    time). Returns a new dict; the input is not modified.
    """
    family = get_family(model_type)
    out: dict[str, mx.array] = {}
    groups: dict[tuple[str, str, str], dict[int, mx.array]] = {}
    dropped, _ = dropped_tensors(model_type, weights)
    for k, v in weights.items():
        if k in dropped:
            continue
        for pat, rep in family.renames:
            k = re.sub(pat, rep, k)
        head, _, name = k.rpartition(".experts.")
        if head and name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            if family.fused_layout == "interleaved" or v.ndim == 3 or name.endswith("_bias"):
                out.update(_split_fused(family, config, head, name, v))
                continue
        m = _PER_EXPERT.match(k)
        if m and family.stack_here:
            prefix, e, proj, leaf = m.groups()
            groups.setdefault((prefix, _W_NAMES.get(proj, proj), leaf), {})[int(e)] = v
            continue
        out[k] = v
    if groups:
        n = _expert_count(config)
        for (prefix, proj, leaf), experts in groups.items():
            if sorted(experts) != list(range(n)):
                raise ValueError(
                    f"{prefix}.experts: got experts {sorted(experts)} of {n} for "
                    f"{proj}.{leaf}; pass a layer's experts together"
                )
            out[f"{prefix}.{family.experts}.{proj}.{leaf}"] = mx.stack([experts[e] for e in range(n)])
    if family.weights_fix is not None:
        family.weights_fix(config, out)
    return out


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


def load_mlx_reference(hf_dir: str | Path, dtype: str | None = None):
    """mlx-lm's full-precision model of an HF checkpoint directory.

    ``build_model`` on its config.json, then the weights through
    ``normalize_weights`` and mlx-lm's ``Model.sanitize``, loaded with
    ``strict=True``. ``dtype`` (``"float32"``, ...) casts the float weights; by
    default the checkpoint's dtype is kept, except on MLX's CPU backend, whose
    expert matmuls run in float32 only. Returns ``(model, normalized_config)``.
    """
    raw = load_config(hf_dir)
    model, cfg = build_model(raw)
    weights = normalize_weights(raw["model_type"], raw, load_hf_weights(hf_dir))
    weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = "float32"
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype), lambda t: mx.issubdtype(t, mx.floating))
    mx.eval(model.parameters())
    model.eval()
    return model, cfg
