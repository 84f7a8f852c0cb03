"""Text generation: mlx-lm's own generation loop over a d2moe model.

``generate`` and ``stream_generate`` take the same arguments as mlx-lm's
(sampler, logits processors, prompt cache, ...). ``format_prompt`` applies the
tokenizer's chat template when it has one.
"""

from __future__ import annotations

import dataclasses
from typing import Generator, Iterable, List, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse
from mlx_lm.generate import stream_generate as _mlx_stream_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .engine import engine_of, streaming_of
from .limits import ContextError, kv_length
from .memory import format_bytes, peak_rss_bytes
from .stats import StreamStats


def stream_generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: Union[str, mx.array, List[int]],
    max_tokens: int = 256,
    *,
    quality: str | None = None,
    quality_options: dict | None = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Yield a :class:`mlx_lm.generate.GenerationResponse` per generated token (mlx-lm's signature).

    ``quality`` (``exact``, ``high``, ``balanced``, ``fast``; ``quality_options`` as for
    :func:`d2moe_mlx.load`) applies to this request only, at the model's current ceiling
    level; the model's policy is restored afterwards. A model loaded with a memory
    budget prefills in steps of the size its budget planned for (``prefill_step_size``
    overrides it) and stops where the KV context the budget reserved is full: the last
    response then has ``finish_reason == "context"``. A prompt that does not fit at all
    raises :class:`ContextError`."""
    if quality is not None:
        yield from _with_quality(model, tokenizer, prompt, max_tokens, quality, quality_options, kwargs)
        return
    streaming = streaming_of(model)
    capped = False
    if streaming is not None:
        kwargs.setdefault("prefill_step_size", streaming.plan.prefill_step)
        if isinstance(prompt, str):
            prompt = encode_prompt(tokenizer, prompt)
        held = kv_length(kwargs.get("prompt_cache")) or 0
        n = len(prompt) if not isinstance(prompt, mx.array) else prompt.size
        room = streaming.plan.context - held - n
        if room < 1:
            raise ContextError(
                f"the prompt ({n} tokens) and what the conversation holds ({held}) leave no room in "
                f"the {streaming.plan.context}-token context the memory budget reserves: raise it "
                "(--context / context=) or start a new conversation")
        capped = room < max_tokens
        max_tokens = min(max_tokens, room)
    for response in _mlx_stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        if capped and response.finish_reason == "length":
            response = dataclasses.replace(response, finish_reason="context")
        yield response


def _with_quality(model, tokenizer, prompt, max_tokens, quality, options, kwargs):
    from .levels import for_quality

    engine = engine_of(model)
    if engine is None:
        raise ValueError("quality= needs a model loaded by d2moe_mlx.load")
    previous = engine.policy
    engine.set_policy(for_quality(quality, engine.ceiling, engine.store, **(options or {})))
    try:
        yield from stream_generate(model, tokenizer, prompt, max_tokens, **kwargs)
    finally:
        engine.set_policy(previous)


def generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: Union[str, List[int]],
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate a complete response (mlx-lm's signature); ``verbose`` prints tokens and speed."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print(format_stats(response))
    return text


def format_prompt(tokenizer: TokenizerWrapper, messages: list[dict] | str, use_chat_template: bool = True) -> str:
    """Apply the tokenizer's chat template to ``messages`` (a string is one user message)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def encode_prompt(tokenizer: TokenizerWrapper, prompt: str) -> List[int]:
    """Token ids of ``prompt`` as mlx-lm's ``stream_generate`` makes them (special tokens
    added unless the text already starts with the BOS token)."""
    bos = tokenizer.bos_token
    return tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))


def text_after_prompt(
    tokenizer: TokenizerWrapper,
    prompt: List[int],
    responses: Iterable[GenerationResponse],
) -> Generator[Tuple[str, GenerationResponse], None, None]:
    """``(text, response)`` for each response of ``stream_generate(..., prompt)``: the text
    reads on from the prompt, so printed after it, the whole equals ``tokenizer.decode(prompt
    + generated)``.

    mlx-lm's own streaming detokenizers start a fresh text and drop the first token's
    leading space (right where mlx-lm prints a reply on its own line, wrong after the
    prompt: "librarynow"). Here mlx-lm's detokenizer is first fed the prompt's tokens.
    """
    detokenizer = tokenizer.detokenizer
    for token in prompt:
        detokenizer.add_token(token)
    detokenizer.last_segment  # the prompt's own text: already on screen
    for response in responses:
        if response.finish_reason != "stop":  # a final "stop" carries the EOS token, not text
            detokenizer.add_token(response.token)
        if response.finish_reason is not None:
            detokenizer.finalize()
        yield detokenizer.last_segment, response


def format_stats(response: GenerationResponse, model: nn.Module | None = None,
                 since: StreamStats | None = None) -> str:
    """One line: prompt and generation speed (n/a for one generated token) and MLX's peak
    memory. For a d2moe ``model`` also the level mix and substitution rate when pairs ran
    at more than one level, and for a streaming one the expert cache hit rate, MB read
    per token and peak RSS against the budget, counted from ``since`` (a
    ``stats.snapshot()`` taken before the reply)."""
    n = response.generation_tokens
    # mlx-lm times generation from the first token: one token has no speed.
    speed = f"{response.generation_tps:.1f} tokens/s" if n >= 2 else "speed n/a (one token)"
    line = (
        f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s | "
        f"generation: {n} tokens, {speed} | peak memory: {response.peak_memory:.3f} GB"
    )
    engine = engine_of(model) if model is not None else None
    if engine is None:
        return line
    d = engine.stats if since is None else engine.stats.delta(since)
    mix = d.level_mix
    if len(mix) > 1 or d.substituted:
        levels = " ".join(f"L{lv} {100 * f:.0f}%" for lv, f in mix.items())
        line += f" | levels: {levels}, substituted {100 * d.substitution_rate:.1f}%"
    if not engine.streaming:
        return line
    per_token = d.bytes_read / max(d.tokens, 1) / 1e6
    return (
        f"{line} | experts: hit rate {100 * d.hit_rate:.1f}%, {per_token:.1f} MB read/token | "
        f"peak RSS {format_bytes(peak_rss_bytes())} of {format_bytes(engine.plan.total)} budget"
    )
