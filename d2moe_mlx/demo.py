"""``d2moe demo``: convert the bundled tiny MoE and generate from it."""

from __future__ import annotations

import os
import time
from importlib import resources
from pathlib import Path
from typing import Callable

import click

from . import __version__
from .progress import progress_bar

DEFAULT_PROMPT = "The Python standard library"


def bundled_model() -> Path:
    """Directory of the small trained MoE that ships with the package."""
    path = Path(str(resources.files("d2moe_mlx").joinpath("assets/tiny-moe")))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the bundled model is missing from {path}; reinstall d2moe-mlx")
    return path


def cache_dir() -> Path:
    """Where the demo keeps its converted store ($D2MOE_CACHE or ~/.cache/d2moe)."""
    return Path(os.environ.get("D2MOE_CACHE", Path.home() / ".cache" / "d2moe")).expanduser()


def demo_store(fresh: bool = False, echo: Callable[..., object] = click.echo) -> Path:
    """Convert the bundled model once (cached); returns the store path."""
    from .convert.convert import convert
    from .model import open_store
    from .memory import format_bytes
    from .store.format import StoreError

    out = cache_dir() / f"tiny-moe-{__version__}"
    if out.exists() and not fresh:
        try:
            open_store(out).close()
            echo(f"using cached store {out} (--fresh converts again)")
            return out
        except StoreError as e:
            echo(f"cached store unusable ({e}); converting again")
    out.parent.mkdir(parents=True, exist_ok=True)
    echo(f"converting the bundled tiny MoE into {out} ...")
    with progress_bar("layers") as progress:
        report = convert(bundled_model(), out, overwrite=True, progress=progress)
    echo(
        f"  experts {format_bytes(report.expert_bytes)} + dense {format_bytes(report.dense_bytes)}, "
        f"{report.seconds:.1f} s, converter peak RSS {format_bytes(report.peak_rss)}"
    )
    return out


def run_demo(
    prompt: str | None = None,
    max_tokens: int = 64,
    level: int | None = None,
    fresh: bool = False,
    echo: Callable[..., object] = click.echo,
) -> str:
    """Convert (once), load and generate; prints the prompt and its continuation, tokens/s
    and memory. Returns the continuation (as it reads after the prompt)."""
    import mlx.core as mx

    from .generation import encode_prompt, format_stats, stream_generate, text_after_prompt
    from .model import load
    from .memory import format_bytes, peak_rss_bytes

    store = demo_store(fresh=fresh, echo=echo)
    t0 = time.perf_counter()
    model, tokenizer = load(store, level=level)
    echo(f"loaded in {time.perf_counter() - t0:.2f} s (level {'top' if level is None else level}, {mx.default_device()})")
    prompt = prompt or DEFAULT_PROMPT
    echo(f"\n{prompt}", nl=False)
    text, response = "", None
    ids = encode_prompt(tokenizer, prompt)
    responses = stream_generate(model, tokenizer, ids, max_tokens=max_tokens)
    for segment, response in text_after_prompt(tokenizer, ids, responses):
        echo(segment, nl=False)
        text += segment
    echo("\n")
    if response is not None:
        echo(format_stats(response))
    echo(f"process peak RSS: {format_bytes(peak_rss_bytes())}")
    return text
