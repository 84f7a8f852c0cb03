"""Record which experts an mlx-lm MoE model routes each token to.

``record_trace`` runs a model over text and stores, per MoE layer and token, the
top-k expert ids and their gate scores. It hooks each MoE block by temporarily
replacing two of its children (restored afterwards, also on error):

* the router (``gate``, or ``router`` for gpt_oss) to capture its logits, and
* the expert module (``switch_mlp``, or ``experts`` for gpt_oss) to capture the
  indices the block actually dispatched.

No mlx-lm model code is copied: any model whose decoder layers hold a block with
those children (mlx-lm's own, or a runtime that keeps that structure) works.
"""

import json
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .moe import decoder_layers

BLOCK_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "moe", "ffn")
ROUTER_NAMES = ("gate", "router")
EXPERT_NAMES = ("switch_mlp", "experts")
SIGMOID_TYPES = {"deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "dots1",
                 "kimi_k2", "minimax", "bailing_moe", "afmoe", "glm_moe_dsa"}
FORMAT = "d2moe-trace/1"


class _RouterTap(nn.Module):
    """Calls the wrapped router and keeps its logits (computed from x if needed)."""

    def __init__(self, inner: nn.Module, sink: list):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_sink", sink)  # not a parameter

    def __call__(self, x, *args, **kwargs):
        out = self.inner(x, *args, **kwargs)
        # A Linear router returns the logits; others (deepseek's MoEGate, granitemoe's
        # gating) return (indices, scores): recompute the logits from their weights.
        logits = out if isinstance(out, mx.array) else router_logits(self.inner, x)
        self._sink.append(logits.astype(mx.float32))
        return out


class _ExpertTap(nn.Module):
    """Calls the wrapped expert module and keeps the dispatched indices."""

    def __init__(self, inner: nn.Module, sink: list):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_sink", sink)

    def __call__(self, x, indices, *args, **kwargs):
        self._sink.append(indices)
        return self.inner(x, indices, *args, **kwargs)


def router_logits(router: nn.Module, x: mx.array) -> mx.array:
    """The router's logits over all experts for ``x``, whatever the family's router returns:
    a Linear router is called; granitemoe's gating holds its Linear in ``layer``; others
    (deepseek's MoEGate) hold a ``weight`` (and maybe ``bias``)."""
    if isinstance(router, (nn.Linear, nn.QuantizedLinear)):
        return router(x)
    inner = router.get("layer") if isinstance(router, dict) else None
    if isinstance(inner, (nn.Linear, nn.QuantizedLinear)):
        return inner(x)
    if "weight" not in router:
        raise ValueError(f"{type(router).__name__}: cannot find the router's weight")
    logits = x @ router["weight"].T
    return logits + router["bias"] if "bias" in router else logits


def find_moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module, str, str]]:
    """(layer index, block, router attribute, experts attribute) for each MoE layer."""
    found = []
    for i, layer in enumerate(decoder_layers(model)):
        for name in BLOCK_NAMES:
            block = layer.get(name) if isinstance(layer, dict) else None
            if not isinstance(block, nn.Module):
                continue
            r = next((n for n in ROUTER_NAMES if isinstance(block.get(n), nn.Module)), None)
            e = next((n for n in EXPERT_NAMES if isinstance(block.get(n), nn.Module)), None)
            if r and e:
                found.append((i, block, r, e))
                break
    return found


def _scoring(model: nn.Module, block: nn.Module, router: str) -> str:
    args = getattr(model, "args", None)
    mtype = getattr(args, "model_type", None) or getattr(model, "model_type", None)
    if getattr(args, "scoring_func", None) == "sigmoid" or mtype in SIGMOID_TYPES:
        return "sigmoid"
    if "e_score_correction_bias" in block[router]:
        return "sigmoid"
    return "softmax"


def _run(model, tokens: list[int], chunk: int):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for s in range(0, len(tokens), chunk):
        out = model(mx.array(tokens[s:s + chunk])[None], cache=cache)
        yield out


def _topk_scores(logits: np.ndarray, idx: np.ndarray, kind: str):
    """Flatten to [n, E] / [n, k]; scores of the dispatched ids, highest first."""
    logits = logits.reshape(-1, logits.shape[-1])
    idx = idx.reshape(-1, idx.shape[-1]).astype(np.int64)
    if kind == "softmax":
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
    else:
        prob = 1.0 / (1.0 + np.exp(-logits))
    sc = np.take_along_axis(prob, idx, -1)
    order = np.argsort(-sc, axis=-1, kind="stable")
    return np.take_along_axis(idx, order, -1), np.take_along_axis(sc, order, -1)


