"""Where an mlx-lm MoE model keeps things: decoder layers, routed-expert modules, projections.

Generic structure helpers (no family names: those live in :mod:`d2moe_mlx.families`),
and :func:`set_level` for a loaded d2moe model.
"""

from __future__ import annotations

import re
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP


# Names of the projections of each switch module class, in mlx-lm's spelling.
PROJECTIONS = {SwitchGLU: ("gate_proj", "up_proj", "down_proj"), SwitchMLP: ("fc1", "fc2")}

_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")  # h: GPT-2-style transformer.h.N


def is_switch(module) -> bool:
    """True for an mlx-lm routed-experts module (``SwitchGLU`` or ``SwitchMLP``)."""
    return isinstance(module, tuple(PROJECTIONS))


def is_experts(module) -> bool:
    """True for a block's routed experts: mlx-lm's switch module, or a module that
    stands in for one (its class sets ``routed_experts = True``, as d2moe's expert layer)."""
    return is_switch(module) or bool(getattr(type(module), "routed_experts", False))


def switch_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (path, module) of every mlx-lm switch (routed-experts) module in ``model``."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, tuple(PROJECTIONS)):
            found.append((path, module))
    # named_modules walks children before parents in reverse; keep model order.
    return sorted(found, key=lambda pm: _path_sort_key(pm[0]))


def projection_names(module: nn.Module) -> tuple[str, ...]:
    """The projection attribute names of a switch module (gate/up/down or fc1/fc2)."""
    for cls, names in PROJECTIONS.items():
        if isinstance(module, cls):
            return names
    raise TypeError(f"{type(module).__name__} is not an mlx-lm switch module")


def layer_of(name: str) -> int | None:
    """The decoder layer index in a tensor name or module path (``model.layers.3.mlp...``,
    ``transformer.h.3.moe...``), else None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def decoder_layers(model: nn.Module) -> list:
    """The model's list of decoder layers (the real list, so it can be edited in place)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, list):
        layers = getattr(model, "layers", None)
    if not isinstance(layers, list):
        raise ValueError(f"{type(model).__module__}: no model.layers list of decoder layers")
    return layers


def layers_path(model: nn.Module) -> str:
    """The dotted path of the decoder-layer list in ``model`` (``model.layers``,
    ``language_model.model.layers``, ...): where its parameter names put layer ``l``."""
    layers = decoder_layers(model)
    if layers:
        first = layers[0]
        for path, module in model.named_modules():
            if module is first and path.endswith(".0"):
                return path[:-2]
    raise ValueError(f"{type(model).__module__}: cannot find where the decoder layers live")


def set_level(model: nn.Module, level: int) -> None:
    """Run every expert of a d2moe ``model`` at MWQ ``level`` from the next call on
    (resident or streaming; see :meth:`d2moe_mlx.engine.Engine.set_level`)."""
    from .engine import engine_of

    engine = engine_of(model)
    if engine is None:
        raise ValueError("set_level needs a model loaded by d2moe_mlx.load / load_model")
    engine.set_level(level)


def _path_sort_key(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))
