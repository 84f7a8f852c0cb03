"""D²MoE's trainable bit-width router: a tiny router per expert picks each pair's level.

For every MoE layer and expert ``e`` the router is a linear map from a few features
of a (token, expert) pair to logits over the levels it was trained for
(``weight`` [layers, E, F, L], ``bias`` [layers, E, L]). The features come from the
expert router's probabilities only (:func:`features`: the pair's score, its log,
its score relative to the token's top expert, its rank among the token's k, the
token's top score and the entropy of its routing), which the scheduler already
reads back in its per-layer sync when a policy ``needs_scores``: the learned
policy costs no device work beyond the dual-routing presets, and deciding is a
gather and a small einsum in numpy.

The router is trained by :mod:`d2moe_mlx.bitrouter_train` and kept in the store as
the extra ``bit_router`` (:func:`save_bit_router` / :func:`load_bit_router`);
:class:`LearnedRouting` is the level policy that runs it (``quality="learned"``).
"""

from __future__ import annotations

import numpy as np

from .levels import Call, Decision, LevelPolicy, raise_to_ready, substitute
from .store.extras import read_extra, write_extra
from .store.format import StoreError

KEY = "bit_router"
FEATURES = ("score", "log_score", "relative", "rank", "top_score", "entropy")
_EPS = 1e-6


def features(scores, full, xp=np):
    """Features [N, k, F] (float32) of each pair from its router probability ``scores``
    [N, k] and the token's probabilities of every expert ``full`` [N, E]. ``xp`` is
    ``numpy`` (the policy) or ``mlx.core`` (training): the same maths in both."""
    f32 = np.float32 if xp is np else xp.float32
    scores, full = scores.astype(f32), full.astype(f32)
    k, e = scores.shape[-1], full.shape[-1]
    top = full.max(axis=-1, keepdims=True)
    rank = (scores[..., None, :] > scores[..., :, None]).sum(axis=-1).astype(f32) / max(k - 1, 1)
    entropy = -(full * xp.log(xp.maximum(full, _EPS))).sum(axis=-1, keepdims=True) / np.log(e)
    cols = [scores, xp.log(xp.maximum(scores, _EPS)), scores / xp.maximum(top, _EPS), rank,
            xp.broadcast_to(top, scores.shape), xp.broadcast_to(entropy, scores.shape)]
    return xp.stack(cols, axis=-1)


def router_logits_np(weight: np.ndarray, bias: np.ndarray, ids: np.ndarray,
                     feats: np.ndarray) -> np.ndarray:
    """Level logits [N, k, L] of one layer's router (``weight`` [E, F, L], ``bias``
    [E, L]) for pairs ``ids`` [N, k] with features [N, k, F]."""
    return np.einsum("nkf,nkfl->nkl", feats, weight[ids]) + bias[ids]


