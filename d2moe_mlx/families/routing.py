"""Gating rules: router logits -> importance scores, and the block's own top-k and weights.

Each rule reproduces what one kind of mlx-lm MoE block computes from its router's
logits (tests/test_families.py checks every family against mlx-lm's block). Where
mlx-lm exposes the function (DeepSeek-V3's group selection, PhiMoE's sparsemixer),
it is called, not copied. ``scores`` are the importance of every expert (what
policies rank: softmax or sigmoid probabilities); ``route`` returns the block's
``(indices, weights)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

RULES = ("softmax_topk", "topk_softmax", "deepseek_v2", "deepseek_v3", "sparsemixer",
         "sigmoid_bias_norm", "sigmoid_bias", "mistral4", "score_bias",
         "bailing_moe", "bailing_moe_linear", "bailing_v3",
         "topk_sigmoid",  # llama4
         "softmax_bias")


@dataclass(frozen=True)
class Gating:
    """A family's gating rule with the model's constants bound (see :func:`bind`)."""

    rule: str
    top_k: int
    norm_topk: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    jitter_eps: float = 0.0
    softcap: float = 0.0  # logits -> tanh(logits / c) * c first (laguna), 0 = off
    score_function: str = "softmax"  # "sigmoid" or "softmax" scores (bailing_moe*)
    # rule "score_bias" (DeepSeek-V4.1): logits / temperature, then score_func
    # ("sqrtsoftplus", "sigmoid" or "softmax") gives the scores
    temperature: float = 1.0
    score_func: str = "sigmoid"
    # experts from this id on are zero (identity) experts the block computes
    # itself: their picks go to expert 0 with weight 0 (longcat_flash); 0 = none
    routed: int = 0

    @property
    def sigmoid(self) -> bool:
        """True where each expert's score is its own (not a softmax over all experts)."""
        if self.rule == "score_bias":
            return self.score_func != "softmax"
        return self.rule in ("deepseek_v3", "sigmoid_bias_norm", "sigmoid_bias", "bailing_v3",
                             "topk_sigmoid") \
            or (self.rule in ("bailing_moe", "bailing_moe_linear") and self.score_function == "sigmoid")

    def scores(self, logits: mx.array) -> mx.array:
        """Importance of every expert [..., E] in float32: router probabilities (with
        zero experts: the routed experts' probabilities renormalised among themselves)."""
        logits = self.capped(logits.astype(mx.float32))
        if self.routed:
            logits = logits[..., :self.routed]
        if self.rule == "score_bias":
            return self.scored(logits)
        return mx.sigmoid(logits) if self.sigmoid else mx.softmax(logits, axis=-1, precise=True)

    def scored(self, logits: mx.array) -> mx.array:
        """Rule "score_bias": ``score_func`` of the logits over the temperature, float32."""
        logits = logits.astype(mx.float32) / self.temperature
        if self.score_func == "sigmoid":
            return mx.sigmoid(logits)
        if self.score_func == "softmax":
            return mx.softmax(logits, axis=-1)
        if self.score_func == "sqrtsoftplus":
            return mx.sqrt(mx.logaddexp(logits, 0.0))
        raise ValueError(f"score function {self.score_func!r}: known are sqrtsoftplus, "
                         "sigmoid and softmax")

    def capped(self, logits: mx.array) -> mx.array:
        """The logits with the router's soft cap applied (unchanged without one)."""
        if not self.softcap:
            return logits
        return mx.tanh(logits.astype(mx.float32) / self.softcap) * self.softcap

    def route(self, logits: mx.array, correction_bias: mx.array | None = None,
              expert_factor: mx.array | None = None):
        """(indices [..., k], weights [..., k]) exactly as the family's block routes;
        ``expert_factor`` [E] (gemma4's per_expert_scale) multiplies each chosen weight."""
        inds, w = self._route(logits, correction_bias)
        return inds, (w if expert_factor is None else w * expert_factor[inds])

    def _route(self, logits: mx.array, correction_bias: mx.array | None = None):
        k = self.top_k
        logits = self.capped(logits)
        if self.rule == "softmax_topk":  # qwen2/3_moe, olmoe: top-k of the softmax
            probs = mx.softmax(logits, axis=-1, precise=True)
            inds = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
            w = mx.take_along_axis(probs, inds, axis=-1)
            return inds, (w / w.sum(axis=-1, keepdims=True) if self.norm_topk else w)
        if self.rule == "topk_softmax":  # mixtral, gpt_oss, granitemoe: softmax of the top-k logits
            inds = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
            w = mx.take_along_axis(logits, inds, axis=-1)
            return inds, mx.softmax(w.astype(mx.float32), axis=-1, precise=True)
        if self.rule == "deepseek_v2":
            probs = mx.softmax(logits, axis=-1, precise=True)
            if self.topk_method == "group_limited_greedy":
                shape = probs.shape
                grouped = probs.reshape(*shape[:-1], self.n_group, -1)
                drop = self.n_group - self.topk_group
                group_idx = mx.argpartition(grouped.max(axis=-1, keepdims=True), kth=drop - 1,
                                            axis=-2)[..., :drop, :]
                probs = mx.put_along_axis(grouped, group_idx, mx.array(0.0, probs.dtype),
                                          axis=-2).reshape(shape)
            inds = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
            return inds, mx.take_along_axis(probs, inds, axis=-1) * self.scaling
        if self.rule == "deepseek_v3":
            from mlx_lm.models.deepseek_v3 import group_expert_select

            bias = correction_bias if correction_bias is not None else mx.zeros(logits.shape[-1])
            return group_expert_select(logits, bias, k, self.n_group, self.topk_group,
                                       self.scaling, self.norm_topk)
        if self.rule == "sparsemixer":
            from mlx_lm.models.phimoe import sparsemixer

            return sparsemixer(logits, top_k=k, jitter_eps=self.jitter_eps)
        if self.rule == "sigmoid_bias_norm":  # minimax: top-k of sigmoid + bias, weights normalised
            probs = mx.sigmoid(logits.astype(mx.float32))
            chosen = probs if correction_bias is None else probs + correction_bias
            inds = mx.argpartition(-chosen, kth=k - 1, axis=-1)[..., :k]
            w = mx.take_along_axis(probs, inds, axis=-1)
            w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
            # minimax_m3_vl scales by routed_scaling_factor (minimax_m2's args lack it: 1.0)
            return inds, (w * self.scaling if self.scaling != 1.0 else w)
        if self.rule == "sigmoid_bias":  # lfm2_moe: as above, normalised if norm_topk, then scaled
            probs = mx.sigmoid(logits)
            chosen = probs if correction_bias is None else probs.astype(mx.float32) + correction_bias
            inds = mx.argpartition(-chosen, kth=k - 1, axis=-1)[..., :k]
            w = mx.take_along_axis(probs, inds, axis=-1)
            if self.norm_topk:
                w = w / (w.sum(axis=-1, keepdims=True) + 1e-6)
            return inds, w * self.scaling
        if self.rule == "mistral4":  # softmax, group-limited (top-2 sum per group), renormalised
            from mlx_lm.models.mistral4 import mistral4_expert_select

            return mistral4_expert_select(logits, k, self.n_group, self.topk_group, self.scaling,
                                          self.norm_topk)
        # softmax or sigmoid scores, correction bias, group-limited (dropped groups
        # zeroed), weights normalised if norm_topk (and k > 1), then scaled: mlx-lm's own functions
        if self.rule in ("bailing_moe", "bailing_moe_linear"):
            import importlib

            select = importlib.import_module(f"mlx_lm.models.{self.rule}").group_expert_select
            return select(logits, correction_bias, k, self.n_group, self.topk_group, self.scaling,
                          self.norm_topk, self.score_function)
        if self.rule == "bailing_v3":  # sigmoid, dropped groups -inf, always normalised, scaled
            from mlx_lm.models.bailing_moe_v3 import _group_expert_select

            bias = correction_bias if correction_bias is not None else mx.zeros(logits.shape[-1])
            return _group_expert_select(logits.astype(mx.float32), bias, k, self.n_group,
                                        self.topk_group, self.scaling)
        if self.rule == "score_bias":  # deepseek_v41: top-k of scores + bias, weights from scores
            probs = self.scored(logits)
            chosen = probs if correction_bias is None else probs + correction_bias
            inds = mx.argpartition(-chosen, kth=k - 1, axis=-1)[..., :k]
            w = mx.take_along_axis(probs, inds, axis=-1)
            if self.norm_topk and k > 1:
                w = w / (mx.sum(w, axis=-1, keepdims=True) + 1e-20)
            return inds, w * self.scaling
        if self.rule == "topk_sigmoid":  # llama4: sigmoid of the top-k logits
            inds = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
            return inds, mx.sigmoid(mx.take_along_axis(logits, inds, axis=-1).astype(mx.float32))
        if self.rule == "softmax_bias":  # top-k of softmax + bias, zero experts to 0
            probs = mx.softmax(logits, axis=-1)
            chosen = probs if correction_bias is None else probs + correction_bias
            inds = mx.argpartition(-chosen, kth=k - 1, axis=-1)[..., :k]
            w = mx.take_along_axis(probs, inds, axis=-1)
            if self.norm_topk:
                w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
            w = w * self.scaling
            if self.routed:
                zero = inds >= self.routed
                inds, w = mx.where(zero, 0, inds), mx.where(zero, 0.0, w)
            return inds, w
        raise ValueError(f"unknown gating rule {self.rule!r}; known: {', '.join(RULES)}")


def bind(rule: str, args, keys: dict[str, str], const: dict | None = None) -> Gating:
    """The :class:`Gating` of ``rule`` with constants read from mlx-lm's ModelArgs
    ``args`` under the attribute names ``keys`` (field -> attribute); ``const``
    (field -> value) are constants the family's block hard-codes."""
    if rule not in RULES:
        raise ValueError(f"unknown gating rule {rule!r}; known: {', '.join(RULES)}")
    values = {}
    for field, attr in keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            values[field] = value
    values.update(const or {})
    if "top_k" not in values:
        raise ValueError(f"{type(args).__module__}: the model's arguments have no "
                         f"{keys.get('top_k')!r} (experts per token)")
    return Gating(rule, **values)
