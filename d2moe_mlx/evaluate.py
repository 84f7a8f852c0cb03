"""Quality harness: what a quality preset (and a memory budget) costs in output quality.

:func:`evaluate` runs a store over a text under teacher forcing once per quality preset
and compares each run with a reference: the same store at its top level under the
``exact`` policy. Per run it reports perplexity, its change against ``exact`` at the
same level, the mean KL divergence KL(reference || run) of the next-token
distributions (natural log), greedy agreement (the run's argmax equals the
reference's), and from the engine's counters the level mix, substitution rate and
expert cache hit rate.

How tokens are fed (``mode``):

* ``decode`` (default): one token per forward pass through mlx-lm's KV cache
  (``make_prompt_cache``), as in chat. Quality policies decide per MoE call, and a
  one-token call decides differently from a chunk (hotness counts the call's tokens),
  so this is what a user sees while a reply is generated.
* ``prefill``: the text in chunks of ``chunk`` tokens through the KV cache (faster; how
  a prompt is read). A model loaded with a memory budget splits a chunk further into
  the prefill step its budget planned.

Which model runs:

* Without a memory budget one model is loaded (every expert resident) and reused: the
  reference runs first, then each quality under :meth:`Engine.set_policy
  <d2moe_mlx.engine.Engine.set_policy>`; counters are taken as a snapshot/delta per run.
* With ``memory_budget`` every run (the reference included) is a fresh load under that
  budget: each starts from an empty expert cache (cold), so runs are comparable and
  the cache state one run leaves cannot help the next. A streaming exact run gives the
  same logits as a resident one (the engine's tests check this), so the reference
  needs no more memory than the runs. Each quality plans its own cache split within
  the budget (the dual-routing presets keep a floor-level pool too).

Perplexity is over the text's tokens 2..n, each given those before it. The reference's
log-probabilities (tokens x vocabulary x 4 bytes) go to a temporary file and are read
back as each run reaches those positions, so that every load under a budget measures
the same process baseline (held in memory, they would shrink the later runs' cache).
The reference at the top level with the exact policy is itself the ``exact`` run at
that level, so it is not run twice.
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .engine import engine_of, streaming_of
from .levels import QUALITIES, for_quality

MODES = ("decode", "prefill")
DEFAULT_MAX_TOKENS = 256


@dataclass
class EvalResult:
    """One quality's run against the reference (see the module docstring)."""

    quality: str
    level: int  # the ceiling: the level the run was loaded at
    perplexity: float
    ppl_delta: float  # perplexity / exact's at the same level - 1
    kl_to_top: float  # mean KL(reference || run) per position, nats
    agreement: float  # fraction of positions whose argmax equals the reference's
    level_mix: dict[int, float]  # fraction of (token, expert) pairs at each level
    substitution_rate: float  # fraction of pairs whose expert was substituted (SMoE)
    hit_rate: float  # expert cache lookups that hit (1.0 with every expert resident)
    tokens: int  # positions scored (text tokens - 1)
    memory_budget: int | None = None  # bytes, None: every expert resident
    experts_cached: float | None = None  # fraction of a layer's experts the smallest pool holds

    def to_dict(self) -> dict:
        """A JSON-ready dict (level_mix keys as strings)."""
        d = asdict(self)
        d["level_mix"] = {str(k): v for k, v in self.level_mix.items()}
        return d


