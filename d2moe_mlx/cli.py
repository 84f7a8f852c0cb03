"""The ``d2moe`` command line: convert, generate, chat, inspect, profile, calibrate, eval, trace, demo."""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .mwq import METHODS
from .policies import POLICIES
from .progress import progress_bar

DEFAULT_MAX_TOKENS = 256
DTYPE_NAMES = ("float16", "bfloat16", "float32")


def _fail(message: str) -> None:
    raise click.ClickException(message)


@contextmanager
def _store_errors():
    """A StoreError raised while generating (a streaming model reads experts then: a
    damaged or missing file shows only there), or a prompt longer than the context the
    budget reserves, becomes one ``Error:`` line."""
    from .limits import ContextError
    from .store.format import StoreError

    try:
        yield
    except (StoreError, ContextError) as e:
        click.echo()  # end the partial reply's line
        _fail(_cli_words(e))


class _Size(click.ParamType):
    """A size with its unit (d2moe_mlx.memory.parse_size): 6GB, 6GiB, 512MB."""

    name = "size"

    def convert(self, value, param, ctx):
        from .memory import parse_size

        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


# Library messages name an option both ways, "overwrite=True (--overwrite)"; a command
# shows its users only the flag.
_BOTH_SPELLINGS = re.compile(r"\b\w+=(?:'[^']*'|[^\s()']+) \((--[^()]+)\)")


def _cli_words(error: Exception) -> str:
    """The error's message with options spelled as command-line flags."""
    return _BOTH_SPELLINGS.sub(r"\1", str(error))


def _load(store: str, level: int | None, dtype: str | None, memory: int | None = None,
          cache_policy: str = "lru", prefetch: bool = False, context: int = 4096,
          prefill_step: int | None = None, verify: bool = True, quality: str = "exact",
          alpha: float | None = None, min_level: int | None = None):
    from .memory import format_size
    from .model import load
    from .store.format import StoreError

    if memory is not None:
        click.echo(f"memory budget: {format_size(memory)}", err=True)
    try:
        model, tokenizer = load(store, level=level, dtype=dtype, memory_budget=memory,
                                cache_policy=cache_policy, prefetch=prefetch, context=context,
                                prefill_step=prefill_step, verify=verify, quality=quality,
                                quality_options=_quality_options(quality, alpha, min_level))
    except (StoreError, ValueError, FileNotFoundError) as e:
        _fail(_cli_words(e))
    from .engine import streaming_of

    streaming = streaming_of(model)
    if streaming is not None:
        click.echo(f"streaming experts: {streaming.plan.describe()}", err=True)
    return model, tokenizer


def _quality_options(quality: str, alpha: float | None, min_level: int | None) -> dict:
    """--alpha / --min-level as quality_options; they need a dual-routing --quality."""
    options = {k: v for k, v in (("alpha", alpha), ("floor", min_level)) if v is not None}
    if options and quality == "exact":
        _fail("--alpha and --min-level tune a dual-routing --quality (high, balanced or fast); "
              "with --quality exact every expert runs at --level")
    return options


