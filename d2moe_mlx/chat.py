"""``d2moe chat``: a terminal chat over mlx-lm's generation loop.

As ``mlx_lm.chat``: one prompt cache for the conversation, each turn templated
on its own and appended to it; ``q`` quits, ``r`` resets. Ctrl-C stops a reply
and returns to the prompt: the first SIGINT during a reply only sets a flag,
checked between tokens and between prefill steps, so the model is never
interrupted inside a layer (a streaming model's expert slots and loader stay
consistent). The stopped exchange is then trimmed off the prompt cache
(``mlx_lm.models.cache.trim_prompt_cache``), or the conversation is reset where
the cache cannot be trimmed, so the next turn sees the conversation as it was
before the stopped question. A second Ctrl-C during the same reply interrupts
as usual.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

import click
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .engine import engine_of, streaming_of
from .generation import encode_prompt, format_stats, stream_generate, text_after_prompt
from .limits import ContextError

HELP = "type q or Ctrl-D to quit, r to reset, Ctrl-C stops a reply"


class Stopped(Exception):
    """Raised from the prefill progress callback when a stop was asked for."""


class ReplyInterrupt:
    """While entered (main thread only), the first SIGINT sets ``requested`` instead of
    raising KeyboardInterrupt; a second one raises it. The previous handler is restored on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "ReplyInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def cache_tokens(cache: list) -> int | None:
    """Tokens the prompt cache holds (None if its layers disagree or do not say)."""
    offsets = {getattr(c, "offset", None) for c in cache}
    return offsets.pop() if len(offsets) == 1 else None


def rewind(cache: list, tokens: int | None) -> bool:
    """Trim ``cache`` back to ``tokens`` tokens; False if it cannot be (reset it then)."""
    now = cache_tokens(cache)
    if tokens is None or now is None or now < tokens or not can_trim_prompt_cache(cache):
        return False
    trim_prompt_cache(cache, now - tokens)
    return cache_tokens(cache) == tokens


def reply(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    text: str,
    cache: list,
    interrupt: ReplyInterrupt,
    echo: Callable[[str], object],
    **kwargs,
) -> tuple[GenerationResponse | None, bool]:
    """Stream the reply to ``text`` into ``echo``, extending ``cache``; returns (last
    response, stopped). With ``interrupt.requested`` set (Ctrl-C) it stops at the next
    token or prefill step; the cache then holds a part of the exchange (see :func:`rewind`)."""

    def progress(done: int, total: int) -> None:
        if interrupt.requested:
            raise Stopped

    ids = encode_prompt(tokenizer, text)
    responses = stream_generate(model, tokenizer, ids, prompt_cache=cache,
                                prompt_progress_callback=progress, **kwargs)
    response = None
    try:
        for segment, response in text_after_prompt(tokenizer, ids, responses):
            echo(segment)
            if interrupt.requested:
                return response, True
    except Stopped:
        return None, True
    finally:
        responses.close()
    return response, False


def banner(store: str, level: int | None, memory: int | None) -> str:
    """One line: the store, its family, the level, the memory budget, and the keys."""
    from .memory import format_size
    from .mwq import MWQSpec
    from .store.reader import Store

    with Store.open(store) as s:
        manifest = s.manifest
    spec = MWQSpec.from_dict(manifest["mwq"])
    level = spec.num_levels - 1 if level is None else level
    parts = [manifest["model_type"], f"level {level} = {spec.level_bits(level)} bits"]
    if memory is not None:
        parts.append(f"memory budget {format_size(memory)}")
    return f"d2moe chat: {store} ({', '.join(parts)}); {HELP}"


def run_chat(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    *,
    system_prompt: str | None = None,
    stats: bool = True,
    **kwargs,
) -> None:
    """Read turns from the terminal until ``q``, Ctrl-D or Ctrl-C at the prompt; ``kwargs``
    go to :func:`d2moe_mlx.generation.stream_generate` (``max_tokens``, ``sampler``)."""
    streaming = streaming_of(model)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template:
        click.echo("(this tokenizer has no chat template: turns are sent as plain text)", err=True)
    cache = make_prompt_cache(model)
    first = True  # the system prompt goes with the first turn
    while True:
        try:
            query = click.prompt(">>", prompt_suffix=" ", default="", show_default=False)
        except (EOFError, click.Abort):  # Ctrl-D, or Ctrl-C at the prompt
            click.echo()
            return
        if query.strip() == "q":
            return
        if query.strip() == "r":
            cache, first = make_prompt_cache(model), True
            click.echo("(conversation reset)", err=True)
            continue
        if not query.strip():
            continue
        messages = [{"role": "system", "content": system_prompt}] if first and system_prompt else []
        messages.append({"role": "user", "content": query})
        if has_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(m["content"] for m in messages) + "\n"
        start = cache_tokens(cache)
        engine = engine_of(model)
        before = engine.stats.snapshot() if engine is not None else None
        try:
            with ReplyInterrupt() as interrupt:
                response, stopped = reply(model, tokenizer, text, cache, interrupt,
                                          lambda s: click.echo(s, nl=False), **kwargs)
        except ContextError as e:  # the question does not fit in what is left of the context
            click.echo(f"({e}; r resets the conversation)", err=True)
            continue
        click.echo()
        if response is not None and response.finish_reason == "context":
            click.echo(f"(the reply stopped: the {streaming.plan.context}-token context the memory "
                       "budget reserves is full; r resets the conversation, --context reserves more)",
                       err=True)
        if stopped:
            if rewind(cache, start):
                click.echo("(reply stopped; it and its question are left out of the conversation)",
                           err=True)
            else:
                cache, first = make_prompt_cache(model), True
                click.echo("(reply stopped; this cache cannot be trimmed: conversation reset)",
                           err=True)
        else:
            first = False
        if stats and response is not None:
            click.echo(format_stats(response, model, before), err=True)