def record_trace(model: nn.Module, tokenizer: Any, text: str,
                 out_path: Optional[Union[str, Path]] = None,
                 max_tokens: Optional[int] = None, chunk: int = 512,
                 scoring: Optional[str] = None) -> dict:
    """Run ``model`` over ``text`` and record its routing, one row per token.

    Args:
        model: an mlx-lm model (``mlx_lm.load(...)[0]``) or any model whose MoE
            blocks keep mlx-lm's structure (router ``gate``/``router`` and experts
            ``switch_mlp``/``experts`` called as ``experts(x, indices)``).
        tokenizer: anything with ``encode(text) -> list[int]``.
        text: the text to run (tokenized once, processed in ``chunk``-token pieces
            with a KV cache).
        out_path: where to write the trace (``.npz``); ``None`` writes nothing.
        max_tokens: keep only the first ``max_tokens`` tokens.
        scoring: ``"softmax"`` or ``"sigmoid"``; default from the model family.

    Returns the trace (also what ``load_trace`` returns)::

        {"ids":    int16/int32 [layers, tokens, k]  expert ids, highest score first,
         "scores": float32 [layers, tokens, k]      router probability of each id
                                                    (softmax over all experts, or sigmoid),
         "tokens": int32 [tokens],
         "meta":   {"format", "model_type", "num_experts", "k", "layers", "num_tokens",
                    "scoring"}}

    The model's modules are restored before returning, also on error. Memory is
    O(tokens x k) per layer: router logits are reduced after each chunk. On MLX's CPU
    backend call ``model.set_dtype(mx.float32)`` first (its gather_mm is float32 only).
    """
    tokens = list(tokenizer.encode(text))
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if not tokens:
        raise ValueError("record_trace: text gives no tokens")
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError("record_trace: no MoE block (router 'gate'/'router' next to "
                         "'switch_mlp'/'experts') found in model.layers")
    kinds = {scoring or _scoring(model, b, r) for _, b, r, _ in blocks}
    if len(kinds) != 1 or not kinds <= {"softmax", "sigmoid"}:
        raise ValueError(f"record_trace: bad scoring {kinds}")
    kind = kinds.pop()
    logit_sinks = [[] for _ in blocks]
    index_sinks = [[] for _ in blocks]
    ids_l = [[] for _ in blocks]
    scores_l = [[] for _ in blocks]
    num_experts = 0
    originals = [(b, r, b[r], e, b[e]) for _, b, r, e in blocks]
    try:
        for (b, r, rmod, e, emod), ls, isk in zip(originals, logit_sinks, index_sinks):
            setattr(b, r, _RouterTap(rmod, ls))
            setattr(b, e, _ExpertTap(emod, isk))
        for out in _run(model, tokens, chunk):
            mx.eval(out, logit_sinks, index_sinks)
            for j, (li, *_) in enumerate(blocks):  # reduce each chunk to [n, k] at once
                ls, isk = logit_sinks[j], index_sinks[j]
                if len(ls) != 1 or len(isk) != 1:
                    raise RuntimeError(f"record_trace: layer {li}: {len(ls)} router and "
                                       f"{len(isk)} expert calls for one forward pass")
                logits = np.array(ls.pop())
                num_experts = logits.shape[-1]
                ids, sc = _topk_scores(logits, np.array(isk.pop()), kind)
                ids_l[j].append(ids)
                scores_l[j].append(sc)
    finally:
        for b, r, rmod, e, emod in originals:
            setattr(b, r, rmod)
            setattr(b, e, emod)
    n = len(tokens)
    ids_l = [np.concatenate(a) for a in ids_l]
    scores_l = [np.concatenate(a) for a in scores_l]
    for (li, *_), a in zip(blocks, ids_l):
        if a.shape[0] != n:
            raise RuntimeError(f"record_trace: layer {li}: got {a.shape[0]} rows for {n} tokens")
    ids = np.stack(ids_l).astype(np.int16 if num_experts < 2**15 else np.int32)
    args = getattr(model, "args", None)
    meta = {"format": FORMAT,
            "model_type": getattr(args, "model_type", None) or getattr(model, "model_type", None),
            "num_experts": num_experts, "k": int(ids.shape[-1]),
            "layers": [li for li, *_ in blocks], "num_tokens": n, "scoring": kind}
    trace = {"ids": ids, "scores": np.stack(scores_l).astype(np.float32),
             "tokens": np.asarray(tokens, dtype=np.int32), "meta": meta}
    if out_path is not None:
        save_trace(trace, out_path)
    return trace


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