def _streaming_options(f):
    """--memory, --cache-policy, --prefetch, --context, --quality, --alpha, --min-level,
    --verify and --prefill-step for commands that load a model."""
    from .levels import QUALITIES
    from .policies import POLICIES

    options = [
        click.option("--memory", type=_Size(), default=None, metavar="SIZE",
                     help="Memory budget for the whole process, e.g. 6GB (6*10^9 bytes) or 6GiB "
                          "(6*2^30): experts stream from the store into a cache (same output, "
                          "slower). Default: all experts in memory."),
        click.option("--cache-policy", type=click.Choice(POLICIES), default="lru", show_default=True,
                     help="With --memory: which experts to evict (score = lowest mean gate score; cooc = co-occurrence tables, loads ahead what the previous layer predicts: docs/EVICTION.md)."),
        click.option("--prefetch/--no-prefetch", default=False, show_default=True,
                     help="With --memory: load the next layer's likely experts early, by the "
                          "store's predictors if `d2moe calibrate` made them, else by the next "
                          "layer's router (docs/PREDICTOR.md says when it pays)."),
        click.option("--context", type=click.IntRange(1), default=4096, show_default=True,
                     help="With --memory: tokens of KV cache the budget reserves; a reply stops "
                          "when it is full."),
        click.option("--quality", type=click.Choice(list(QUALITIES)), default="exact",
                     show_default=True,
                     help="exact: every expert at --level. high / balanced / fast: important "
                          "and hot experts at --level, the rest lower, unimportant cache misses "
                          "substituted by resident experts (faster, slightly lower quality; "
                          "docs/BENCHMARKS.md measures both). learned: levels from the bit-width "
                          "router `d2moe calibrate --bit-router` trained (docs/BIT_ROUTER.md)."),
        click.option("--alpha", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="With --quality: the SMoE substitution band (0 = no substitution; "
                          "default: the preset's, 0.25 for balanced)."),
        click.option("--min-level", type=click.IntRange(0), default=None,
                     help="With --quality: the lowest level a pair may run at (the bit floor; "
                          "--level is the ceiling). Default: the preset's."),
        click.option("--verify/--no-verify", default=True, show_default=True,
                     help="Check every expert block read from disk, and the dense weight files "
                          "at load, against their crc32 (about 2 percent of a read)."),
        click.option("--prefill-step", type=click.IntRange(1), default=None,
                     help="With --memory: most tokens one forward pass computes (the prompt runs "
                          "in steps of this size); a smaller step needs less working memory. "
                          "Default: the largest step up to 4096 whose working memory is at most a "
                          "quarter of the budget left after the weights and KV cache."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _sampler(temp: float, top_p: float):
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temp, top_p=top_p)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="d2moe")
def main() -> None:
    """Run Mixture-of-Experts LLMs larger than memory on MLX.

    Convert a Hugging Face MoE checkpoint into a nested-bit (MWQ) expert store
    with `d2moe convert`, then `d2moe chat STORE` or `d2moe generate STORE`.
    `d2moe demo` does both on the small MoE that ships with the package.
    """
    # The CLI never needs torch, but transformers 5 (imported by mlx-lm's tokenizer code)
    # imports it whenever it is installed (+180 MiB peak RSS in the demo). None in
    # sys.modules makes it absent to find_spec, so transformers skips it. Only here:
    # a library user may need torch.
    sys.modules.setdefault("torch", None)


def _list_families(ctx, _param, value) -> None:
    """--list-families: every supported family, how it was verified, and its notes."""
    if not value or ctx.resilient_parsing:
        return
    from .families import family_table

    rows = family_table()
    width = max(len(name) for name, _, _ in rows)
    click.echo(f"{'family':<{width}}  {'verified':<12}  notes")
    for name, verified, notes in rows:
        click.echo(f"{name:<{width}}  {verified:<12}  {notes}".rstrip())
    counts = {v: sum(r[1] == v for r in rows) for v in dict.fromkeys(r[1] for r in rows)}
    click.echo(f"{len(rows)} families: " + ", ".join(f"{n} verified against {v}" if v != "not verified"
                                                     else f"{n} not verified" for v, n in counts.items()))
    click.echo("transformers: transformers-5 logits match mlx-lm's after normalisation; mlx-lm: "
               "transformers lacks the family, a model saved by mlx-lm converts and runs "
               "(docs/FAMILIES.md)")
    ctx.exit()


@main.command()
@click.option("--list-families", is_flag=True, is_eager=True, expose_value=False,
              callback=_list_families, help="Print the supported model families and exit.")
@click.argument("src")
@click.option(
    "-o", "--out", "out", required=True, type=click.Path(file_okay=False), help="Store directory to create."
)
@click.option(
    "--levels",
    default=None,
    help="Total bits per MWQ level, e.g. 2,4,8 (2-bit base + 2- and 4-bit affine planes; the measured default, docs/QUANTIZATION.md) or 2,3,4 (D²MoE: two binary ±1 planes). For an mlx-quantized source the top level must be its bit width and the default tops out there (8-bit: 2,4,8; 4-bit: 2,4; docs/SOURCES.md).",
)
@click.option(
    "--planes",
    type=click.Choice(["affine", "binary"]),
    default="affine",
    show_default=True,
    help="Residual planes: a 1-bit step is always a D²MoE binary ±1 plane, wider steps affine planes; 'binary' insists every step is 1 bit.",
)
@click.option(
    "--group-size",
    type=click.Choice(["32", "64", "128"]),
    default="64",
    show_default=True,
    help="Weights per quantization group (scales/zeros per group).",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default=None,
    help="MWQ fit (docs/QUANTIZATION.md): ls (default) picks greedy or nested per group; rtn is fastest; gptq is 4-10x slower.",
)
@click.option(
    "--dense-bits",
    type=click.Choice(["0", "2", "3", "4", "5", "6", "8"]),
    default="8",
    show_default=True,
    help="mlx-lm affine quantization of the non-expert weights; 0 keeps them in --dtype.",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_NAMES),
    default=None,
    help="dtype of unquantized weights. Default: the checkpoint's.",
)
@click.option(
    "--calib",
    "calib",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Calibration text file. Default: the text shipped with d2moe.",
)
@click.option(
    "--calib-tokens", type=click.IntRange(16), default=2048, show_default=True, help="Calibration tokens."
)
@click.option(
    "--seq-len", type=click.IntRange(8), default=256, show_default=True, help="Calibration sequence length."
)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when SRC is a hub id.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it is an empty directory or a d2moe store (atomically, at the "
                   "end); anything else there is refused, never deleted.")
