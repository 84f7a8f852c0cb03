"""Level policies: which MWQ level each (token, expert) pair is computed at.

A policy sees, per MoE layer call, the pairs' expert ids [N, k], their router
scores when it ``needs_scores``, and the layer's cache (residency); it returns one
level for every pair (an int) or a level per pair ([N, k]). ``uniform`` is the
level every pair gets when the policy always gives one (then resident calls need
no host sync), else None. ``levels_used`` lists every level it can return, so the
engine holds a pool for each.

* :class:`Exact`: the same level for every pair (what the model was loaded at).
* :class:`PerPair`: levels from a function of (layer, ids, scores) (tests, tools).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


class LevelPolicy:
    """Base class; see the module docstring."""

    needs_scores = False
    uniform: int | None = None

    def levels(self, layer: int, ids: np.ndarray, scores: np.ndarray | None, cache) -> int | np.ndarray:
        raise NotImplementedError

    @property
    def levels_used(self) -> tuple[int, ...]:
        raise NotImplementedError


class Exact(LevelPolicy):
    """Every pair at ``level``."""

    def __init__(self, level: int):
        if not isinstance(level, (int, np.integer)) or level < 0:
            raise ValueError(f"level must be an integer >= 0, got {level!r}")
        self.uniform = int(level)

    def levels(self, layer, ids, scores, cache) -> int:
        return self.uniform

    @property
    def levels_used(self) -> tuple[int, ...]:
        return (self.uniform,)

    def __repr__(self) -> str:
        return f"Exact({self.uniform})"


class PerPair(LevelPolicy):
    """Levels from ``fn(layer, ids [N, k], scores [N, k] or None) -> int array [N, k]``,
    each in ``levels_used``."""

    def __init__(self, fn: Callable, levels_used: tuple[int, ...], needs_scores: bool = False):
        self._fn = fn
        self._used = tuple(sorted(set(int(v) for v in levels_used)))
        self.needs_scores = needs_scores

    def levels(self, layer, ids, scores, cache) -> np.ndarray:
        out = np.asarray(self._fn(layer, ids, scores))
        if out.shape != ids.shape:
            raise ValueError(f"level policy returned shape {out.shape} for pairs {ids.shape}")
        if not np.isin(out, self._used).all():
            raise ValueError(f"level policy returned levels {sorted(set(out.ravel()))}, "
                             f"outside its levels_used {self._used}")
        return out

    @property
    def levels_used(self) -> tuple[int, ...]:
        return self._used