@dataclass
class Scores:
    """Sums over the scored positions of one run (what :func:`score` accumulates)."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    n: int = 0

    def add(self, logprobs: np.ndarray, reference: np.ndarray, targets: np.ndarray) -> None:
        """Add positions: ``logprobs`` and ``reference`` [m, V] log-probabilities of the
        run and the reference, ``targets`` [m] the tokens that follow."""
        run, ref = logprobs.astype(np.float64), reference.astype(np.float64)
        self.nll -= float(run[np.arange(len(targets)), targets].sum())
        self.kl += float((np.exp(ref) * (ref - run)).sum())
        self.agree += int((logprobs.argmax(-1) == reference.argmax(-1)).sum())
        self.n += len(targets)

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll / self.n))


def tokenize(tokenizer, text: str, max_tokens: int) -> list[int]:
    """The text's first ``max_tokens`` token ids as generation encodes a prompt; at
    least 2 (one position to score), else ValueError."""
    from .generation import encode_prompt

    if not text.strip():
        raise ValueError("the text is empty: give text to score (a plain text file)")
    n = 6 * max_tokens + 64  # characters: encode a prefix, not a whole book
    while True:
        ids = encode_prompt(tokenizer, text[:n])
        if len(ids) > max_tokens + 8 or n >= len(text):  # (a cut changes only the last tokens)
            break
        n *= 2
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"the text is {len(ids)} token long; scoring needs at least 2 tokens")
    return ids


def logprobs(model: nn.Module, tokens: list[int], mode: str = "decode",
             chunk: int = 2048) -> Iterator[np.ndarray]:
    """Log-probabilities [m, V] (float32 numpy) of the next token at positions 0..n-2 of
    ``tokens``, in order, fed as ``mode`` says (see the module docstring)."""
    from mlx_lm.models.cache import make_prompt_cache

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    step = 1 if mode == "decode" else chunk
    cache = make_prompt_cache(model)
    inputs = tokens[:-1]
    for s in range(0, len(inputs), step):
        logits = model(mx.array([inputs[s:s + step]]), cache=cache)[0].astype(mx.float32)
        out = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(out)
        yield np.array(out)


class Reference:
    """The reference's log-probabilities in a temporary file, written as they come and
    read back a block of positions at a time: the process holds none of them between
    runs, so every run under a memory budget starts from the same baseline."""

    def __init__(self):
        import tempfile

        self._file = tempfile.TemporaryFile()
        self.vocab, self.rows = 0, 0

    def append(self, lp: np.ndarray) -> None:
        self.vocab = lp.shape[-1]
        self._file.write(np.ascontiguousarray(lp, dtype=np.float32).tobytes())
        self.rows += len(lp)

    def read(self, at: int, m: int) -> np.ndarray:
        """Rows ``at .. at + m - 1`` [m, V]."""
        self._file.seek(at * self.vocab * 4)
        out = np.fromfile(self._file, dtype=np.float32, count=m * self.vocab)
        return out.reshape(m, self.vocab)

    def close(self) -> None:
        self._file.close()


def _run(model, tokens, mode, chunk, reference: Reference, write: bool = False):
    """Score one run against ``reference`` (``write``: this run is the reference, and
    its log-probabilities go there); returns (Scores, the counters' delta)."""
    engine = engine_of(model)
    before = engine.stats.snapshot()
    targets = np.asarray(tokens[1:])
    scores, at = Scores(), 0
    for lp in logprobs(model, tokens, mode, chunk):
        if write:
            reference.append(lp)
        scores.add(lp, lp if write else reference.read(at, len(lp)), targets[at:at + len(lp)])
        at += len(lp)
    engine.scheduler.drain()
    return scores, engine.stats.delta(before)


def _result(quality, level, scores, stats, exact_ppl, model, budget) -> EvalResult:
    streaming = streaming_of(model)
    cached = None
    if streaming is not None:
        cached = min(streaming.plan.slots.values()) / streaming.store.num_experts
    return EvalResult(quality=quality, level=level, perplexity=scores.perplexity,
                      ppl_delta=scores.perplexity / exact_ppl - 1.0, kl_to_top=scores.kl / scores.n,
                      agreement=scores.agree / scores.n, level_mix=stats.level_mix,
                      substitution_rate=stats.substitution_rate, hit_rate=stats.hit_rate,
                      tokens=scores.n, memory_budget=budget,
                      experts_cached=min(cached, 1.0) if cached is not None else None)


def evaluate(
    store: str | os.PathLike,
    text: str,
    qualities: tuple[str, ...] | list[str] | None = None,
    *,
    level: int | None = None,
    memory_budget: str | int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    quality_options: dict | None = None,
    mode: str = "decode",
    chunk: int = 2048,
    **load_options,
) -> list[EvalResult]:
    """Score ``text`` (its first ``max_tokens`` tokens) under each of ``qualities`` at
    ``level`` (default: the store's top) against the top level's exact run; one
    :class:`EvalResult` per quality, in the order given (default: every preset).
    ``memory_budget`` streams experts (a fresh, cold load per run); ``quality_options`` (``alpha``, ``tau``,
    ``hot``, ``floor``) apply to the dual-routing presets; ``mode`` ``decode`` or
    ``prefill`` (``chunk`` tokens per pass); ``load_options`` go to
    :func:`d2moe_mlx.load` (``dtype``, ``cache_policy``, ``context``, ...). See the
    module docstring for what is measured and how."""
    from .memory import parse_size
    from .model import load

    if qualities is None:  # every preset; the learned one where the store has its router
        from .store.extras import read_extra

        qualities = [q for q in QUALITIES if q != "learned"]
        if read_extra(store, "bit_router") is not None:
            qualities.append("learned")
    qualities = list(qualities)
    if not qualities:
        raise ValueError("no quality to evaluate: name at least one of " + ", ".join(QUALITIES))
    for q in qualities:  # unknown names fail before anything loads
        if q not in QUALITIES:
            raise ValueError(f"unknown quality {q!r}; choose one of {', '.join(QUALITIES)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (one position to score), got {max_tokens}")
    budget = parse_size(memory_budget) if memory_budget is not None else None
    if not text.strip():
        raise ValueError("the text is empty: give text to score (a plain text file)")
    options = dict(quality_options or {})

    def fresh(ceiling: int, quality: str):
        gc.collect()  # the previous run's model and its pools go first
        return load(store, level=ceiling, memory_budget=budget, quality=quality,
                    quality_options=options if quality != "exact" else None, **load_options)

    top = _top_level(store, level)
    level = top if level is None else level
    # The reference: exact at the top level.
    model, tokenizer = load(store, memory_budget=budget, **load_options)
    engine = engine_of(model)
    tokens = tokenize(tokenizer, text, max_tokens)
    context = streaming_of(model).plan.context if budget is not None else None
    if context is not None and len(tokens) - 1 > context:
        raise ValueError(f"the text's {len(tokens)} tokens need {len(tokens) - 1} tokens of context; "
                         f"the memory budget reserves {context}: lower max_tokens or raise context")
    reference = Reference()
    try:
        ref_scores, ref_stats = _run(model, tokens, mode, chunk, reference, write=True)
        exact_ppl = None
        runs = {}
        if level == top:
            exact_ppl = ref_scores.perplexity
            runs["exact"] = _result("exact", top, ref_scores, ref_stats, exact_ppl, model, budget)
        order = ([] if "exact" in runs else ["exact"]) + [q for q in qualities if q != "exact"]
        for q in order:
            if budget is not None:
                model = engine = None
                model, _ = fresh(level, q)
                engine = engine_of(model)
            else:
                engine.set_policy(for_quality(q, level, store=engine.store,
                                              **(options if q != "exact" else {})))
            scores, stats = _run(model, tokens, mode, chunk, reference)
            if q == "exact":
                exact_ppl = scores.perplexity
            runs[q] = _result(q, level, scores, stats, exact_ppl, model, budget)
    finally:
        reference.close()
        model = engine = None
        gc.collect()
        mx.clear_cache()
    return [runs[q] for q in qualities]


def _top_level(store, level: int | None) -> int:
    """The store's top level; ValueError if ``level`` is not one of its levels."""
    from . import mwq
    from .model import open_store

    with open_store(store) as s:
        spec = mwq.MWQSpec.from_dict(s.manifest["mwq"])
    top = spec.num_levels - 1
    if level is not None and (not isinstance(level, (int, np.integer)) or not 0 <= level <= top):
        raise ValueError(
            f"level {level!r} does not exist in {store}: it has levels 0..{top} ("
            + ", ".join(f"{spec.level_bits(i)} bits" for i in range(spec.num_levels)) + ")")
    return top


def format_table(results: list[EvalResult]) -> str:
    """A plain-text table of results, one row per quality."""
    head = ("quality", "level", "ppl", "ppl delta", "KL to top", "agree", "level mix", "subst",
            "hit rate", "cached")
    rows = []
    for r in results:
        mix = " ".join(f"L{lv}:{100 * f:.0f}%" for lv, f in r.level_mix.items())
        rows.append((r.quality, str(r.level), f"{r.perplexity:.3f}", f"{100 * r.ppl_delta:+.2f}%",
                     f"{r.kl_to_top:.5f}", f"{100 * r.agreement:.1f}%", mix,
                     f"{100 * r.substitution_rate:.1f}%", f"{100 * r.hit_rate:.1f}%",
                     "all" if r.experts_cached is None else f"{100 * r.experts_cached:.0f}%"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
