"""The ``d2moe`` command line: convert, generate, chat, inspect, demo here; the measuring
commands (profile, calibrate, eval, replay, trace) in :mod:`d2moe_mlx.cli_tools`."""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .mwq import METHODS
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
                          "and hot experts at --level, the rest lower (fast also substitutes "
                          "unimportant cache misses by resident experts): faster, slightly lower "
                          "quality; docs/BENCHMARKS.md and docs/QUALITY.md measure both. learned: levels from the bit-width "
                          "router `d2moe calibrate --bit-router` trained (docs/BIT_ROUTER.md)."),
        click.option("--alpha", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="With --quality: the SMoE substitution band (0 = no substitution; "
                          "default: the preset's, 0 for high and balanced, 0.35 for fast)."),
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
    from .families import alias_table, family_table

    rows = family_table()
    width = max(len(name) for name, _, _ in rows)
    click.echo(f"{'family':<{width}}  {'verified':<12}  notes")
    for name, verified, notes in rows:
        click.echo(f"{name:<{width}}  {verified:<12}  {notes}".rstrip())
    counts = {v: sum(r[1] == v for r in rows) for v in dict.fromkeys(r[1] for r in rows)}
    click.echo(f"{len(rows)} families: " + ", ".join(f"{n} verified against {v}" if v != "not verified"
                                                     else f"{n} not verified" for v, n in counts.items()))
    click.echo("aliases (mlx-lm's model_type remapping): "
               + ", ".join(f"{a} -> {t}" for a, t in alias_table().items()))
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


from . import cli_tools  # noqa: E402,F401  (registers its commands on main)

if __name__ == "__main__":  # python -m: the package's module is the one cli_tools registers on
    from d2moe_mlx.cli import main as package_main

    package_main()
