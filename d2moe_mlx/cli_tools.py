"""The ``d2moe`` commands that measure and prepare a store: profile, calibrate, eval,
replay, trace (registered on :func:`d2moe_mlx.cli.main`; the rest live in cli.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli import DTYPE_NAMES, _cli_words, _fail, _load, _Size, main
from .policies import POLICIES
from .progress import progress_bar


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="Activation dtype (default: float32 on CPU, else the store's).")
@click.option("--refresh", is_flag=True, help="Measure again even if a profile is cached.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def profile(store, dtype, refresh, as_json):
    """Measure STORE's read and compute time per level on this machine (cached).

    Reads are cold (the files' pages dropped first), on the loader's own path;
    compute is one decode step's experts at each level. Quality presets with a stall
    budget (balanced, fast) use the cached profile to keep reads they cannot hide
    behind compute at a lower level.
    """
    import mlx.core as mx

    from .profile import profile as measure
    from .store.format import StoreError

    if dtype is None:
        dtype = "float32" if mx.default_device() == mx.cpu else "bfloat16"
    try:
        with progress_bar("profiling", enabled=not as_json and sys.stderr.isatty()):
            prof = measure(store, dtype=dtype, refresh=refresh)
    except (StoreError, ValueError) as e:
        _fail(str(e))
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps(asdict(prof), indent=1))
    else:
        click.echo(f"{store} on {prof.device}, {prof.dtype}:")
        click.echo(prof.describe())


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration text file (default: the text shipped with d2moe). The last 20% "
                   "of it is held out to measure what was trained.")
@click.option("--tokens", type=click.IntRange(512), default=None,
              help="Use at most this many tokens of the text (default: all of it).")
@click.option("--predictor/--no-predictor", default=True, show_default=True,
              help="Train the next-layer expert predictors (used by --prefetch).")
@click.option("--bit-router/--no-bit-router", default=False, show_default=True,
              help="Train D2MoE's bit-width router (used by --quality learned).")
@click.option("--router-alpha", type=click.FloatRange(0), default=0.03, show_default=True,
              help="Bit-width router: weight of the expected bits against quality (higher: "
                   "fewer bits; docs/BIT_ROUTER.md).")
@click.option("--router-steps", type=click.IntRange(1), default=100, show_default=True,
              help="Bit-width router: training steps.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def calibrate(store, text_file, tokens, predictor, bit_router, router_alpha, router_steps, as_json):
    """Train next-layer expert predictors (and optionally a bit-width router) for STORE
    and store them in it.

    Predictors: runs the store's model (resident) over the calibration text, fits per
    MoE layer a linear map from the previous MoE layer's input to the layer's router
    logits, and writes it into the store (extra "predictor"). Loading with prefetch on
    (--prefetch, load(..., prefetch=True)) then prefetches the predicted experts
    instead of running the next layer's router on this layer's input. Prints the
    held-out recall of both.

    Bit-width router (--bit-router): trains, with the model frozen, a tiny router per
    expert that picks each (token, expert) pair's level from its router scores (loss:
    KL to the top level + alpha x expected bits), stored as the extra "bit_router" and
    used by --quality learned. Prints its held-out KL, perplexity and bits per pair.
    """
    from .calibration import calibrate_store, describe
    from .predictor import KEY
    from .store.format import StoreError

    if not predictor and not bit_router:
        _fail("nothing to calibrate: --no-predictor without --bit-router")
    text = Path(text_file).read_text(encoding="utf-8", errors="replace") if text_file else None
    summary = {}
    try:
        if predictor:
            with progress_bar("predictors", enabled=not as_json and sys.stderr.isatty()) as progress:
                summary = calibrate_store(store, text=text, tokens=tokens, products=(KEY,),
                                          progress=progress)
            if not as_json:
                click.echo(describe(store, summary))
        if bit_router:
            from .bitrouter_train import train_and_store

            with progress_bar("bit-width router", enabled=not as_json and sys.stderr.isatty()) as progress:
                summary["bit_router"] = train_and_store(store, text, alpha=router_alpha,
                                                        steps=router_steps, progress=progress)
            if not as_json:
                r = summary["bit_router"]
                held = r["held_out"]
                click.echo(f"bit-width router (extra 'bit_router'): loss {r['loss_first']:.4f} -> "
                           f"{r['loss_last']:.4f}; held-out: "
                           + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in held.items()))
    except (StoreError, ValueError) as e:
        _fail(_cli_words(e))
    if as_json:
        click.echo(json.dumps(summary, indent=1, default=str))


@main.command()
@click.argument("model_path", type=click.Path(exists=True, file_okay=False))
@click.argument("text_file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="Trace file to write."
)
@click.option(
    "--max-tokens", type=click.IntRange(1), default=None, help="Stop after this many tokens of text."
)
def trace(model_path, text_file, out, max_tokens):
    """Record per-layer top-k expert ids and gate scores of MODEL_PATH over TEXT_FILE.

    MODEL_PATH is a d2moe store or a Hugging Face checkpoint directory. The
    streaming and scheduling benchmarks replay such traces.
    """
    from .store.format import MANIFEST_NAME
    from .trace import record_trace

    if (Path(model_path) / MANIFEST_NAME).exists():
        model, tokenizer = _load(model_path, None, None)
    else:
        from mlx_lm.utils import load_tokenizer

        from .convert.hf_config import load_mlx_reference

        try:
            model, config = load_mlx_reference(model_path)
            tokenizer = load_tokenizer(Path(model_path), eos_token_ids=config.get("eos_token_id"))
        except (ValueError, FileNotFoundError, OSError) as e:
            _fail(f"cannot load {model_path}: {e}")
    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    try:
        meta = record_trace(model, tokenizer, text, out, max_tokens=max_tokens)["meta"]
    except ValueError as e:
        _fail(str(e))
    click.echo(
        f"wrote {out}: {meta['num_tokens']} tokens x {len(meta['layers'])} MoE layers, "
        f"top-{meta['k']} of {meta['num_experts']} experts ({meta['scoring']} scores)"
    )


@main.command(name="eval")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False),
              help="Plain text file to score (teacher forcing on its first --max-tokens tokens).")
@click.option("--quality", "qualities", multiple=True, metavar="QUALITY",
              help="Quality preset to evaluate: exact, high, balanced, fast or learned; repeat "
                   "for several. Default: all of them (learned where the store has its router).")
@click.option("--level", type=click.IntRange(0), default=None,
              help="MWQ level the runs are loaded at (the presets' ceiling). Default: highest. "
                   "The reference is always the highest level, exact.")
@click.option("--memory", type=_Size(), default=None, metavar="SIZE",
              help="Memory budget for the whole process, e.g. 2GB: every run (the reference too) "
                   "streams experts from a fresh, empty cache. Default: all experts in memory.")
@click.option("--max-tokens", type=click.IntRange(2), default=256, show_default=True,
              help="Tokens of the text to score (from its start).")
@click.option("--mode", type=click.Choice(["decode", "prefill"]), default="decode", show_default=True,
              help="decode: one token per forward pass with a KV cache, as in chat (what a reply "
                   "sees); prefill: the text in chunks (faster, how a prompt is read).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="Activation dtype (default: float32 on CPU, else the store's).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per quality.")
def eval_(store, text_file, qualities, level, memory, max_tokens, mode, dtype, as_json):
    """Measure what quality presets cost on STORE: perplexity and its change against
    exact at the same level, mean KL of next-token distributions to the highest level,
    greedy agreement with it, level mix, substitution and cache hit rate."""
    from .evaluate import evaluate, format_table
    from .limits import ContextError
    from .store.format import StoreError

    path = Path(text_file)
    if not path.is_file():
        _fail(f"text file {text_file} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        _fail(f"text file {text_file} is empty: give it text to score")
    if memory is not None:
        from .memory import format_size

        click.echo(f"memory budget: {format_size(memory)}; every run starts from an empty expert "
                   "cache", err=True)
    try:
        results = evaluate(store, text, qualities or None, level=level, memory_budget=memory,
                           max_tokens=max_tokens, mode=mode, dtype=dtype)
    except (StoreError, ContextError, ValueError, FileNotFoundError) as e:
        _fail(_cli_words(e))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        click.echo(f"{results[0].tokens} positions scored in {text_file}, {mode} mode; reference: "
                   f"the highest level, exact")
        click.echo(format_table(results))
def _columns(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated layer columns such as 0,5,10, got {value!r}")


@main.command()
@click.argument("trace_file", metavar="TRACE", type=click.Path(dir_okay=False))
@click.option("--cache", "fractions", type=float, multiple=True, default=(0.25,), show_default=True,
              help="Cache fraction: slots per layer / experts, in (0, 1]; repeat for several.")
@click.option("--policy", "policies", multiple=True, type=click.Choice([*POLICIES, "belady"]),
              help="Policy to replay; repeat for several. Default: every runtime policy "
                   "(score only if the trace has router weights) and belady, the oracle.")
@click.option("--tokens", type=click.IntRange(1), default=None,
              help="Replay only the first N tokens (quick runs). Default: all.")
@click.option("--layers", callback=_columns, default=None, metavar="I,J,...",
              help="Replay only these layer columns of the trace (0-based). Default: all.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of {policy, cache_fraction, hit_rate, loads_per_token}.")
def replay(trace_file, fractions, policies, tokens, layers, as_json):
    """Replay a routing TRACE (.npz with topk_ids [tokens, layers, k]) through the
    runtime's expert cache and eviction policies; print hit rate and expert loads per
    token per policy. Prompts run back to back through one cache per layer; a token's
    hits are counted before its experts are placed. docs/EVICTION.md has the results.
    """
    from .replay import run, table

    try:
        results = run(trace_file, list(fractions), list(policies) or None, tokens, layers,
                      note=lambda m: click.echo(m, err=True))
    except ValueError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=1))
    else:
        click.echo(table(results))