class LearnedRouting(LevelPolicy):
    """Levels from a trained bit-width router (the argmax of its level logits per
    pair), clipped to ``floor``..``ceiling``; a pair whose level is not ready but a
    higher one is runs at that one (no read). ``alpha`` > 0 adds SMoE substitution
    exactly as :class:`~d2moe_mlx.levels.DualRouting` does it."""

    needs_scores = True

    def __init__(self, weight: np.ndarray, bias: np.ndarray, layers, levels, *,
                 ceiling: int | None = None, floor: int | None = None, alpha: float = 0.0):
        weight, bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
        levels = np.asarray(levels, dtype=np.int64)
        if weight.ndim != 4 or bias.shape != (*weight.shape[:2], weight.shape[3]) \
                or weight.shape[0] != len(layers) or weight.shape[2] != len(FEATURES) \
                or weight.shape[3] != len(levels):
            raise ValueError(f"bit-width router of shapes weight {weight.shape}, bias {bias.shape} "
                             f"does not fit {len(layers)} layers, {len(FEATURES)} features and "
                             f"levels {levels.tolist()}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        hi = int(levels.max()) if ceiling is None else int(ceiling)
        lo = min(int(levels.min()), hi) if floor is None else int(floor)
        if not 0 <= lo <= hi:
            raise ValueError(f"need 0 <= floor <= ceiling, got floor {lo}, ceiling {hi}")
        self._levels = np.clip(levels, lo, hi)  # router output -> level
        self._index = {int(layer): i for i, layer in enumerate(layers)}
        self.weight, self.bias = weight, bias
        self.floor_level, self.ceiling, self.alpha = lo, hi, float(alpha)

    @property
    def levels_used(self) -> tuple[int, ...]:
        return tuple(sorted(set(self._levels.tolist())))

    def __repr__(self) -> str:
        return (f"LearnedRouting(levels={self.levels_used}, layers={len(self._index)}, "
                f"alpha={self.alpha})")

    def decide(self, call: Call) -> Decision:
        i = self._index.get(call.layer)
        if i is None:
            raise ValueError(f"the bit-width router has no layer {call.layer} (it has "
                             f"{sorted(self._index)}); train it again for this store")
        z = router_logits_np(self.weight[i], self.bias[i], call.ids,
                             features(call.scores, call.full, np))
        decision = Decision(raise_to_ready(call, self._levels[z.argmax(axis=-1)]))
        if self.alpha > 0 and call.full is not None and call.full.shape[-1] > call.ids.shape[-1]:
            substitute(call, decision, self.floor_level, self.ceiling, self.alpha)
        return decision


def save_bit_router(store, weights: dict[str, np.ndarray], meta: dict) -> None:
    """Keep a trained router in ``store`` (a Store or its path): ``weights`` holds
    ``weight`` [layers, E, F, L], ``bias`` [layers, E, L] and ``layers`` [layers];
    ``meta`` at least ``levels`` (the L levels, ascending)."""
    if "levels" not in meta:
        raise ValueError("bit-width router meta needs 'levels'")
    missing = {"weight", "bias", "layers"} - set(weights)
    if missing:
        raise ValueError(f"bit-width router weights need {sorted(missing)}")
    tensors = {"weight": np.asarray(weights["weight"], np.float32),
               "bias": np.asarray(weights["bias"], np.float32),
               "layers": np.asarray(weights["layers"], np.int32)}
    write_extra(store, KEY, tensors, {"features": list(FEATURES), **meta})


def load_bit_router(store) -> tuple[dict[str, np.ndarray], dict] | None:
    """(weights, meta) of the store's trained router, or None when it has none."""
    found = read_extra(store, KEY)
    if found is None:
        return None
    weights, meta = found
    if tuple(meta.get("features", ())) != FEATURES or not {"weight", "bias", "layers"} <= set(weights):
        raise StoreError(f"{getattr(store, 'path', store)}: its bit-width router was made with "
                         "other features or is incomplete; train it again "
                         "(d2moe calibrate STORE --bit-router)")
    return weights, meta


def learned_policy(store, level: int, alpha: float = 0.0, floor: int | None = None,
                   **unknown) -> LearnedRouting:
    """The :class:`LearnedRouting` of ``store``'s trained router for a model loaded at
    ``level`` (its ceiling); ValueError when the store has no router."""
    if unknown:
        raise ValueError(f"quality 'learned' takes the options alpha and floor, not "
                         f"{', '.join(unknown)}")
    path = getattr(store, "path", store)
    found = load_bit_router(store)
    if found is None:
        raise ValueError(f"store {path} has no trained bit-width router; run "
                         f"`d2moe calibrate {path} --bit-router`")
    weights, meta = found
    if floor is not None and floor > level:
        floor = level
    return LearnedRouting(weights["weight"], weights["bias"], weights["layers"].tolist(),
                          meta["levels"], ceiling=min(level, max(meta["levels"])), floor=floor,
                          alpha=alpha)
