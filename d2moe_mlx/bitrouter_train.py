"""Training D²MoE's bit-width router (:mod:`d2moe_mlx.bitrouter`) with MLX on calibration text.

The model is loaded resident with a pool for every level the router chooses from
and frozen. While training, each MoE block's experts are a hook
(:func:`d2moe_mlx.hooks.hooked`) around the engine's own expert layer, so routing,
gate weights and shared experts stay the model's: the teacher computes every pair
at the top level; the student computes each pair at every level and mixes the
outputs with the router's probabilities, ``sum_l p_l * expert_l(x)``. The loss is
the KL divergence from the teacher's next-token distribution to the student's, plus
``alpha`` x the expected stored bits of a pair (scales included, as a fraction of
the top level's),
plus a penalty on each level's share of pairs above its capacity. Only the router's
weights train (Adam); everything is MLX.

:func:`evaluate` measures a level policy through the real engine (hard decisions,
teacher forcing) against the top level: KL, perplexity, greedy agreement, mean bits
and level mix. :func:`train_and_store` trains, evaluates on held-out text and keeps
the router in the store; ``d2moe calibrate STORE --bit-router`` calls it.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .bitrouter import FEATURES, LearnedRouting, features, save_bit_router
from .engine import engine_of
from .hooks import hooked
from .levels import Exact, LevelPolicy


class BitRouter(nn.Module):
    """The trainable router: ``weight`` [layers, E, F, L], ``bias`` [layers, E, L].

    ``hidden`` > 0 adds ``hidden_weight`` [layers, E, hidden, L] on the token's hidden
    state (training-side experiment only: the runtime policy sees router scores, not
    hidden states; docs/BIT_ROUTER.md compares the two)."""

    def __init__(self, layers: int, experts: int, levels: int, top_bias: float = 0.0,
                 hidden: int = 0):
        super().__init__()
        self.weight = mx.zeros((layers, experts, len(FEATURES), levels))
        bias = np.zeros((layers, experts, levels), dtype=np.float32)
        bias[..., -1] = top_bias  # start leaning to the top level (0: uniform)
        self.bias = mx.array(bias)
        if hidden:
            self.hidden_weight = mx.zeros((layers, experts, hidden, levels))

    def logits(self, i: int, ids: mx.array, scores: mx.array, full: mx.array,
               x: mx.array | None = None) -> mx.array:
        """Level logits [N, k, L] of layer ``i``'s pairs ``ids`` [N, k] (``x`` [N, H]:
        the tokens' hidden states, used when the router has ``hidden_weight``)."""
        feats = features(scores, full, mx)
        w = self.weight[i][ids]  # [N, k, F, L]
        z = (feats[..., None, :] @ w).squeeze(-2) + self.bias[i][ids]
        if "hidden_weight" in self and x is not None:
            z = z + (x[:, None, None, :] @ self.hidden_weight[i][ids]).squeeze(-2)
        return z


