"""d2moe chat's reply loop in process: Ctrl-C (a real SIGINT) stops a reply at a token
boundary, and the stopped exchange is trimmed off the prompt cache, leaving exactly the
cache of a conversation that never had it."""

from __future__ import annotations

import os
import signal

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from d2moe_mlx import load
from d2moe_mlx.chat import ReplyInterrupt, cache_tokens, reply, rewind
from d2moe_mlx.convert.convert import convert


@pytest.fixture(scope="module")
def model(hf_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "store"
    store = convert(hf_checkpoint("qwen3_moe"), out, method="rtn", dense_bits=0, dtype="float32",
                    calib_tokens=64, seq_len=32).path
    return load(store)


def turn(model, cache, text, max_tokens, sigint_after=None, prestop=False, **kw):
    """One reply; a SIGINT is sent to this process while the reply's ``sigint_after``-th
    piece of text is printed (as Ctrl-C in the terminal would)."""
    model, tokenizer = model
    printed = []

    def echo(segment):
        printed.append(segment)
        if len(printed) == sigint_after:
            os.kill(os.getpid(), signal.SIGINT)

    with ReplyInterrupt() as interrupt:
        interrupt.requested = prestop
        response, stopped = reply(model, tokenizer, text, cache, interrupt, echo,
                                  max_tokens=max_tokens, **kw)
    return response, stopped, printed


def same_cache(a, b):
    """The same keys and values at every position the next token attends to (a trimmed
    cache keeps stale entries past its offset, overwritten by the next tokens)."""
    n = cache_tokens(a)
    assert n == cache_tokens(b)
    for la, lb in zip(a, b):
        for x, y in zip(la.state, lb.state):
            if isinstance(x, mx.array):
                assert mx.array_equal(x[..., :n, :], y[..., :n, :])
            else:
                assert x == y


def test_sigint_stops_the_reply_and_rewind_drops_the_exchange(model):
    a = make_prompt_cache(model[0])
    turn(model, a, "hello\n", 5)
    start = cache_tokens(a)
    response, stopped, printed = turn(model, a, "tell me more\n", 10_000, sigint_after=3)
    assert stopped and len(printed) == 3 and response.generation_tokens == 3
    assert cache_tokens(a) > start  # the stopped exchange is in the cache until rewound
    assert rewind(a, start) and cache_tokens(a) == start
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    turn(model, a, "again\n", 6)

    b = make_prompt_cache(model[0])  # the same conversation without the stopped exchange
    turn(model, b, "hello\n", 5)
    turn(model, b, "again\n", 6)
    same_cache(a, b)


def test_stop_during_prefill(model):
    """A stop asked for before the first token ends the prefill at its next step."""
    cache = make_prompt_cache(model[0])
    response, stopped, printed = turn(model, cache, "a long prompt " * 20, 50, prestop=True,
                                      prefill_step_size=8)
    assert stopped and response is None and printed == []
    assert rewind(cache, 0) and cache_tokens(cache) == 0


def test_second_sigint_interrupts(model):
    cache = make_prompt_cache(model[0])
    model_, tokenizer = model

    def echo(segment):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        with ReplyInterrupt() as interrupt:
            reply(model_, tokenizer, "hello\n", cache, interrupt, echo, max_tokens=100)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
