"""The one way d2moe wraps mlx-lm MoE blocks: replace a block's routed experts.

Every supported block calls ``experts(x, indices)`` after routing;
:func:`replace_experts` puts another module in that place for each MoE block the
family adapter finds. The trace recorder and the converter's calibration put an
:class:`ExpertHook` there for the duration of a run (and restore the original);
the expert engine puts its :class:`~d2moe_mlx.experts.ExpertLayer` there for good.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn

from .families import Family

ExpertFn = Callable[[mx.array, mx.array], mx.array]


class ExpertHook(nn.Module):
    """Stands in for a block's experts and calls ``fn(x, indices)`` (no parameters)."""

    def __init__(self, fn: ExpertFn):
        super().__init__()
        object.__setattr__(self, "_fn", fn)  # a plain attribute, not a child module

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self._fn(x, indices)


def replace_experts(blocks: list[tuple[int, nn.Module]], family: Family,
                    make: Callable[[int, nn.Module, nn.Module], nn.Module]) -> Callable[[], None]:
    """Put ``make(layer, block, original_experts)`` in place of each block's experts (and
    tap the router logits of a family that reads them where the block computes them,
    :meth:`~d2moe_mlx.families.Family.tap_router`); returns a function that undoes both."""
    originals = []
    try:
        for layer, block in blocks:
            original = family.experts_of(block)
            originals.append((block, original, family.tap_router(block)))
            family.set_experts(block, make(layer, block, original))
    except BaseException:
        _restore(originals, family)
        raise
    return lambda: _restore(originals, family)


def _restore(originals, family: Family) -> None:
    for block, original, untap in originals:
        family.set_experts(block, original)
        untap()


@contextmanager
def hooked(blocks: list[tuple[int, nn.Module]], family: Family,
           make_fn: Callable[[int, nn.Module, nn.Module], ExpertFn]) -> Iterator[None]:
    """While inside, each block's experts are an :class:`ExpertHook` calling
    ``make_fn(layer, block, original)(x, indices)``; restored on exit, also on error."""
    restore = replace_experts(blocks, family, lambda l, b, o: ExpertHook(make_fn(l, b, o)))
    try:
        yield
    finally:
        restore()
