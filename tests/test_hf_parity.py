"""transformers (float32) vs mlx-lm (float32) logits on tiny random checkpoints
of every supported family, through our config/weight normalisation."""

import copy
import re

import mlx.core as mx
import numpy as np
import pytest
from make_test_checkpoints import FAMILIES, HF_FAMILIES, HF_TEXT_MODEL, causal_lm_class

from d2moe_mlx.convert.hf_config import (
    SUPPORTED_FAMILIES,
    apply_mlx_lm_fixes,
    build_model,
    check_supported,
    load_config,
    load_hf_weights,
    load_mlx_reference,
    normalize_config,
    normalize_weights,
)

TOKENS = [5, 17, 200, 33, 64, 99, 3, 150, 250, 7, 88, 120, 42, 11, 230, 71]
ATOL = 1e-4  # max abs logit difference, float32 both sides (observed <= 1.2e-6)


def hf_logits(hf_dir) -> np.ndarray:
    import torch

    family = load_config(hf_dir)["model_type"]
    model = causal_lm_class(family).from_pretrained(hf_dir, dtype=torch.float32,
                                                    attn_implementation="eager")
    model = getattr(model, HF_TEXT_MODEL.get(family, ""), model)
    with torch.no_grad():
        return model.eval()(torch.tensor([TOKENS])).logits[0].numpy()


# Families whose mlx-lm block routes differently from transformers' (docs/FAMILIES.md):
# family -> transformers' router class whose top-k weights mlx-lm renormalises.
MLX_LM_RENORMALISES = {"jamba": ("transformers.models.jamba.modeling_jamba", "JambaTopKRouter")}


def renormalise_router(monkeypatch, family) -> None:
    """Make transformers' router of ``family`` renormalise its top-k weights, as mlx-lm's does."""
    import importlib

    module, name = MLX_LM_RENORMALISES[family]
    cls = getattr(importlib.import_module(module), name)
    forward = cls.forward

    def renormalised(self, *args, **kwargs):
        logits, weights, index = forward(self, *args, **kwargs)
        return logits, weights / weights.sum(dim=-1, keepdim=True), index

    monkeypatch.setattr(cls, "forward", renormalised)


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array([TOKENS]))[0])


def test_families_match():
    assert tuple(FAMILIES) == SUPPORTED_FAMILIES


@pytest.mark.parametrize("fused", [False, True], ids=["hub-layout", "fused-layout"])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_logits_match_transformers(hf_checkpoint, family, fused, monkeypatch):
    ckpt = hf_checkpoint(family, fused_experts=fused)
    model, _ = load_mlx_reference(ckpt)
    out = mlx_logits(model)
    if family in MLX_LM_RENORMALISES:  # the known difference is real, and the only one
        assert np.abs(out - hf_logits(ckpt)).max() > 1e-3
        renormalise_router(monkeypatch, family)
    ref = hf_logits(ckpt)
    assert ref.std() > 0.1 and np.abs(ref[1:] - ref[:-1]).max() > 0.1  # non-trivial logits
    diff = np.abs(out - ref).max()
    assert diff <= ATOL, f"{family}: max abs logit diff {diff:.3g}"


@pytest.mark.parametrize(
    "family,kw",
    [
        ("mixtral", dict(max_shard_size="100KB")),  # multi-shard checkpoint
        ("phimoe", dict(attention_bias=False, lm_head_bias=False)),  # zero biases filled in
        # mlx-lm's deepseek_v2 needs rope_scaling even for plain rope
        ("deepseek_v2", dict(rope_parameters={"rope_type": "default", "rope_theta": 25000.0})),
        # longrope keys + top-level original_max_position_embeddings. Factors are
        # equal because mlx-lm always uses long_factor while transformers 5.23
        # always uses short_factor (its mscale does switch at the original length).
        ("phimoe", dict(rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
            "short_factor": [1 + 0.1 * i for i in range(8)], "long_factor": [1 + 0.1 * i for i in range(8)],
            "short_mscale": 1.1, "long_mscale": 1.3})),
    ],
    ids=["mixtral-sharded", "phimoe-nobias", "deepseek_v2-plain-rope", "phimoe-longrope"],
)
def test_logits_match_transformers_variants(hf_checkpoint, family, kw):
    ckpt = hf_checkpoint(family, **kw)
    model, _ = load_mlx_reference(ckpt)
    diff = np.abs(mlx_logits(model) - hf_logits(ckpt)).max()
    assert diff <= ATOL, f"{family} {kw}: max abs logit diff {diff:.3g}"