def convert(
    src,
    out,
    levels,
    planes,
    group_size,
    method,
    dense_bits,
    dtype,
    calib,
    calib_tokens,
    seq_len,
    revision,
    overwrite,
):
    """Convert SRC (a Hugging Face MoE checkpoint directory or hub id) into an MWQ store.

    Streams one layer at a time, so peak memory stays near one layer's experts.
    Works offline from the local Hugging Face cache with HF_HUB_OFFLINE=1.
    Refuses pickle (.bin/.pt) checkpoints and remote code.
    """
    from .convert.convert import prepare
    from .convert.source import SourceError
    from .mwq import DEFAULT_SPEC, MWQSpec
    from .store.format import StoreError

    errors = (SourceError, StoreError, ValueError, OSError)  # OSError: FileExistsError, disk full
    try:  # everything that can be checked, before the header and the bar
        spec = MWQSpec.parse(levels, int(group_size), planes) if levels else None  # None: the default
        if not levels and int(group_size) != DEFAULT_SPEC.group_size:  # (an mlx-quantized source's own bits)
            spec = MWQSpec(DEFAULT_SPEC.base_bits, DEFAULT_SPEC.plane_bits, int(group_size))
        text = Path(calib).read_text(encoding="utf-8", errors="replace") if calib else None
        job = prepare(src, out, spec=spec, method=method, dense_bits=int(dense_bits), dtype=dtype,
                      calib_text=text, calib_tokens=calib_tokens, seq_len=seq_len,
                      overwrite=overwrite, revision=revision)
    except errors as e:
        _fail(_cli_words(e))
    spec = job.spec
    levels_text = ", ".join(f"{spec.level_bits(i)}" for i in range(spec.num_levels))
    click.echo(
        f"converting {src} -> {out}  (MWQ levels: {levels_text} bits, group {spec.group_size})", err=True
    )
    if job.dropped:
        click.echo(job.dropped, err=True)
    with progress_bar("layers") as progress:
        try:
            report = job.run(progress)
        except errors as e:
            _fail(_cli_words(e))
    from .memory import format_bytes

    click.echo(
        f"wrote {report.path}: experts {format_bytes(report.expert_bytes)}, dense {format_bytes(report.dense_bytes)}, "
        f"{report.layers} layers in {report.seconds:.1f} s, peak RSS {format_bytes(report.peak_rss)}; "
        f"calibration: {report.calibration}"
    )


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("-p", "--prompt", default="The", show_default=True,
              help="Prompt text ('-' reads stdin); printed before its continuation, unless "
                   "--chat-template makes it a question.")
@click.option("-m", "--max-tokens", type=click.IntRange(1), default=DEFAULT_MAX_TOKENS, show_default=True,
              help="Most tokens to generate (fewer if the model ends its text).")
