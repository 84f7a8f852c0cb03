"""The MoE layer: mlx-lm's SwitchGLU with its expert projections computed from MWQ components.

mlx-lm routes every MoE family through ``SwitchGLU(x, indices)``, whose three
projections are ``SwitchLinear(x, indices, sorted_indices)``. We keep mlx-lm's
SwitchGLU (its sorting, activation and gpt_oss quirks) and replace only the
projections with :class:`MWQSwitchLinear`, which sums one ``gather_qmm`` per
MWQ component: level k = base + planes 1..k.
"""

from __future__ import annotations

import re
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from .store.format import MANIFEST_NAME, StoreError

# Names of the projections of each switch module class, in mlx-lm's spelling.
PROJECTIONS = {SwitchGLU: ("gate_proj", "up_proj", "down_proj"), SwitchMLP: ("fc1", "fc2")}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
QuantizedComponent = tuple[mx.array, mx.array, mx.array, int]


class MWQSwitchLinear(nn.Module):
    """Drop-in replacement for mlx-lm's ``SwitchLinear`` over MWQ components.

    ``components[c]`` is ``(weight, scales, biases, bits)`` stacked over experts
    ([E, out, packed], [E, out, groups], [E, out, groups]) in MLX's affine
    layout. The arrays are kept under underscore names so that they are not
    module parameters: mlx-lm's loader then never expects them in the dense
    weight files.
    """

    def __init__(
        self,
        components: Sequence[QuantizedComponent],
        group_size: int,
        input_dims: int,
        bias: mx.array | None = None,
        level: int | None = None,
    ):
        super().__init__()
        if not components:
            raise ValueError("MWQSwitchLinear needs at least the base component")
        self._components = list(components)
        self._bias = bias
        self.group_size = group_size
        self._input_dims = input_dims
        self.level = len(self._components) - 1 if level is None else level
        self.set_level(self.level)

    @property
    def num_levels(self) -> int:
        return len(self._components)

    @property
    def input_dims(self) -> int:
        return self._input_dims

    @property
    def output_dims(self) -> int:
        return self._components[0][0].shape[-2]

    @property
    def num_experts(self) -> int:
        return self._components[0][0].shape[0]

    def set_level(self, level: int) -> None:
        """Compute with components 0..level from now on."""
        if not 0 <= level < len(self._components):
            raise ValueError(
                f"level {level} is not loaded: this layer holds levels 0..{len(self._components) - 1}"
            )
        self.level = level

    def arrays(self) -> Iterator[mx.array]:
        """Every array this layer holds (for evaluation and memory accounting)."""
        for comp in self._components:
            yield from comp[:3]
        if self._bias is not None:
            yield self._bias

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = None
        for weight, scales, biases, bits in self._components[: self.level + 1]:
            out = mx.gather_qmm(
                x,
                weight,
                scales,
                biases,
                rhs_indices=indices,
                transpose=True,
                group_size=self.group_size,
                bits=bits,
                sorted_indices=sorted_indices,
            )
            y = out if y is None else y + out
        if self._bias is not None:
            y = y + mx.expand_dims(self._bias[indices], -2)
        return y


def is_switch(module) -> bool:
    """True for an mlx-lm routed-experts module (``SwitchGLU`` or ``SwitchMLP``)."""
    return isinstance(module, tuple(PROJECTIONS))


def switch_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (path, module) of every mlx-lm switch (routed-experts) module in ``model``."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, tuple(PROJECTIONS)):
            found.append((path, module))
    # named_modules walks children before parents in reverse; keep model order.
    return sorted(found, key=lambda pm: _path_sort_key(pm[0]))


def store_switches(model: nn.Module, store) -> list[tuple[int, str, nn.Module]]:
    """(layer, path, module) of each switch module of ``model``, in layer order, checked
    against the ones ``store``'s manifest recorded (StoreError if they differ)."""
    expected = store.manifest["switch_modules"]
    found = {str(layer_of(p)): (p, m) for p, m in switch_modules(model)}
    if sorted(found) != sorted(expected) or any(found[k][0] != expected[k] for k in expected):
        raise StoreError(
            f"{store.path / MANIFEST_NAME}: expert modules {sorted(expected.values())[:3]}... do not "
            f"match the {store.manifest['model_type']} model built from config.json; re-run d2moe convert"
        )
    return [(int(k), p, m) for k, (p, m) in sorted(found.items(), key=lambda kv: int(kv[0]))]


def projection_names(module: nn.Module) -> tuple[str, ...]:
    """The projection attribute names of a switch module (gate/up/down or fc1/fc2)."""
    for cls, names in PROJECTIONS.items():
        if isinstance(module, cls):
            return names
    raise TypeError(f"{type(module).__name__} is not an mlx-lm switch module")


def layer_of(name: str) -> int | None:
    """The decoder layer index in a tensor name or module path (``model.layers.3.mlp...``), else None."""
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


def mwq_layers(model: nn.Module) -> Iterator[MWQSwitchLinear]:
    """Every MWQSwitchLinear installed in ``model``."""
    for _, module in model.named_modules():
        if isinstance(module, MWQSwitchLinear):
            yield module


def set_level(model: nn.Module, level: int) -> None:
    """Switch every MWQ expert projection of ``model`` to ``level``."""
    for layer in mwq_layers(model):
        layer.set_level(level)


def _path_sort_key(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))
