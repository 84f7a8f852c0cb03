"""Family adapters: everything d2moe knows about an MoE model family, in one place.

One :class:`Family` per supported ``model_type`` (the table is in
:mod:`.registry`) says where mlx-lm's model keeps the MoE block of a decoder
layer, its router and its routed experts (a ``SwitchGLU``/``SwitchMLP``), its
shared experts, the gating rule with the config keys of its constants, and how a
Hugging Face checkpoint of the family is normalised for mlx-lm. The trace
recorder, the converter's calibration, the expert engine and every policy go
through it; no other module names a family. Adding a family = adding one entry.

Every supported block calls its experts as ``experts(x, indices)``. Most route the
same ``x`` their experts see, so router logits are recomputed from ``x`` only when
a policy asks for scores; a family whose router reads another input names a
``router_tap`` and the logits of the call are read where the block computed them
(:mod:`.taps`). Everything that needs a layer's router logits (the expert layer,
calibration, trace, tests) asks :meth:`Family.router_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from .routing import Gating, bind
from .taps import call_untapped, recorded, tap, untap

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
    experts: str = "switch_mlp"  # attribute (dotted path) of the block: the routed experts
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
    # per-family gating config names (field -> ModelArgs attribute, over GATING_KEYS)
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
    # decoder-layer state besides the hidden state, for the converter's layer-by-layer
    # calibration: the layer's call arguments (index into the positional ones after the hidden
    # state, or a keyword) that it also returns, in order after the hidden state
    # (deepseek_v41: layer(streams, pre_mix, ...) -> (streams, pre_mix)).
    carry: tuple[int | str, ...] = ()
    notes: str = ""  # known differences from transformers, shown by --list-families
    # blocks whose router does not read the experts' input. ``block`` may be ""
    # (the decoder layer itself is the block, gemma4) and ``experts`` a dotted path
    # ("experts.switch_glu"). ``router_tap``: path (relative to the block) of the module
    # whose output is the router's logits; it is tapped (families/taps.py) while the block
    # is hooked, and the logits of a call are read there instead of recomputed from the
    # experts' input (gemma4: "router.proj", llama4: "router").
    router_tap: str | None = None
    # Path of a per-expert factor [E] the block multiplies the chosen experts' weights by
    # (gemma4's per_expert_scale): part of the routing weights, never of the experts'.
    expert_scale: str | None = None
    # The block multiplies its experts' input by the routing weight (llama4), not their output.
    weights_on_input: bool = False
    # A decoder layer returns its hidden state (1), or a tuple of this many values with the
    # hidden state first (gemma4: hidden state, shared K/V, offset); the converter's layer
    # probes return as many.
    layer_outputs: int = 1

    @property
    def switch_path(self) -> str:
        """Path of the routed experts inside a decoder layer (e.g. ``mlp.switch_mlp``)."""
        return ".".join(p for p in (self.block, self.experts) if p)

    def block_of(self, layer: nn.Module) -> nn.Module | None:
        """The MoE block of decoder layer ``layer`` (the layer itself when ``block`` is "")."""
        return _get(layer, self.block)

    def experts_of(self, block: nn.Module) -> nn.Module:
        """The routed experts of ``block`` (a switch module or what stands in for one)."""
        return _get(block, self.experts)

    def set_experts(self, block: nn.Module, module: nn.Module) -> None:
        """Put ``module`` in the place of ``block``'s routed experts."""
        parent, _, name = self.experts.rpartition(".")
        setattr(_get(block, parent), name, module)

    def experts_owner(self, block: nn.Module) -> nn.Module:
        """The module that calls the routed experts and weights their outputs: the block,
        or the module holding them when ``experts`` is a dotted path (gemma4's ``experts``)."""
        return _get(block, self.experts.rpartition(".")[0])

    def router_logits(self, block: nn.Module, x: mx.array) -> mx.array:
        """The router logits [..., E] of ``block``'s current call, whose experts see ``x``:
        with a ``router_tap``, the logits the block computed in this call (the block must be
        hooked, see :func:`d2moe_mlx.hooks.replace_experts`); else the router on ``x``."""
        if self.router_tap is not None:
            return recorded(_get(block, self.router_tap), f"{self.name}: {self.router_tap}")
        return router_logits(block[self.router], x)

    def router_logits_for(self, block: nn.Module, x: mx.array) -> mx.array:
        """``block``'s router logits for any input ``x`` (e.g. another layer's experts'
        input, to guess this layer's routing). With a ``router_tap`` this applies the tapped
        module alone to ``x``: what the router does before it (gemma4: an RMSNorm) is skipped,
        so it is a guess, never this layer's routing."""
        if self.router_tap is not None:
            return call_untapped(_get(block, self.router_tap), x)
        return router_logits(block[self.router], x)

    def tap_router(self, block: nn.Module) -> Callable[[], None]:
        """Tap ``block``'s router logits (no-op without ``router_tap``); returns the undo."""
        if self.router_tap is None:
            return lambda: None
        if not tap(_get(block, self.router_tap)):
            return lambda: None
        return lambda: untap(_get(block, self.router_tap))  # the module there then (quantized?)

    def expert_factor(self, block: nn.Module) -> mx.array | None:
        """The per-expert factor [E] of the routing weights (``expert_scale``), if any."""
        return None if self.expert_scale is None else _get(block, self.expert_scale)

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
        if isinstance(router, nn.Module) and getattr(router, self.correction_bias, 0) is None:
            return None  # the router's bias is switched off in this config (bailing_moe)
        return block[self.correction_bias]

    def blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(decoder layer index, MoE block) of every layer whose block has routed experts."""
        from ..moe import decoder_layers, is_experts

        found = []
        for i, layer in enumerate(decoder_layers(model)):
            block = self.block_of(layer) if isinstance(layer, nn.Module) else None
            if isinstance(block, nn.Module) and isinstance(_get(block, self.router), nn.Module) \
                    and is_experts(_get(block, self.experts)):
                found.append((i, block))
        return found


def _get(module: nn.Module, path: str):
    """The submodule (or array) at dotted ``path`` of ``module`` ("" = itself), else None."""
    for part in filter(None, path.split(".")):
        if not isinstance(module, nn.Module) or part not in module:
            return None
        module = module[part]
    return module


def router_logits(router: nn.Module, x: mx.array) -> mx.array:
    """The router's logits over all experts for ``x``, whatever the router returns:
    a Linear router is called; one holding its Linear in ``layer`` (granitemoe),
    ``gate`` (afmoe), ``proj`` (laguna), ``gate_proj`` (bailing_moe), ``classifier``
    (longcat_flash) or ``wg`` (hunyuan) calls that; others (DeepSeek's MoEGate) hold a
    ``weight`` (and maybe a ``bias``)."""
    if isinstance(router, (nn.Linear, nn.QuantizedLinear)):
        return router(x)
    inner = None
    if isinstance(router, nn.Module):
        inner = next((router[k] for k in ("layer", "gate", "proj", "gate_proj", "classifier", "wg")
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
    """The adapter of ``model_type`` ``name``, or of the family mlx-lm maps an alias
    to (:func:`aliases`); ValueError naming the supported ones (or why ``name`` is
    refused, registry.REFUSED)."""
    from .registry import FAMILIES, REFUSED

    if name in REFUSED:
        raise ValueError(f"model_type {name!r} is not supported: {REFUSED[name]}")
    if name in FAMILIES:
        return FAMILIES[name]
    alias = aliases().get(name)
    if alias is None:
        raise ValueError(
            f"model_type {name!r} is not supported: d2moe-mlx runs MoE models whose routed "
            "experts are an mlx-lm SwitchGLU/SwitchMLP, through a family adapter "
            f"(d2moe_mlx/families/registry.py); supported: {', '.join(FAMILIES)} "
            f"(and the aliases {', '.join(aliases())})")
    return alias


def alias_table() -> dict[str, str]:
    """model_type aliases mlx-lm resolves to a supported family (``MODEL_REMAPPING`` of
    ``mlx_lm.utils``, e.g. ``kimi_k2`` -> ``deepseek_v3``): alias -> family."""
    from mlx_lm.utils import MODEL_REMAPPING

    from .registry import FAMILIES

    return {alias: target for alias, target in MODEL_REMAPPING.items()
            if target in FAMILIES and alias not in FAMILIES}


@lru_cache(maxsize=None)
def aliases() -> dict[str, Family]:
    """The adapter of each alias (:func:`alias_table`): mlx-lm runs its family's model, so it
    is that family's adapter under the alias's name. Hub checkpoints of an alias carry remote
    code (transformers lacks the model_type); mlx-lm's own code runs instead, never theirs."""
    from .registry import FAMILIES

    return {alias: replace(FAMILIES[target], name=alias, hub_remote_code=True,
                           notes=f"alias of {target} (mlx-lm runs its {target} model)")
            for alias, target in alias_table().items()}


def is_known(name: str | None) -> bool:
    """True for a supported ``model_type`` or an alias of one."""
    return name in supported() or name in aliases()


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


__all__ = ["Family", "alias_table", "aliases", "describe", "family_table", "Gating", "family_of",
           "get_family", "is_known", "model_type", "router_logits", "supported", "text_args"]
