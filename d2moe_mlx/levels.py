"""Level policies: which MWQ level each (token, expert) pair runs at, and substitutions.

A policy sees one MoE layer call (:class:`Call`: the pairs' expert ids [N, k], their
router scores and every expert's scores when it ``needs_scores``, and the level at
which each expert is resident now) and returns a :class:`Decision`: one level for
every pair (an int) or a level per pair ([N, k]), and optionally other experts to
run in some pairs' place. ``uniform`` is the level every pair gets when the policy
always gives one (then resident calls need no host sync), else None;
``levels_used`` lists every level it can return, so the engine holds a pool for each.

* :class:`Exact`: the same level for every pair (what the model was loaded at).
* :class:`PerPair`: levels from a function of (layer, ids, scores) (tests, tools).
* :class:`DualRouting`: training-free D²MoE dual routing with SMoE substitution and
  HOBBIT's low level on a miss; :data:`QUALITIES` are its presets.
* ``learned``: D²MoE's trained bit-width router (:class:`d2moe_mlx.bitrouter.LearnedRouting`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .pairs import token_counts


@dataclass
class Call:
    """What a level policy sees of one MoE layer call (host arrays)."""

    layer: int
    ids: np.ndarray  # [N, k] the router's experts
    scores: np.ndarray | None  # [N, k] their router probabilities (None: not computed)
    full: np.ndarray | None  # [N, E] every expert's router probability
    ready: np.ndarray  # [levels, E]: expert e can run at level l with no read
    read_s: list[float] | None = None  # per level: seconds to read one expert (profile)
    compute_s: list[float] | None = None  # per level: seconds of one token's k experts

    def highest_ready(self) -> np.ndarray:
        """[E] the highest level each expert can run at with no read (-1: none)."""
        levels = np.arange(self.ready.shape[0])[:, None]
        return np.where(self.ready, levels, -1).max(axis=0)


@dataclass
class Decision:
    """Levels for the pairs of a call, and the experts that run in their place."""

    levels: int | np.ndarray
    ids: np.ndarray | None = None  # [N, k] experts to compute (None: the router's)
    substituted: int = 0  # pairs whose expert was replaced


class LevelPolicy:
    """Base class; see the module docstring."""

    needs_scores = False
    uniform: int | None = None

    def decide(self, call: Call) -> Decision:
        raise NotImplementedError

    @property
    def levels_used(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def floor(self) -> int:
        """The lowest level it gives (its pool gets the most slots)."""
        return min(self.levels_used)


class Exact(LevelPolicy):
    """Every pair at ``level``."""

    def __init__(self, level: int):
        if not isinstance(level, (int, np.integer)) or level < 0:
            raise ValueError(f"level must be an integer >= 0, got {level!r}")
        self.uniform = int(level)

    def decide(self, call: Call) -> Decision:
        return Decision(self.uniform)

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

    def decide(self, call: Call) -> Decision:
        out = np.asarray(self._fn(call.layer, call.ids, call.scores))
        if out.shape != call.ids.shape:
            raise ValueError(f"level policy returned shape {out.shape} for pairs {call.ids.shape}")
        if not np.isin(out, self._used).all():
            raise ValueError(f"level policy returned levels {sorted(set(out.ravel()))}, "
                             f"outside its levels_used {self._used}")
        return Decision(out)

    @property
    def levels_used(self) -> tuple[int, ...]:
        return self._used


class DualRouting(LevelPolicy):
    """Training-free dual routing: a level per (token, expert) pair from its importance
    (router probability relative to the token's strongest expert), its hotness (how
    many of the call's tokens chose the expert) and its residency; unimportant misses
    run at the floor (HOBBIT) or are substituted (SMoE).

    Per pair: ``ceiling`` if relative importance >= ``tau`` or the expert is hot
    (chosen by >= ``hot`` of the call's tokens, and more than one), else ``floor``;
    a pair whose level is not ready but a higher one (up to the ceiling) is runs at
    that one, which costs no read. SMoE with ``alpha`` > 0: let S be the token's (k+1)-th
    highest score; an activated expert scoring in [S, (1+alpha)S) that is resident
    at no level >= floor is replaced by the highest-scoring inactive expert in
    [(1-alpha)S, S) that is (at its resident level); if none, it is loaded at the
    floor (pools exist only for floor..ceiling). Experts scoring >= (1+alpha)S are
    never touched. ``alpha=0`` substitutes nothing.

    Stall budget (with a profile, :mod:`d2moe_mlx.profile`): when the reads a call
    still needs would take more than ``stall`` times its compute at the ceiling, the
    least important of the pairs that need a read above the floor drop to the floor
    (a ready lower level needs no read) until they fit. None: no budget.
    """

    needs_scores = True

    def __init__(self, floor: int, ceiling: int, *, tau: float = 0.5, hot: float = 0.25,
                 alpha: float = 0.0, stall: float | None = None):
        if not 0 <= floor <= ceiling:
            raise ValueError(f"need 0 <= floor <= ceiling, got floor {floor}, ceiling {ceiling}")
        if not 0.0 <= tau <= 1.0 or not 0.0 < hot <= 1.0 or not 0.0 <= alpha < 1.0:
            raise ValueError(f"need tau in [0, 1], hot in (0, 1], alpha in [0, 1); got tau {tau}, "
                             f"hot {hot}, alpha {alpha}")
        if stall is not None and not stall > 0:
            raise ValueError(f"stall must be > 0 (or None), got {stall}")
        self.floor_level, self.ceiling = int(floor), int(ceiling)
        self.tau, self.hot, self.alpha = float(tau), float(hot), float(alpha)
        self.stall = stall
        self.uniform = self.ceiling if floor == ceiling and alpha == 0 else None

    @property
    def levels_used(self) -> tuple[int, ...]:
        return tuple(range(self.floor_level, self.ceiling + 1))

    def __repr__(self) -> str:
        return (f"DualRouting(floor={self.floor_level}, ceiling={self.ceiling}, tau={self.tau}, "
                f"hot={self.hot}, alpha={self.alpha})")

    def decide(self, call: Call) -> Decision:
        ids, scores = call.ids, call.scores
        n, k = ids.shape
        lo, hi = self.floor_level, self.ceiling
        importance = scores / np.maximum(scores.max(axis=-1, keepdims=True), 1e-30)
        hot = token_counts(ids) >= max(2.0, self.hot * n)
        levels = raise_to_ready(call, np.where((importance >= self.tau) | hot, hi, lo))
        if self.stall is not None and call.read_s is not None:
            levels = self._fit_stall(call, levels, importance, hot)
        decision = Decision(levels)
        if self.alpha > 0 and call.full is not None and call.full.shape[-1] > k:
            self._substitute(call, decision)
        return decision

    def _fit_stall(self, call: Call, levels: np.ndarray, importance: np.ndarray,
                   hot: np.ndarray) -> np.ndarray:
        """Drop the least important reads above the floor until the call's reads fit in
        ``stall`` x its compute at the ceiling (profile costs)."""
        lo = self.floor_level
        n = call.ids.shape[0]
        allowed = self.stall * call.compute_s[self.ceiling] * n

        def reads(lv):
            need = ~np.take_along_axis(call.ready[:, call.ids.reshape(-1)], lv.reshape(1, -1), 0)[0]
            costs = np.asarray(call.read_s)[lv.reshape(-1)]
            distinct = {}
            for i in np.flatnonzero(need):  # an expert read once per level, whatever its pairs
                distinct[(int(call.ids.reshape(-1)[i]), int(lv.reshape(-1)[i]))] = costs[i]
            return sum(distinct.values()), need.reshape(lv.shape)

        total, need = reads(levels)
        if total <= allowed:
            return levels
        levels = levels.copy()
        for i in np.argsort(importance, axis=None, kind="stable"):
            t, j = divmod(int(i), levels.shape[1])
            if need[t, j] and levels[t, j] > lo and not hot[t, j]:
                levels[t, j] = lo
                total, need = reads(levels)
                if total <= allowed:
                    break
        return levels

    def _substitute(self, call: Call, decision: Decision) -> None:
        substitute(call, decision, self.floor_level, self.ceiling, self.alpha)


def raise_to_ready(call: Call, levels: np.ndarray) -> np.ndarray:
    """``levels`` [N, k], except that a pair whose level is not ready but a higher one
    is runs at that one (it costs no read). Ready levels end at the policy's ceiling
    (pools exist only for its levels)."""
    ids = call.ids
    ready_now = np.take_along_axis(call.ready[:, ids.reshape(-1)], levels.reshape(1, -1), 0)
    have = call.highest_ready()[ids]
    return np.where(~ready_now.reshape(ids.shape) & (have > levels), have, levels)


def fit_pools(ids: np.ndarray, levels: np.ndarray, scores: np.ndarray | None, floor: int,
              cover: dict[int, tuple[int, ...]], capacity: dict[int, int]) -> np.ndarray:
    """``levels`` [N, k] of the pairs ``ids`` [N, k] with the pairs above ``floor`` held
    to what the pools above the floor's parts hold at once (``capacity``: part -> slots;
    ``cover``: level -> its parts): where a part needs more distinct experts than its
    slots, the experts of least value there (fewest pairs, then lowest router score in
    ``scores``) run all their pairs at the floor. Only where a pool above the floor holds
    fewer than k experts (a budget too small for one token's experts there): otherwise a
    call that does not fit is computed in groups at the levels asked for, as is a call
    whose distinct experts do not fit the floor's own pools."""
    floor_parts = set(cover[floor])
    upper = sorted(p for p in capacity if p not in floor_parts)
    if not upper or min(capacity[p] for p in upper) >= ids.shape[-1]:
        return levels
    if np.unique(ids).size > min(capacity[p] for p in floor_parts):
        return levels
    out = levels
    for p in upper:  # dropping to the floor only frees slots of the other parts
        using = np.isin(out, [lv for lv, parts in cover.items() if p in parts])
        users, counts = np.unique(ids[using], return_counts=True)
        excess = users.size - capacity[p]
        if excess <= 0:
            continue
        best = np.zeros(users.size)
        if scores is not None:
            np.maximum.at(best, np.searchsorted(users, ids[using]), scores[using])
        drop = users[np.lexsort((best, counts))[:excess]]  # least valuable first
        out = np.where(using & np.isin(ids, drop), floor, out)
    return out


def substitute(call: Call, decision: Decision, lo: int, hi: int, a: float) -> None:
    """SMoE substitution with band ``a`` (see :class:`DualRouting`) on ``decision`` in
    place: levels ``lo``..``hi`` have pools; a substitute runs at its resident level."""
    ids, levels, full = call.ids, decision.levels, call.full
    resident = call.highest_ready()
    k = ids.shape[-1]
    s = np.partition(full, -(k + 1), axis=-1)[:, -(k + 1)]  # the (k+1)-th highest score
    mine = np.take_along_axis(full, ids, -1)
    band = (mine >= s[:, None]) & (mine < (1 + a) * s[:, None])
    missing = resident[ids] < lo
    rows, cols = np.nonzero(band & missing)
    if rows.size == 0:
        return
    new_ids = ids.copy()
    usable = (resident >= lo)[None, :] & (full >= ((1 - a) * s)[:, None]) & (full < s[:, None])
    active = np.zeros_like(full, dtype=bool)
    np.put_along_axis(active, ids, True, axis=-1)
    usable &= ~active
    for t, j in zip(rows.tolist(), cols.tolist()):  # only the few unimportant misses
        candidates = np.flatnonzero(usable[t])
        if candidates.size:  # else it is loaded at the floor, as decided
            best = candidates[np.argmax(full[t, candidates])]
            usable[t, best] = False  # one pair per substitute in a token
            new_ids[t, j] = best
            levels[t, j] = min(int(resident[best]), hi)
            decision.substituted += 1
    if decision.substituted:
        decision.ids = new_ids


# Presets by name: floor offset below the load level, tau, alpha, stall budget (used
# when a profile of the store exists). The load level is the ceiling; "exact" runs
# every pair at it.
QUALITIES = {
    "exact": None,
    "high": dict(drop=1, tau=0.3, alpha=0.0, stall=None),
    # balanced substitutes nothing: at a 25% cache SMoE's band cost the trained model
    # +1-3% perplexity even at alpha 0.1 (+10-12% at 0.25) while adding no decode speed on
    # the H200 (docs/QUALITY.md, docs/BENCHMARKS.md); fast keeps it.
    "balanced": dict(drop=1, tau=0.5, alpha=0.0, stall=4.0),
    "fast": dict(drop=2, tau=0.7, alpha=0.35, stall=1.0),
    # The store's trained bit-width router (d2moe_mlx.bitrouter; ``d2moe calibrate
    # STORE --bit-router``), with SMoE substitution off unless ``alpha`` is given.
    "learned": dict(alpha=0.0),
}


def for_quality(quality: str, level: int, store=None, **overrides) -> LevelPolicy:
    """The level policy of a quality preset for a model loaded at ``level`` (the
    ceiling); ``overrides`` (tau, hot, alpha, floor) replace the preset's values.
    ``learned`` reads the trained bit-width router of ``store`` (a Store or path)."""
    if quality not in QUALITIES:
        raise ValueError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    preset = QUALITIES[quality]
    if quality == "learned":
        from .bitrouter import learned_policy

        if store is None:
            raise ValueError("quality 'learned' needs the store that holds the trained "
                             "bit-width router (store=)")
        return learned_policy(store, level, **{**preset, **overrides})
    if preset is None:
        if overrides:
            raise ValueError(f"quality 'exact' takes no options (got {', '.join(overrides)})")
        return Exact(level)
    floor = overrides.pop("floor", None)
    floor = max(0, level - preset["drop"]) if floor is None else floor
    opts = {"tau": preset["tau"], "alpha": preset["alpha"], "stall": preset["stall"], **overrides}
    return DualRouting(min(floor, level), level, **opts)
