"""Record which experts an mlx-lm MoE model routes each token to.

``record_trace`` runs a model over text and stores, per MoE layer and token, the
top-k expert ids the block dispatched and their router probabilities. It finds
the MoE blocks with the model's family adapter (:mod:`d2moe_mlx.families`) and
hooks their experts with :func:`d2moe_mlx.hooks.hooked` for the run (restored
afterwards, also on error). No mlx-lm model code is copied: mlx-lm's own model,
or ours (whose experts are an engine layer), works.
"""

import json
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .families import family_of, text_args
from .hooks import hooked

FORMAT = "d2moe-trace/1"


def _run(model, tokens: list[int], chunk: int):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for s in range(0, len(tokens), chunk):
        yield model(mx.array(tokens[s:s + chunk])[None], cache=cache)


def _order(ids: np.ndarray, scores: np.ndarray):
    """Flatten to [n, k]; ids and scores highest score first."""
    ids = ids.reshape(-1, ids.shape[-1]).astype(np.int64)
    scores = scores.reshape(-1, scores.shape[-1])
    order = np.argsort(-scores, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(scores, order, -1)


def record_trace(model: nn.Module, tokenizer: Any, text: str,
                 out_path: Optional[Union[str, Path]] = None,
                 max_tokens: Optional[int] = None, chunk: int = 512) -> dict:
    """Run ``model`` over ``text`` and record its routing, one row per token.

    Args:
        model: an mlx-lm MoE model of a supported family (``mlx_lm.load(...)[0]``, or
            a d2moe model).
        tokenizer: anything with ``encode(text) -> list[int]``.
        text: the text to run (tokenized once, processed in ``chunk``-token pieces
            with a KV cache).
        out_path: where to write the trace (``.npz``); ``None`` writes nothing.
        max_tokens: keep only the first ``max_tokens`` tokens.

    Returns the trace (also what ``load_trace`` returns)::

        {"ids":    int16/int32 [layers, tokens, k]  expert ids, highest score first,
         "scores": float32 [layers, tokens, k]      router probability of each id
                                                    (softmax over all experts, or sigmoid),
         "tokens": int32 [tokens],
         "meta":   {"format", "model_type", "num_experts", "k", "layers", "num_tokens",
                    "scoring"}}

    Memory is O(tokens x k) per layer. On MLX's CPU backend the model must compute
    in float32 (its gather_mm runs float32 only): ValueError otherwise.
    """
    family = family_of(model)
    tokens = list(tokenizer.encode(text))
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if not tokens:
        raise ValueError("record_trace: text gives no tokens")
    _check_dtype(model)
    blocks = family.blocks(model)
    if not blocks:
        raise ValueError(f"record_trace: no MoE block with routed experts in this {family.name} model")
    gating = family.gating(text_args(model))
    sinks = {layer: [] for layer, _ in blocks}

    def make_fn(layer, block, original):
        def fn(x, indices):
            scores = gating.scores(family.router_logits(block, x))
            sinks[layer].append((indices, mx.take_along_axis(scores, indices.astype(mx.int32), -1)))
            return original(x, indices)
        return fn

    ids_l = {layer: [] for layer in sinks}
    scores_l = {layer: [] for layer in sinks}
    with hooked(blocks, family, make_fn):
        for out in _run(model, tokens, chunk):
            mx.eval(out, list(sinks.values()))
            for layer, sink in sinks.items():
                if len(sink) != 1:
                    raise RuntimeError(f"record_trace: layer {layer}: {len(sink)} expert calls "
                                       "for one forward pass")
                idx, sc = sink.pop()
                ids, scores = _order(np.array(idx), np.array(sc))
                ids_l[layer].append(ids)
                scores_l[layer].append(scores)
    num_experts = int(getattr(text_args(model), family.expert_count_key))
    n = len(tokens)
    ids = np.stack([np.concatenate(ids_l[l]) for l in sinks])
    for layer, a in zip(sinks, ids):
        if a.shape[0] != n:
            raise RuntimeError(f"record_trace: layer {layer}: got {a.shape[0]} rows for {n} tokens")
    meta = {"format": FORMAT, "model_type": family.name, "num_experts": num_experts,
            "k": int(ids.shape[-1]), "layers": list(sinks), "num_tokens": n,
            "scoring": "sigmoid" if gating.sigmoid else "softmax"}
    trace = {"ids": ids.astype(np.int16 if num_experts < 2**15 else np.int32),
             "scores": np.stack([np.concatenate(scores_l[l]) for l in sinks]).astype(np.float32),
             "tokens": np.asarray(tokens, dtype=np.int32), "meta": meta}
    if out_path is not None:
        save_trace(trace, out_path)
    return trace


def _check_dtype(model: nn.Module) -> None:
    if mx.default_device() != mx.cpu:
        return
    from mlx.utils import tree_flatten

    other = {str(v.dtype) for _, v in tree_flatten(model.parameters())
             if mx.issubdtype(v.dtype, mx.floating) and v.dtype != mx.float32}
    if other:
        raise ValueError(
            f"record_trace: the model computes in {', '.join(sorted(other))}, but MLX's CPU "
            "backend runs expert matmuls in float32 only: call model.set_dtype(mx.float32) first")


def save_trace(trace: dict, path: Union[str, Path]) -> None:
    """Write a trace dict to ``path`` (.npz; ``meta`` stored as JSON text)."""
    with open(path, "wb") as f:  # keep the exact name: np.savez adds .npz to str paths
        np.savez(f, ids=trace["ids"], scores=trace["scores"], tokens=trace["tokens"],
                 meta=np.array(json.dumps(trace["meta"])))


def load_trace(path: Union[str, Path]) -> dict:
    """Read a trace written by ``record_trace``: {"ids", "scores", "tokens", "meta"}."""
    with np.load(path, allow_pickle=False) as z:
        missing = {"ids", "scores", "meta"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: not a routing trace (missing {sorted(missing)})")
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown trace format {meta.get('format')!r}")
        return {"ids": z["ids"], "scores": z["scores"],
                "tokens": z["tokens"] if "tokens" in z.files else None, "meta": meta}
