"""Family adapters: everything d2moe knows about an MoE model family, in one place.

One :class:`Family` per supported ``model_type`` (the table is in
:mod:`.registry`) says where mlx-lm's model keeps the MoE block of a decoder
layer, its router and its routed experts (a ``SwitchGLU``/``SwitchMLP``), its
shared experts, the gating rule with the config keys of its constants, and how a
Hugging Face checkpoint of the family is normalised for mlx-lm. The trace
recorder, the converter's calibration, the expert engine and every policy go
through it; no other module names a family. Adding a family = adding one entry.

Every supported block calls its experts as ``experts(x, indices)`` on the same
``x`` its router sees, so the engine recomputes router logits from ``x`` only
when a policy asks for scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from .routing import Gating, bind

GATING_KEYS = {"top_k": "num_experts_per_tok", "norm_topk": "norm_topk_prob",
               "scaling": "routed_scaling_factor", "n_group": "n_group",
               "topk_group": "topk_group", "topk_method": "topk_method",
               "jitter_eps": "router_jitter_noise"}


@dataclass(frozen=True)
class Family:
    """What d2moe knows about one mlx-lm MoE family (see the module docstring)."""

    name: str
    block: str = "mlp"  # attribute of a decoder layer holding the MoE block
    router: str = "gate"  # attribute of the block: the router
    experts: str = "switch_mlp"  # attribute of the block: the routed experts
    shared: tuple[str, ...] = ()  # attributes of the block: shared experts (always run)
    rule: str = "softmax_topk"  # gating rule (routing.RULES)
    correction_bias: str | None = None  # router (else block) attribute: a score-correction bias
    # Conversion (convert/hf_config.py): config keys and weight names of HF checkpoints.
    expert_count_key: str = "num_local_experts"  # the ModelArgs field holding the expert count
    hf_defaults: dict[str, Any] = field(default_factory=dict)  # HF defaults mlx-lm lacks
    mlx_lm_limits: dict[str, tuple] = field(default_factory=dict)  # config values mlx-lm can run
    renames: tuple[tuple[str, str], ...] = ()  # transformers-5 module names -> hub names
    stack_here: bool = False  # stack per-expert tensors ourselves (mlx-lm's sanitize needs layer 0)
    fused_layout: str = "rows"  # fused gate_up tensors: "rows" (gate rows first) or "interleaved"
    hidden_acts: tuple[str, ...] | None = ("silu", "swish")  # activations mlx-lm runs (None: any)
    config_fix: Callable[[dict], None] | None = None  # family quirk of the config (fixes.py)
    weights_fix: Callable[[dict, dict], None] | None = None  # family quirk of the weights
    verified: str = "transformers"  # how this family's support was verified
    # Checkpoint tensors the text model does not use (regex on the checkpoint's name, what
    # they are): vision/audio towers, MTP layers. Dropped before conversion, with a message.
    drop: tuple[tuple[str, str], ...] = ()
    # fam1: per-family gating config names (field -> ModelArgs attribute, over GATING_KEYS)
    # and constants mlx-lm's block hard-codes (field -> value), e.g. ernie's top-k "moe_k".
    gating_keys: dict[str, str] = field(default_factory=dict)
    gating_const: dict[str, Any] = field(default_factory=dict)
    # The converter sanitizes a layer's tensors renamed to layer 0 (several mlx-lm sanitize
    # methods look only there); False: under their own index (kimi_linear's looks at each
    # layer's module).
    sanitize_layer0: bool = True
    correction_on_block: bool = False  # the correction bias is the block's, not the router's
    # The block multiplies its routed experts' sum by a per-token factor of its own
    # (Klear: a softmax coefficient mixing routed and shared output), outside the routing.
    scaled_output: bool = False
    # Hub checkpoints carry auto_map because transformers lacks the family: accepted,
    # since mlx-lm's own model code runs (never the checkpoint's).
    hub_remote_code: bool = False
    # <longcat> values a decoder layer returns: 1, its hidden state; n > 1, a tuple with the
    # hidden state first (hunyuan: its attention's keys/values); calibration's layer probe
    # answers None for the others (refused where a later layer reads them).
    layer_outputs: int = 1
    notes: str = ""  # known differences from transformers, shown by --list-families

    @property
    def switch_path(self) -> str:
        """Path of the routed experts inside a decoder layer (e.g. ``mlp.switch_mlp``)."""
        return f"{self.block}.{self.experts}"

    def gating(self, args) -> Gating:
        """The gating rule with ``args``' (mlx-lm ModelArgs) constants bound."""
        return bind(self.rule, args, {**GATING_KEYS, **self.gating_keys}, self.gating_const)

    def correction(self, block: nn.Module) -> mx.array | None:
        """The router's score-correction bias of ``block``, if the family has one."""
        if self.correction_bias is None:
            return None
        if self.correction_on_block:
            return block[self.correction_bias]
        router = block[self.router]
        if isinstance(router, nn.Module) and self.correction_bias in router:
            return router[self.correction_bias]
        return block[self.correction_bias]

    def blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(decoder layer index, MoE block) of every layer whose block has routed experts."""
        from ..moe import decoder_layers, is_experts

        found = []
        for i, layer in enumerate(decoder_layers(model)):
            block = layer.get(self.block) if isinstance(layer, nn.Module) else None
            if isinstance(block, nn.Module) and isinstance(block.get(self.router), nn.Module) \
                    and is_experts(block.get(self.experts)):
                found.append((i, block))
        return found


def router_logits(router: nn.Module, x: mx.array) -> mx.array:
    """The router's logits over all experts for ``x``, whatever the router returns:
    a Linear router is called; one holding its Linear in ``layer`` (granitemoe),
    ``gate`` (afmoe), ``proj`` (laguna), ``classifier`` (longcat_flash) or ``wg`` (hunyuan)
    calls that; others (DeepSeek's MoEGate) hold a ``weight`` (and
    maybe a ``bias``)."""
    if isinstance(router, (nn.Linear, nn.QuantizedLinear)):
        return router(x)
    inner = None
    if isinstance(router, nn.Module):
        inner = next((router[k] for k in ("layer", "gate", "proj", "classifier", "wg")
                      if k in router), None)
    if isinstance(inner, (nn.Linear, nn.QuantizedLinear)):
        return inner(x)
    if "weight" not in router:
        raise ValueError(f"{type(router).__name__}: cannot find the router's weight")
    logits = x @ router["weight"].T
    return logits + router["bias"] if "bias" in router else logits


def text_args(model: nn.Module):
    """The ModelArgs of ``model``'s text model: ``model.args``, or for a multimodal
    wrapper (its args hold a ``text_config``) the args of its language model."""
    args = getattr(model, "args", None)
    if hasattr(args, "text_config"):
        lm = getattr(model, "language_model", None)
        inner = getattr(lm, "args", None)
        if inner is not None:
            return inner
    return args


def model_type(model: nn.Module) -> str | None:
    """The ``model_type`` of an mlx-lm model."""
    args = getattr(model, "args", None)
    return getattr(args, "model_type", None) or getattr(model, "model_type", None)


def get_family(name: str | None) -> Family:
    """The adapter of ``model_type`` ``name``; ValueError naming the supported ones."""
    from .registry import FAMILIES, REFUSED

    if name in REFUSED:
        raise ValueError(f"model_type {name!r} is not supported: {REFUSED[name]}")
    if name not in FAMILIES:
        raise ValueError(
            f"model_type {name!r} is not supported: d2moe-mlx runs MoE models whose routed "
            "experts are an mlx-lm SwitchGLU/SwitchMLP, through a family adapter "
            f"(d2moe_mlx/families/registry.py); supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(model: nn.Module) -> Family:
    """The adapter of an mlx-lm model (by its ``model_type``)."""
    return get_family(model_type(model))


def supported() -> tuple[str, ...]:
    """Every supported ``model_type``, in registry order."""
    from .registry import FAMILIES

    return tuple(FAMILIES)


VERIFIED = {  # Family.verified -> how, in words (--list-families, docs/FAMILIES.md)
    "transformers": "transformers",  # tiny random checkpoint written by transformers 5
    "mlx-lm": "mlx-lm",  # transformers lacks it: tiny random model saved by mlx-lm
    "none": "not verified",
}


def describe(family: Family) -> str:
    """What a user should know about ``family``: its notes, then the config values
    mlx-lm's model cannot run (the converter refuses them)."""
    parts = [family.notes] if family.notes else []
    for key, allowed in family.mlx_lm_limits.items():
        shown = [repr(a) for a in allowed if a is not None]
        unset = " (or unset)" if None in allowed and shown else ""
        parts.append(f"{key} must be {' or '.join(shown)}{unset}" if shown else f"{key} must be unset")
    return "; ".join(parts)


def family_table() -> list[tuple[str, str, str]]:
    """(model_type, verified how, notes) of every supported family, in registry order."""
    from .registry import FAMILIES

    return [(f.name, VERIFIED.get(f.verified, f.verified), describe(f)) for f in FAMILIES.values()]


__all__ = ["Family", "describe", "family_table", "Gating", "family_of", "get_family", "model_type",
           "router_logits", "supported", "text_args"]