def test_normalisation_matters(hf_checkpoint):
    """Read raw, transformers-5 configs are silently wrong (olmoe) or unreadable (qwen3_moe)."""
    from mlx_lm.utils import _get_classes

    ckpt = hf_checkpoint("olmoe")
    raw = load_config(ckpt)
    model_class, args_class = _get_classes(raw)
    model = model_class(args_class.from_dict(raw))  # rope_theta falls back to mlx-lm's default
    weights = model.sanitize(normalize_weights("olmoe", raw, load_hf_weights(ckpt)))
    model.load_weights(list(weights.items()), strict=True)
    diff = np.abs(mlx_logits(model) - hf_logits(ckpt)).max()
    assert diff > 1e-2, f"raw olmoe config unexpectedly matches ({diff:.3g})"

    raw = load_config(hf_checkpoint("qwen3_moe"))
    assert "num_experts" not in raw and "rope_theta" not in raw
    with pytest.raises(TypeError):
        _get_classes(raw)[1].from_dict(raw)


def test_untruncated_yarn_fix_matters(hf_checkpoint):
    """gpt-oss sets yarn ``truncate: false``; mlx-lm's rope ignores it unless
    ``apply_mlx_lm_fixes`` runs (build_model / load_mlx_reference do)."""
    from mlx_lm.utils import _get_classes

    ckpt = hf_checkpoint("gpt_oss")
    raw = load_config(ckpt)
    assert raw["rope_parameters"]["truncate"] is False
    cfg = normalize_config(raw)
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    model.load_weights(list(model.sanitize(normalize_weights("gpt_oss", raw, load_hf_weights(ckpt))).items()))
    ref = hf_logits(ckpt)
    unfixed = np.abs(mlx_logits(model) - ref).max()
    apply_mlx_lm_fixes(model, raw)
    fixed = np.abs(mlx_logits(model) - ref).max()
    assert unfixed > 1e-4 and fixed <= ATOL, (unfixed, fixed)


def test_normalize_config_pure_and_idempotent(hf_checkpoint):
    for family in HF_FAMILIES:
        raw = load_config(hf_checkpoint(family))
        before = copy.deepcopy(raw)
        cfg = normalize_config(raw)
        assert raw == before
        assert normalize_config(cfg) == cfg
        rope = (raw.get("text_config") or raw).get("rope_parameters") or {}  # multimodal: the text part's
        if "rope_theta" in rope:  # else one rope per layer kind (mellum, laguna), read by mlx-lm itself
            assert cfg["rope_theta"] == rope["rope_theta"]


def _layer_of(key: str):
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("fused", [False, True], ids=["hub-layout", "fused-layout"])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_normalize_weights_per_layer(hf_checkpoint, family, fused):
    """Layer by layer (+ the non-layer tensors) == the whole checkpoint at once,
    and each layer's result passes mlx-lm's sanitize into the model's shapes."""
    ckpt = hf_checkpoint(family, fused_experts=fused)
    raw = load_config(ckpt)
    weights = load_hf_weights(ckpt)
    whole = normalize_weights(family, raw, weights)
    parts: dict = {}
    for layer in sorted({_layer_of(k) for k in weights}, key=lambda x: -1 if x is None else x):
        subset = {k: v for k, v in weights.items() if _layer_of(k) == layer}
        out = normalize_weights(family, raw, subset)
        assert not set(out) & set(parts)
        parts.update(out)
    assert set(parts) == set(whole)
    for k in whole:
        assert mx.array_equal(parts[k], whole[k]), k

    model, _ = build_model(raw)
    model.load_weights(list(model.sanitize(parts).items()), strict=True)