@click.option(
    "--level",
    type=click.IntRange(0),
    default=None,
    help="MWQ level for every expert (0 = base only). Default: highest.",
)
@click.option(
    "--temp",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Sampling temperature (0 = greedy).",
)
@click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="Sample from the smallest set of tokens with this total probability (1 = all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed for sampling.")
@click.option(
    "--chat-template/--no-chat-template",
    default=False,
    show_default=True,
    help="Wrap the prompt in the tokenizer's chat template.",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_NAMES),
    default=None,
    help="Activation dtype (default: float32 on CPU, else the store's).",
)
@_streaming_options
def generate(store, prompt, max_tokens, level, temp, top_p, seed, chat_template, dtype,
             **streaming):
    """Generate text from STORE and print speed and memory."""
    import mlx.core as mx

    from .generation import encode_prompt, format_prompt, format_stats, stream_generate, text_after_prompt

    if prompt == "-":
        prompt = sys.stdin.read()
    mx.random.seed(seed)
    model, tokenizer = _load(store, level, dtype, **streaming)
    text = format_prompt(tokenizer, prompt, use_chat_template=chat_template)
    ids = encode_prompt(tokenizer, text)
    if text == prompt:  # a continuation: print it after the prompt; a chat reply stands alone
        click.echo(prompt, nl=False)
    response = None
    with _store_errors():
        responses = stream_generate(model, tokenizer, ids, max_tokens=max_tokens, sampler=_sampler(temp, top_p))
        for segment, response in text_after_prompt(tokenizer, ids, responses):
            click.echo(segment, nl=False)
    click.echo()
    if response is not None:
        if response.finish_reason == "context":
            click.echo(f"(stopped: the {streaming['context']}-token context the memory budget "
                       "reserves is full; --context reserves more)", err=True)
        click.echo(format_stats(response, model), err=True)


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("-m", "--max-tokens", type=click.IntRange(1), default=DEFAULT_MAX_TOKENS, show_default=True,
              help="Most tokens per reply.")
@click.option(
    "--level", type=click.IntRange(0), default=None, help="MWQ level for every expert. Default: highest."
)
@click.option("--temp", type=click.FloatRange(0), default=0.7, show_default=True,
              help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Sample from the smallest set of tokens with this total probability (1 = all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed for sampling.")
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@click.option(
    "--stats/--no-stats", default=True, show_default=True, help="Print speed and memory after each reply."
)
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="Activation dtype (default: float32 on CPU, else the store's).")
@_streaming_options
def chat(store, max_tokens, level, temp, top_p, seed, system_prompt, stats, dtype, **streaming):
    """Chat with STORE in the terminal (streaming; 'q' or Ctrl-D quits, 'r' resets,
    Ctrl-C stops a reply)."""
    import mlx.core as mx

    from .chat import banner, run_chat

    mx.random.seed(seed)
    model, tokenizer = _load(store, level, dtype, **streaming)
    click.echo(banner(store, level, streaming["memory"]), err=True)
    with _store_errors():
        run_chat(model, tokenizer, system_prompt=system_prompt, stats=stats, max_tokens=max_tokens,
                 sampler=_sampler(temp, top_p))


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
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check every block's checksum.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(store, verify, as_json):
    """Show a store's family, levels and sizes, and check its integrity."""
    from .inspect import describe

    try:
        summary, problems = describe(store, verify=verify, progress=not as_json and sys.stderr.isatty())
    except Exception as e:  # StoreError and friends: one readable line
        _fail(str(e))
    if as_json:
        click.echo(json.dumps({**summary, "problems": problems}, indent=2))
    else:
        if verify:
            summary = {**summary, "integrity": "FAILED" if problems else "OK"}
        for key, value in summary.items():
            click.echo(f"{key:>18}: {value}")
        for p in problems:
            click.echo(f"  - {p}")
    if problems:
        sys.exit(1)


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


@main.command()
@click.option(
    "-p", "--prompt", default=None, help="Prompt (default: a sentence in the style of the training text)."
)
@click.option("-m", "--max-tokens", type=click.IntRange(1), default=64, show_default=True,
              help="Most tokens to generate.")
@click.option("--level", type=click.IntRange(0), default=None, help="MWQ level (default: highest).")
@click.option("--fresh", is_flag=True, help="Convert again even if a cached demo store exists.")
def demo(prompt, max_tokens, level, fresh):
    """Convert the bundled tiny MoE into an MWQ store and generate from it.

    Prints the store's size, then generated text, tokens/s and memory. The
    store is cached under ~/.cache/d2moe (or $D2MOE_CACHE).
    """
    from .demo import run_demo

    try:
        run_demo(prompt=prompt, max_tokens=max_tokens, level=level, fresh=fresh, echo=click.echo)
    except Exception as e:
        _fail(f"demo failed: {e}")


if __name__ == "__main__":
    main()
