"""Find and open a Hugging Face checkpoint: a local directory or a hub id.

Only safetensors are read (pickle checkpoints can run code and are refused);
tensors are opened lazily with ``mx.load`` so that one layer at a time is read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlx.core as mx

from d2moe_mlx.moe import layer_of

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# The checkpoint's own config.json is kept verbatim under this name (config.json
# in the store is the normalised one mlx-lm reads).
ORIGINAL_CONFIG = "hf_config.json"
# Files copied verbatim into the store beside the weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SourceError(ValueError):
    """The source checkpoint cannot be converted; the message says why and what to do."""


def resolve_source(src: str | os.PathLike, revision: str | None = None) -> Path:
    """Return the local directory of ``src``: a local path or a Hugging Face hub id.

    Hub ids go through ``huggingface_hub.snapshot_download``; with
    ``HF_HUB_OFFLINE=1`` the local cache is used and nothing is fetched.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(f"{path} is a file; give the checkpoint's directory (the one with config.json)")
    if not _HUB_ID.match(str(src)):
        raise SourceError(
            f"{src!r} is neither an existing directory nor a Hugging Face hub id like 'org/model'"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(str(src), revision=revision, allow_patterns=HUB_PATTERNS)
    except LocalEntryNotFoundError as e:
        raise SourceError(
            f"{src} is not in the local Hugging Face cache and cannot be downloaded "
            f"(offline or no network): {e}. Download it first, or pass a local directory."
        ) from e
    except HfHubHTTPError as e:
        raise SourceError(f"could not download {src} from the Hugging Face hub: {e}") from e
    return Path(local)


def read_config(path: Path) -> dict:
    """The checkpoint's config.json, with a clear error when missing or broken."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SourceError(f"{cfg_file} not found: is {path} a Hugging Face model directory?")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise SourceError(f"{cfg_file} has no 'model_type'; it does not describe a transformers model")
    return config


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files; pickle-only checkpoints are refused."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise SourceError(
            f"{path} holds only pickle weights ({', '.join(pickles[:3])}); pickle files can run "
            "arbitrary code when loaded, so d2moe refuses them. Convert the checkpoint to "
            "safetensors first (e.g. load it in transformers you trust and save_pretrained"
            "(..., safe_serialization=True))."
        )
    raise SourceError(f"no *.safetensors weights found in {path}")


def open_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of the checkpoint as lazy MLX arrays (nothing is read yet)."""
    weights: dict[str, mx.array] = {}
    for file in safetensors_files(path):
        try:
            tensors = mx.load(str(file))
        except Exception as e:  # MLX raises RuntimeError/ValueError on broken headers
            raise SourceError(f"cannot read {file}: {e}") from e
        for name, value in tensors.items():
            if name in weights:
                raise SourceError(f"tensor {name} appears in two weight files (second: {file.name})")
            weights[name] = value
    return weights


def split_by_layer(names) -> tuple[dict[int, list[str]], list[str]]:
    """Group tensor names by decoder layer; the rest (embeddings, final norm, head) apart."""
    by_layer: dict[int, list[str]] = {}
    rest: list[str] = []
    for name in names:
        layer = layer_of(name)
        if layer is None:
            rest.append(name)
        else:
            by_layer.setdefault(layer, []).append(name)
    return by_layer, rest


def mtp_layers(config: dict, by_layer: dict[int, list[str]], num_layers: int) -> list[int]:
    """The checkpoint's multi-token-prediction layers (DeepSeek-V3 ships
    ``num_nextn_predict_layers`` of them after the decoder layers; mlx-lm drops them too)."""
    mtp = int(config.get("num_nextn_predict_layers") or 0)
    extra = sorted(l for l in by_layer if l >= num_layers)
    return extra if mtp and extra == list(range(num_layers, num_layers + mtp)) else []