def test_normalize_weights_needs_whole_layers(hf_checkpoint):
    weights = load_hf_weights(hf_checkpoint("mixtral"))
    subset = {k: v for k, v in weights.items() if ".layers.1." in k and ".experts.7." not in k}
    with pytest.raises(ValueError, match="experts"):
        normalize_weights("mixtral", load_config(hf_checkpoint("mixtral")), subset)


def test_check_supported():
    assert check_supported({"model_type": "qwen3_moe"}) == "qwen3_moe"
    with pytest.raises(ValueError) as e:
        check_supported({"model_type": "llama"})
    msg = str(e.value)
    assert "'llama'" in msg and "SwitchGLU" in msg and all(f in msg for f in SUPPORTED_FAMILIES)
    for remote in ({"auto_map": {"AutoModelForCausalLM": "m.M"}}, {"model_file": "m.py"}):
        with pytest.raises(ValueError, match="remote code"):
            check_supported({"model_type": "mixtral", **remote})
    with pytest.raises(ValueError, match="norm_topk_prob"):
        check_supported({"model_type": "qwen2_moe", "norm_topk_prob": True})


def test_checkpoint_tokenizer(hf_checkpoint):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(hf_checkpoint("qwen3_moe"))
    ids = tok.encode("Hi, wörld")
    assert ids == list("Hi, wörld".encode()) and tok.decode(ids) == "Hi, wörld"
    assert tok.eos_token_ids == {load_config(hf_checkpoint("qwen3_moe"))["eos_token_id"]}


@pytest.mark.parametrize("family", ["bailing_moe", "phixtral"])
def test_mlx_lm_saved_read_as_mlx_lm_loads_it(hf_checkpoint, family):
    """An mlx-lm-saved checkpoint, read through our normalisation, gives the logits of
    mlx-lm's own loader (bailing_moe: norm_head applied by the converter, not sanitize;
    phixtral: its config names)."""
    from mlx_lm.utils import load_model

    ckpt = hf_checkpoint(family)
    ours, _ = load_mlx_reference(ckpt, dtype="float32")
    theirs, _ = load_model(ckpt)
    theirs.set_dtype(mx.float32)
    diff = np.abs(mlx_logits(ours) - mlx_logits(theirs)).max()
    assert diff <= ATOL, f"{family}: max abs logit diff {diff:.3g}"


def test_bailing_moe_hub_layout_layer_by_layer(hf_checkpoint):
    """bailing_moe in the hub's layout (one tensor per expert, router ``gate.weight``),
    normalised and sanitized one layer at a time under its own index as the converter
    does: mlx-lm's model of the whole mlx-lm-saved checkpoint."""
    ckpt = hf_checkpoint("bailing_moe")
    ref, _ = load_mlx_reference(ckpt, dtype="float32")
    raw = load_config(ckpt)
    hub = {}
    for k, v in load_hf_weights(ckpt).items():
        if ".switch_mlp." in k:
            hub.update({k.replace(".switch_mlp.", f".experts.{e}."): v[e] for e in range(v.shape[0])})
        else:
            hub[k.replace(".gate.gate_proj.", ".gate.")] = v
    model, _ = build_model(raw)
    parts = {}
    for layer in {_layer_of(k) for k in hub}:
        subset = {k: v for k, v in hub.items() if _layer_of(k) == layer}
        parts.update(model.sanitize(normalize_weights("bailing_moe", raw, subset)))
    model.load_weights(list(parts.items()), strict=True)
    diff = np.abs(mlx_logits(model) - mlx_logits(ref)).max()
    assert diff <= ATOL, f"max abs logit diff {diff:.3g}"
