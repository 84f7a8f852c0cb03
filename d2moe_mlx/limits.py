"""What a model loaded with a memory budget may be asked: tokens per forward pass and KV context.

The budget plans working memory for ``prefill_step`` tokens per forward pass and
KV cache for ``context`` tokens. mlx-lm's own ``generate`` prefills in steps of
2048 and its ``BatchGenerator`` runs several sequences at once, so the model
itself holds the plan: :func:`bound_calls` makes a forward pass over more tokens
run in chunks of at most ``prefill_step`` tokens (batch x length) through the KV
cache (a causal model gives the same outputs), and a pass that would grow the KV
cache past ``context`` tokens raises :class:`ContextError` before computing.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class ContextError(ValueError):
    """A forward pass would grow the KV cache past the context the budget reserved."""


def kv_length(cache) -> int | None:
    """Tokens held per sequence by the first growing (not sliding-window) KV cache of
    ``cache`` (a list of per-layer caches), padding included; None if there is none."""
    for c in cache or ():
        if "Rotating" in type(c).__name__ or not hasattr(c, "offset"):
            continue
        length = getattr(c, "_idx", None)
        if length is None:
            length = c.offset
        return int(length if isinstance(length, int) else mx.max(length).item())
    return None


def bound_calls(model: nn.Module, max_tokens: int, context: int | None) -> None:
    """Make ``model``'s forward passes hold ``max_tokens`` per pass and ``context``
    tokens of KV cache (see the module docstring). Changes the instance's class to a
    subclass whose ``__call__`` does it; the module tree and weights are untouched."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    base = type(model)
    if getattr(base, "_d2moe_bounded", False):
        base = base.__mro__[1]

    def __call__(self, inputs, cache=None, *args, **kwargs):
        batch, length = inputs.shape[0], inputs.shape[1]
        if context is not None:
            held = kv_length(cache) or 0
            if held + length > context:
                raise ContextError(
                    f"this input needs {held + length} tokens of context, but the memory budget "
                    f"reserves {context}: raise the context (--context / context=) or start a "
                    "new conversation")
        step = max(1, max_tokens // batch)
        if args:  # called positionally: passed on as it came
            return base.__call__(self, inputs, cache, *args, **kwargs)
        if length <= step:  # by keyword: some models' second parameter is a mask (minimax)
            return base.__call__(self, inputs, cache=cache, **kwargs)
        if cache is None:
            from mlx_lm.models.cache import make_prompt_cache

            cache = make_prompt_cache(self)
        embeddings = kwargs.pop("input_embeddings", None)
        outs = []
        for s in range(0, length, step):
            if embeddings is not None:
                kwargs["input_embeddings"] = embeddings[:, s:s + step]
            outs.append(base.__call__(self, inputs[:, s:s + step], cache=cache, **kwargs))
            mx.eval([c.state for c in cache])  # one chunk's working memory at a time
        return mx.concatenate(outs, axis=1)

    model.__class__ = type(base.__name__, (base,), {"__call__": __call__, "_d2moe_bounded": True,
                                                     "__module__": base.__module__,
                                                     "__doc__": base.__doc__})