def text_tokens(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text``, paragraph by paragraph (as the converter's calibration)."""
    return np.asarray([i for part in text.split("\n\n") if part.strip()
                       for i in tokenizer.encode(part + "\n\n")], dtype=np.int32)


def split_sequences(ids: np.ndarray, seq_len: int, held_out: float = 0.2
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(train [B, seq_len], held-out [B', seq_len]): the first ``1 - held_out`` of the
    tokens and the rest, each cut into whole sequences."""
    cut = int(len(ids) * (1 - held_out))
    train, test = ids[:cut], ids[cut:]
    if len(train) < seq_len or len(test) < seq_len:
        raise ValueError(f"{len(ids)} tokens of text are too few for sequences of {seq_len} "
                         f"with {held_out:.0%} held out; give more text or a shorter seq_len")
    return (train[: len(train) // seq_len * seq_len].reshape(-1, seq_len),
            test[: len(test) // seq_len * seq_len].reshape(-1, seq_len))


class _Mixer:
    """The hooks' state: teacher (top level) or student (router mixture) mode, and the
    level probabilities of the student's pairs in this forward pass."""

    def __init__(self, model: nn.Module, router: BitRouter, levels: list[int]):
        self.engine = engine_of(model)
        self.blocks = self.engine.family.blocks(model)
        self.index = {layer: i for i, (layer, _) in enumerate(self.blocks)}
        self.router, self.levels = router, levels
        self.teacher = False
        self.hard = False  # one level per pair (the argmax), as the runtime policy decides
        self.probs: list[mx.array] = []

    def _at(self, el, x: mx.array, inds: mx.array, level: int) -> mx.array:
        pools = el.cache.pools
        return el.compute(x, [(pools[p], pools[p].indices(inds))
                              for p in self.engine.layout.cover(level)])

    def make_fn(self, layer: int, block, el):
        i = self.index[layer]

        def fn(x: mx.array, inds: mx.array) -> mx.array:
            if self.teacher:
                return self._at(el, x, inds, self.levels[-1])
            k = inds.shape[-1]
            full = mx.stop_gradient(el.scores(x)).reshape(-1, self.engine.store.num_experts)
            ids = inds.reshape(-1, k)
            z = self.router.logits(i, ids, mx.take_along_axis(full, ids, -1), full,
                                   mx.stop_gradient(x.reshape(-1, x.shape[-1])))
            if self.hard:
                p = (mx.arange(len(self.levels)) == z.argmax(-1, keepdims=True)).astype(x.dtype)
            else:
                p = mx.softmax(z, axis=-1)
            self.probs.append(p.reshape(-1, len(self.levels)))
            y = None
            for j, level in enumerate(self.levels):
                part = self._at(el, x, inds, level) * p[..., j].reshape(*inds.shape, 1)
                y = part if y is None else y + part
            return y

        return fn


def train_router(model: nn.Module, train: np.ndarray, levels: list[int], *, alpha: float = 0.5,
                 steps: int = 200, batch: int = 8, lr: float = 0.05,
                 capacities: list[float] | None = None, capacity_weight: float = 10.0,
                 top_bias: float = 0.0, hidden: bool = False, seed: int = 0,
                 progress: Callable[[int, int], object] | None = None
                 ) -> tuple[BitRouter, list[dict]]:
    """Train a router for ``levels`` (ascending) on sequences ``train`` [B, T] of a
    resident d2moe ``model`` whose pools hold every one of them; returns the router and
    each step's ``loss``, ``kl``, ``bits`` (expected, fraction of the top's) and
    ``share`` (per level)."""
    engine = engine_of(model)
    spec = engine.spec
    bits = mx.array([spec.stored_bits(lv) for lv in levels], dtype=mx.float32) / spec.stored_bits(levels[-1])
    caps = mx.array(capacities if capacities is not None else [1.0] * len(levels), dtype=mx.float32)
    if caps.shape != (len(levels),):
        raise ValueError(f"capacities need one share per level ({len(levels)}), got {capacities}")
    mx.random.seed(seed)
    size = engine.store.config["hidden_size"] if hidden else 0  # any family's name for it
    router = BitRouter(len(engine.layers), engine.store.num_experts, len(levels), top_bias, size)
    mixer = _Mixer(model, router, levels)
    model.freeze()
    rng = np.random.default_rng(seed)

    def loss_fn(tokens, target):
        mixer.probs = []
        logp = nn.log_softmax(model(tokens).astype(mx.float32), axis=-1)
        kl = (mx.exp(target) * (target - logp)).sum(axis=-1).mean()
        probs = mx.concatenate(mixer.probs, axis=0)
        share = probs.mean(axis=0)
        expected = (probs @ bits).mean()
        over = mx.maximum(share - caps, 0.0)
        loss = kl + alpha * expected + capacity_weight * (over * over).sum()
        return loss, kl, expected, share

    step_fn = nn.value_and_grad(router, loss_fn)
    opt = optim.Adam(learning_rate=lr)
    history = []
    with hooked(mixer.blocks, engine.family, mixer.make_fn):
        for step in range(steps):
            tokens = mx.array(train[rng.choice(len(train), size=min(batch, len(train)), replace=False)])
            mixer.teacher = True
            target = mx.stop_gradient(nn.log_softmax(model(tokens).astype(mx.float32), axis=-1))
            mixer.teacher = False
            (loss, kl, expected, share), grads = step_fn(tokens, target)
            opt.update(router, grads)
            mx.eval(router.parameters(), opt.state, loss, kl, expected, share)
            history.append(dict(loss=loss.item(), kl=kl.item(), bits=expected.item(),
                                share=np.array(share).tolist()))
            if progress is not None:
                progress(step + 1, steps)
    return router, history


def evaluate_hooked(model: nn.Module, router: BitRouter, levels: list[int], sequences: np.ndarray,
                    chunk: int = 8) -> dict:
    """Held-out ``kl`` to the top level and mean ``bits`` per pair of ``router``'s hard
    decisions computed inside the training hooks (so a router on hidden states, which
    no runtime policy runs, can be compared with one on scores)."""
    engine = engine_of(model)
    mixer = _Mixer(model, router, levels)
    bits = np.array([engine.spec.level_bits(lv) for lv in levels], dtype=np.float64)
    kl, n, used = 0.0, 0, np.zeros(len(levels))
    with hooked(mixer.blocks, engine.family, mixer.make_fn):
        for start in range(0, len(sequences), chunk):
            tokens = mx.array(sequences[start:start + chunk])
            mixer.teacher = True
            ref = nn.log_softmax(model(tokens).astype(mx.float32), axis=-1)
            mixer.teacher, mixer.hard, mixer.probs = False, True, []
            logp = nn.log_softmax(model(tokens).astype(mx.float32), axis=-1)
            kl += float((mx.exp(ref) * (ref - logp)).sum(axis=-1).sum())
            used += np.array(mx.concatenate(mixer.probs).sum(axis=0))
            n += tokens.size
    return dict(kl=kl / n, bits=float(used @ bits / used.sum()), mix=(used / used.sum()).tolist())


def router_policy(router: BitRouter, model: nn.Module, levels: list[int], **options) -> LearnedRouting:
    """The runtime policy of a trained router (numpy copies of its weights)."""
    layers = sorted(engine_of(model).layers)
    return LearnedRouting(np.array(router.weight), np.array(router.bias), layers, levels, **options)


def evaluate(model: nn.Module, policy: LevelPolicy, sequences: np.ndarray,
             reference: list[mx.array] | None = None, chunk: int = 8) -> tuple[dict, list[mx.array]]:
    """Teacher-forced quality of ``policy`` through the model's engine on ``sequences``
    [B, T], against ``reference`` log-probabilities (default: the policy's own, i.e.
    this is the reference run). Returns (metrics, this run's log-probabilities):
    ``kl`` (mean over tokens, reference -> policy), ``ppl``, ``agree`` (greedy
    next-token agreement), ``bits`` (mean level bits per pair; ``stored_bits`` with
    scales and biases), ``mix`` (pair share
    per level), ``substituted`` (share of pairs)."""
    engine = engine_of(model)
    previous = engine.policy
    engine.set_policy(policy)
    before = engine.stats.snapshot()
    outs, nll, kl, agree, n = [], 0.0, 0.0, 0.0, 0
    try:
        for c, start in enumerate(range(0, len(sequences), chunk)):
            tokens = mx.array(sequences[start:start + chunk])
            logp = nn.log_softmax(model(tokens).astype(mx.float32), axis=-1)
            ref = logp if reference is None else reference[c]
            nll += float(-mx.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).sum())
            kl += float((mx.exp(ref) * (ref - logp)).sum(axis=-1).sum())
            agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
            n += tokens.size
            outs.append(logp)
    finally:
        engine.set_policy(previous)
    stats = engine.stats.delta(before)
    mix = stats.level_mix
    spec = engine.spec
    pairs = sum(stats.pairs.values())
    predicted = len(sequences) * (sequences.shape[1] - 1)
    return (dict(kl=kl / n, ppl=math.exp(nll / predicted), agree=agree / n,
                 bits=sum(spec.level_bits(lv) * s for lv, s in mix.items()),
                 stored_bits=sum(spec.stored_bits(lv) * s for lv, s in mix.items()),
                 mix={int(lv): s for lv, s in mix.items() if s > 0},
                 substituted=stats.substituted / pairs if pairs else 0.0), outs)


def train_and_store(store, text: str | None = None, alpha: float = 0.03, steps: int = 100,
                    progress: Callable[[int, int], object] | None = None, *, floor: int = 0,
                    seq_len: int = 64, batch: int = 4, lr: float = 0.05,
                    capacities: list[float] | None = None, held_out: float = 0.2,
                    seed: int = 0) -> dict:
    """Train the bit-width router of the store at ``store`` (a path) for levels
    ``floor``..top on ``text`` (default: the packaged calibration text), hold out its
    last ``held_out`` share for evaluation, and keep the router in the store (extra
    ``bit_router``). Returns the metrics: training loss (first and last steps), and on
    the held-out text the learned policy's KL to the top level, perplexity (and the
    top level's), greedy agreement, mean bits per pair and level mix. ``alpha`` trades
    bits for quality (docs/BIT_ROUTER.md: 0.005 / 0.03 / 0.2 gave 7.3 / 5.4 / 3.8 bits
    per pair on the tiny model); each step runs the model twice (teacher, and student at
    every level with a backward pass) on ``batch`` x ``seq_len`` tokens."""
    from .convert.calibrate import default_calibration_text
    from .model import load

    t0 = time.perf_counter()
    model, tokenizer = load(store, quality="high", quality_options={"floor": floor, "alpha": 0.0})
    engine = engine_of(model)
    try:
        top = engine.spec.num_levels - 1
        if not 0 <= floor <= top:
            raise ValueError(f"floor {floor} is not a level of {engine.store.path} (0..{top})")
        levels = list(range(floor, top + 1))
        ids = text_tokens(tokenizer, text if text is not None else default_calibration_text())
        train, test = split_sequences(ids, seq_len, held_out)
        router, history = train_router(model, train, levels, alpha=alpha, steps=steps,
                                       batch=batch, lr=lr, capacities=capacities, seed=seed,
                                       progress=progress)
        policy = router_policy(router, model, levels)
        ref, ref_logp = evaluate(model, Exact(top), test)
        got, _ = evaluate(model, policy, test, ref_logp)
        first = float(np.mean([h["loss"] for h in history[:5]]))
        last = float(np.mean([h["loss"] for h in history[-5:]]))
        metrics = dict(alpha=alpha, steps=steps, seq_len=seq_len, batch=batch, lr=lr,
                       train_tokens=int(train.size), held_out_tokens=int(test.size),
                       loss_first=first, loss_last=last, held_out=got, top_ppl=ref["ppl"],
                       seconds=time.perf_counter() - t0)
        save_bit_router(engine.store, dict(weight=np.array(router.weight), bias=np.array(router.bias),
                                           layers=np.array(sorted(engine.layers))),
                        dict(levels=levels, bits=[engine.spec.level_bits(lv) for lv in levels],
                             alpha=alpha, capacities=capacities, metrics=metrics))
        return metrics
    finally:
        engine.close()
