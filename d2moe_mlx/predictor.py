"""Expert predictors: which experts layer l will route to, known one MoE layer early.

A linear map per MoE layer l (all but the first) from the input of the MoE layer
before it, x_{l-1} (what that layer's router sees), to layer l's router logits,
fitted by ridge regression in closed form over calibration tokens. At run time the
scheduler evaluates it lazily in the same ``mx.eval`` as layer l-1's router ids
(the one sync per MoE layer: no extra one) and prefetches its top experts.

The fit keeps only sufficient statistics (A^T A and A^T Y per layer, A = [x, 1]),
so memory is ``layers x (d+1) x (d+1+E) x 8`` bytes whatever the token count.
For reference the paper's variant (arXiv 2511.10676: a predictor on the layer's
own pre-attention input h_l, which would need a sync of its own at run time) is
fitted and measured the same way, and so is today's prefetch: layer l's own
router applied to x_{l-1}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .store.format import StoreError

KEY = "predictor"  # the store extra holding the predictors
KIND = "linear_prev_moe_input"
DEFAULT_ALPHA = 1e-3  # ridge penalty, relative to the mean feature energy


class Ridge:
    """Ridge regression Y ~ X W + b in closed form, from statistics added in chunks."""

    def __init__(self, dim: int, outputs: int):
        self.gram = np.zeros((dim + 1, dim + 1))
        self.cross = np.zeros((dim + 1, outputs))
        self.count = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add rows ``x`` [N, dim] with targets ``y`` [N, outputs]."""
        a = np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)
        self.gram += a.T @ a
        self.cross += a.T @ y.astype(np.float64)
        self.count += len(x)

    def solve(self, alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
        """(W [dim, outputs], b [outputs]) minimising |XW + b - Y|^2 + lam |W|^2 with
        lam = alpha * mean(diag(X^T X)) (the bias is not penalised)."""
        if self.count == 0:
            raise ValueError("ridge regression needs at least one row")
        d = self.gram.shape[0] - 1
        lam = alpha * float(np.trace(self.gram[:d, :d])) / max(d, 1)
        reg = self.gram.copy()
        reg[np.arange(d), np.arange(d)] += lam
        sol = np.linalg.lstsq(reg, self.cross, rcond=None)[0]  # (singular when alpha = 0)
        return sol[:d].astype(np.float32), sol[d].astype(np.float32)


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """One-shot :class:`Ridge` fit of ``y`` [N, E] on ``x`` [N, d]."""
    r = Ridge(x.shape[1], y.shape[1])
    r.add(x, y)
    return r.solve(alpha)


def recall_at(scores: np.ndarray, true_ids: np.ndarray, m: int) -> float:
    """Mean over tokens of |top-m(scores) ∩ true ids| / k (``true_ids`` [N, k])."""
    k = true_ids.shape[-1]
    m = min(m, scores.shape[-1])
    top = np.argpartition(-scores, m - 1, axis=-1)[:, :m]
    hits = (top[:, :, None] == true_ids[:, None, :]).any(axis=1).sum(axis=-1)
    return float(hits.mean() / k) if len(hits) else 0.0


def prefetch_sizes(k: int, num_experts: int) -> list[int]:
    """The prefetch set sizes recall is reported for: k, k+2 and 2k (within E)."""
    return sorted({min(m, num_experts) for m in (k, k + 2, 2 * k)})


# -- training -----------------------------------------------------------------------------
@dataclass
class LayerRecord:
    """What one forward pass showed of one MoE layer (numpy, float32)."""

    h: np.ndarray  # [N, d] the decoder layer's input (pre-attention residual stream)
    x: np.ndarray  # [N, d] the MoE block's input (what its router sees)
    logits: np.ndarray  # [N, E] the router's logits
    ids: np.ndarray  # [N, k] the experts the block routed to
    gate_prev: np.ndarray | None = None  # [N, E] this layer's router on the previous MoE input


@dataclass
class Report:
    """Held-out recall per predictor and layer: {name: {layer: {m: recall}}}."""

    k: int
    num_experts: int
    train_tokens: int
    test_tokens: int
    recall: dict = field(default_factory=dict)

    def mean(self, name: str, m: int) -> float:
        rows = [r[m] for r in self.recall.get(name, {}).values()]
        return float(np.mean(rows)) if rows else 0.0

    def to_json(self) -> dict:
        return {"k": self.k, "num_experts": self.num_experts, "train_tokens": self.train_tokens,
                "test_tokens": self.test_tokens,
                "recall": {n: {str(l): {str(m): round(v, 4) for m, v in r.items()}
                               for l, r in per.items()} for n, per in self.recall.items()},
                "mean": {n: {str(m): round(self.mean(n, m), 4)
                             for m in prefetch_sizes(self.k, self.num_experts)}
                         for n in self.recall}}


NAMES = {"predictor": "linear on x_{l-1} (used)", "router": "layer l's router on x_{l-1} (today)",
         "pre_attention": "linear on h_l (paper; needs a sync)"}


def train(records, train_batches, test_batches, alpha: float = DEFAULT_ALPHA,
          progress=None) -> tuple[dict[str, np.ndarray], dict, Report]:
    """Fit the predictors from ``records(ids) -> {layer: LayerRecord}`` over the
    ``train_batches`` (token id arrays) and measure them on ``test_batches``.
    Returns (tensors, meta, report) for the store extra :data:`KEY`."""
    total = len(train_batches) + len(test_batches)
    fits: dict[tuple[str, int], Ridge] = {}
    layers, n_train = None, 0
    for i, ids in enumerate(train_batches):
        rec = records(ids)
        layers = sorted(rec)
        for prev, layer in zip(layers, layers[1:]):
            _ridge(fits, "predictor", layer, rec[prev].x, rec[layer]).add(rec[prev].x, rec[layer].logits)
        for layer in layers[1:]:  # (the first layer has no predictor to compare with)
            _ridge(fits, "pre_attention", layer, rec[layer].h, rec[layer]).add(rec[layer].h, rec[layer].logits)
        n_train += len(rec[layers[0]].ids)
        if progress:
            progress(i + 1, total)
    if layers is None or len(layers) < 2:
        raise ValueError("predictors need training tokens and a model with at least two MoE layers")
    weights = {key: r.solve(alpha) for key, r in fits.items()}
    some = next(iter(weights.values()))[0]
    k = None
    hits: dict[tuple[str, int, int], list[float]] = {}
    n_test = 0
    for i, ids in enumerate(test_batches):
        rec = records(ids)
        k = rec[layers[0]].ids.shape[-1]
        sizes = prefetch_sizes(k, some.shape[1])
        for prev, layer in zip(layers, layers[1:]):
            truth = rec[layer].ids
            w, b = weights[("predictor", layer)]
            scored = {"predictor": rec[prev].x @ w + b, "router": rec[layer].gate_prev}
            w, b = weights[("pre_attention", layer)]
            scored["pre_attention"] = rec[layer].h @ w + b
            for name, s in scored.items():
                for m in sizes:
                    hits.setdefault((name, layer, m), []).append(recall_at(s, truth, m) * len(truth))
        n_test += len(rec[layers[0]].ids)
        if progress:
            progress(len(train_batches) + i + 1, total)
    if k is None:
        raise ValueError("predictors need held-out tokens to be measured")
    report = Report(k, some.shape[1], n_train, n_test)
    for (name, layer, m), v in sorted(hits.items()):
        report.recall.setdefault(name, {}).setdefault(layer, {})[m] = sum(v) / n_test
    tensors = {}
    for layer in layers[1:]:
        w, b = weights[("predictor", layer)]
        tensors[f"layer{layer}.weight"] = w
        tensors[f"layer{layer}.bias"] = b
    meta = {"kind": KIND, "layers": layers[1:], "sources": dict(zip(map(str, layers[1:]), layers)),
            "alpha": alpha, "hidden": int(some.shape[0]), "num_experts": int(some.shape[1]),
            "prefetch": k, "report": report.to_json()}
    return tensors, meta, report


def _ridge(fits: dict, name: str, layer: int, x: np.ndarray, rec: LayerRecord) -> Ridge:
    key = (name, layer)
    if key not in fits:
        fits[key] = Ridge(x.shape[1], rec.logits.shape[1])
    return fits[key]


# -- run time -----------------------------------------------------------------------------
class LinearPredictor:
    """``predict(layer, x)``: layer's predicted router logits from the input ``x`` of the
    MoE layer before it (lazy MLX; the scheduler evaluates it in its one sync)."""

    def __init__(self, weights: dict[int, tuple[mx.array, mx.array]]):
        self.weights = weights

    def __call__(self, layer: int, x: mx.array) -> mx.array:
        w, b = self.weights[layer]
        return x.astype(w.dtype) @ w + b


def from_extra(tensors: dict[str, np.ndarray], meta: dict, moe_layers: list[int], hidden: int,
               num_experts: int, where: str) -> tuple[LinearPredictor, int]:
    """The runtime predictor of a store's extra, checked against the model:
    (predictor, experts to prefetch per layer). StoreError naming ``where`` if it does
    not fit."""
    hint = "re-run d2moe calibrate on the store"
    if meta.get("kind") != KIND:
        raise StoreError(f"{where}: predictor kind {meta.get('kind')!r} is not {KIND!r}; {hint}")
    want = list(moe_layers[1:])
    if meta.get("layers") != want:
        raise StoreError(f"{where}: predictors for layers {meta.get('layers')!r}, the model's MoE "
                         f"layers after the first are {want}; {hint}")
    weights = {}
    for layer in want:
        w, b = tensors.get(f"layer{layer}.weight"), tensors.get(f"layer{layer}.bias")
        if w is None or b is None or w.shape != (hidden, num_experts) or b.shape != (num_experts,):
            got = None if w is None or b is None else (w.shape, b.shape)
            raise StoreError(f"{where}: layer {layer}'s predictor should be weight "
                             f"{(hidden, num_experts)} and bias {(num_experts,)}, got {got}; {hint}")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise StoreError(f"{where}: layer {layer}'s predictor holds NaN or inf; {hint}")
        weights[layer] = (mx.array(w.astype(np.float32)), mx.array(b.astype(np.float32)))
    top = meta.get("prefetch")
    if type(top) is not int or not 1 <= top <= num_experts:
        raise StoreError(f"{where}: prefetch {top!r} must be an int in 1..{num_experts}; {hint}")
    return LinearPredictor(weights), top


def install(engine) -> bool:
    """Let ``engine``'s prefetch use the store's predictors when it has them; returns
    whether it does (without them the prefetch runs each layer's router on the input
    of the layer before)."""
    from .store.extras import read_extra

    found = read_extra(engine.store, KEY)
    if found is None:
        return False
    tensors, meta = found
    entry = engine.store.manifest["extras"][KEY]
    predictor, top = from_extra(tensors, meta, sorted(engine.layers), _hidden(engine),
                                engine.store.num_experts, str(engine.store.path / entry["file"]))
    engine.scheduler.predict = predictor
    engine.scheduler.prefetch_top = top
    return True


def _hidden(engine) -> int:
    """The model's hidden size (config), else the input width of the experts' first projection."""
    hidden = engine.store.config.get("hidden_size")
    if type(hidden) is int:
        return hidden
    proj = next(iter(engine.store.manifest["projections"].values()))
    return int(proj["shape"][1])

