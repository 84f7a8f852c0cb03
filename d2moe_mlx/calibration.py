"""``d2moe calibrate STORE``: train small products on a finished store, store them as extras.

The store's model runs resident (:func:`d2moe_mlx.load`) over calibration text
(the packaged text unless given), cut into sequences; the first 80% of the
sequences train, the last 20% measure. :func:`record_layers` gives, per MoE layer
of one forward pass, the decoder layer's input h_l, the MoE block's input x_l,
its router logits and routed ids (through the family adapter and
:func:`~d2moe_mlx.hooks.hooked`: no family names). Each product in
:data:`PRODUCTS` is ``train(model, train_batches, test_batches, progress) ->
(tensors, meta, summary)`` and is written as the extra of its name.

Memory: the model (resident) plus one sequence's records (seq_len x layers x
(2 d + 2 E) floats) plus what a product keeps (the predictors: layers x (d+1)^2
float64 Gram matrices, twice).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import predictor as P
from .families import family_of
from .hooks import hooked
from .moe import decoder_layers
from .store.extras import write_extra

HOLD_OUT = 0.2  # the last fifth of the text measures, never trains
SEQ_LEN = 256


class _Input(nn.Module):
    """Stands in for a decoder layer: records its input, then runs it."""

    def __init__(self, layer: nn.Module, seen: list):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name):  # the model may read its layers' attributes (layer_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._layer, name)

    def __call__(self, x, *args, **kwargs):
        self._seen.append(x)
        return self._layer(x, *args, **kwargs)  # whatever the layer returns (a tuple: gemma4)


def record_layers(model: nn.Module, ids: np.ndarray) -> dict[int, P.LayerRecord]:
    """Run ``model`` on token ids [T] (one sequence, no cache) and return, per MoE layer,
    its :class:`~d2moe_mlx.predictor.LayerRecord` (float32 numpy, one row per token)."""
    family = family_of(model)
    blocks = family.blocks(model)
    by_layer = dict(blocks)
    layers = decoder_layers(model)
    inputs: dict[int, list] = {i: [] for i, _ in blocks}
    seen: dict[int, tuple] = {}

    def make_fn(layer, block, original):
        def fn(x, indices):
            seen[layer] = (x, indices, family.router_logits(block, x))
            return original(x, indices)
        return fn

    saved = list(layers)
    try:
        for i, _ in blocks:
            layers[i] = _Input(saved[i], inputs[i])
        with hooked(blocks, family, make_fn):
            out = model(mx.array(np.asarray(ids, dtype=np.int32))[None])
            mx.eval(out, [seen[i] for i, _ in blocks], [inputs[i] for i, _ in blocks])
    finally:
        layers[:] = saved
    order = [i for i, _ in blocks]
    lazy = {}
    for n, i in enumerate(order):
        x = seen[i][0].astype(mx.float32)
        logits = seen[i][2].astype(mx.float32)
        prev = family.router_logits_for(by_layer[i], seen[order[n - 1]][0].astype(mx.float32)) \
            if n else None
        lazy[i] = (inputs[i][0].astype(mx.float32), x, logits, seen[i][1], prev)
    mx.eval(lazy)
    records = {}
    for i, (h, x, logits, inds, prev) in lazy.items():
        flat = lambda a: np.array(a).reshape(-1, a.shape[-1])  # noqa: E731
        records[i] = P.LayerRecord(flat(h), flat(x), flat(logits), flat(inds).astype(np.int64),
                                   None if prev is None else flat(prev))
    return records


def _train_predictor(model, train_batches, test_batches, progress):
    tensors, meta, report = P.train(lambda ids: record_layers(model, ids), train_batches,
                                    test_batches, progress=progress)
    return tensors, meta, report.to_json()


# name -> (train(model, train_batches, test_batches, progress) -> (tensors, meta, summary), help)
PRODUCTS: dict[str, tuple[Callable, str]] = {
    P.KEY: (_train_predictor, "next-layer expert predictors for prefetch"),
}


def token_batches(tokenizer, text: str, tokens: int | None, seq_len: int = SEQ_LEN
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, held-out) sequences of token ids from ``text`` (paragraph by paragraph, at
    most ``tokens`` in all): the last :data:`HOLD_OUT` of the sequences are held out."""
    ids = [i for part in text.split("\n\n") if part.strip() for i in tokenizer.encode(part + "\n\n")]
    if tokens is not None:
        ids = ids[:tokens]
    n = len(ids) // seq_len
    if n < 2:
        raise ValueError(f"the calibration text gives {len(ids)} tokens; need at least "
                         f"{2 * seq_len} (two sequences of {seq_len}): give a longer --text")
    seqs = [np.asarray(ids[i * seq_len:(i + 1) * seq_len], dtype=np.int32) for i in range(n)]
    test = max(1, round(n * HOLD_OUT))
    return seqs[:n - test], seqs[n - test:]


def calibrate_store(store: str | Path, text: str | None = None, tokens: int | None = None,
                    products: tuple[str, ...] = (P.KEY,), progress=None) -> dict:
    """Train ``products`` on the store's model over ``text`` (default: the packaged
    calibration text) and write each as an extra of the store; returns a summary
    per product (held-out measurements) plus ``tokens`` and ``seconds``."""
    from .convert.calibrate import default_calibration_text
    from .model import load

    unknown = [p for p in products if p not in PRODUCTS]
    if unknown:
        raise ValueError(f"unknown calibration products {unknown}; known: {', '.join(PRODUCTS)}")
    t0 = time.perf_counter()
    model, tokenizer = load(store)
    train_batches, test_batches = token_batches(
        tokenizer, default_calibration_text() if text is None else text, tokens)
    summary = {"train_tokens": sum(map(len, train_batches)),
               "test_tokens": sum(map(len, test_batches))}
    for name in products:
        train, _ = PRODUCTS[name]
        tensors, meta, result = train(model, train_batches, test_batches, progress)
        write_extra(store, name, tensors, meta)
        summary[name] = result
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def describe(store, summary: dict) -> str:
    """The summary of :func:`calibrate_store` for people: held-out recall per layer."""
    lines = [f"{store}: trained on {summary['train_tokens']} tokens, measured on "
             f"{summary['test_tokens']} held-out tokens ({summary['seconds']:.1f} s)"]
    report = summary.get(P.KEY)
    if report is not None:
        sizes = list(next(iter(report["mean"].values())))
        k = report["k"]
        lines.append(f"expert predictors (extra {P.KEY!r}): recall of the top-{k} experts with "
                     f"{' / '.join(sizes)} prefetched")
        for name, label in P.NAMES.items():
            mean = report["mean"].get(name)
            if mean is None:
                continue
            per = report["recall"][name]
            cells = "  ".join(f"L{l}: {per[l][str(k)]:.2f}" for l in per)
            lines.append(f"  {label:<40} mean {' / '.join(f'{mean[m]:.3f}' for m in sizes)}"
                         f"   (top-{k} per layer: {cells})")
    return "\n".join(lines)
