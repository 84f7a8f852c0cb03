"""Router taps: read a router's logits where mlx-lm's block computes them.

Some blocks route on a different input than the one their experts see (gemma4's
router reads the un-normed residual, its experts a normed copy; llama4 calls its
experts on ``x * sigmoid(score)``), so the logits cannot be recomputed from the
experts' input. For those, the module that produces the logits (a Linear) is
*tapped*: its class is swapped for a subclass that keeps its last output. The
module stays the same object with the same parameters (weights load into it as
before), the block calls it as always, and the experts' stand-in reads the logits
of the same call afterwards: no extra matmul, no extra host sync. The tap survives
``nn.quantize`` (mlx-lm quantizes a model after it is built, and d2moe hooks it while
building): the quantized module it becomes is tapped too.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

_TAPPED: dict[type, type] = {}  # module class -> its tapped subclass


def _tapped_class(cls: type) -> type:
    if cls not in _TAPPED:
        def __call__(self, *args, **kwargs):
            out = super(tapped, self).__call__(*args, **kwargs)
            object.__setattr__(self, "_d2moe_out", out)  # a plain attribute, not a parameter
            return out

        def to_quantized(self, *args, **kwargs):  # a model quantized after hooking keeps its tap
            quantized = super(tapped, self).to_quantized(*args, **kwargs)
            tap(quantized)
            return quantized

        members = {"__call__": __call__, "_d2moe_tap": True}
        if hasattr(cls, "to_quantized"):
            members["to_quantized"] = to_quantized
        tapped = type(f"Tapped{cls.__name__}", (cls,), members)
        _TAPPED[cls] = tapped
    return _TAPPED[cls]


def is_tapped(module: nn.Module) -> bool:
    """True when ``module`` records its output (see :func:`tap`)."""
    return bool(getattr(type(module), "_d2moe_tap", False))


def tap(module: nn.Module) -> bool:
    """Make ``module`` keep its last output (in place); False if it already did."""
    if is_tapped(module):
        return False
    module.__class__ = _tapped_class(type(module))
    return True


def untap(module: nn.Module) -> None:
    """Undo :func:`tap` (the module's own class back, its record dropped)."""
    if is_tapped(module):
        module.__class__ = type(module).__mro__[1]
        module.__dict__.pop("_d2moe_out", None)


def recorded(module: nn.Module, what: str) -> mx.array:
    """The output of ``module``'s last call; RuntimeError if it is not tapped or was
    not called (``what`` names it in the message)."""
    if not is_tapped(module):
        raise RuntimeError(f"{what} is not tapped: its block must be hooked (d2moe_mlx.hooks) "
                           "before the router logits of a call can be read")
    out = module.__dict__.get("_d2moe_out")
    if out is None:
        raise RuntimeError(f"{what} has not run yet: the router logits are read after the block "
                           "has called its router")
    return out


def call_untapped(module: nn.Module, *args) -> mx.array:
    """Call ``module`` without recording (its own class's ``__call__``)."""
    cls = type(module).__mro__[1] if is_tapped(module) else type(module)
    return cls.__call__(module, *args)
