"""Extras: small named tensor files a tool adds to a finished store (e.g. a trained router).

Each extra is one safetensors file under ``extras/`` plus an entry in the manifest,
``manifest["extras"][key] = {file, bytes, crc32, meta}``. Writing is atomic: the
tensors go to a temporary file that is fsynced and renamed, then the manifest is
rewritten the same way, so a crash leaves the old extra (or none), never half of one.
Reading checks the size and crc32 before parsing.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

import numpy as np

from .format import MANIFEST_NAME, StoreError

EXTRAS_DIR = "extras"
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def _root(store) -> Path:
    return Path(getattr(store, "path", store))


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"extra key {key!r}: use letters, digits, '_', '.', '-' (at most 100)")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_extra(store, key: str, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """Store ``tensors`` and JSON-able ``meta`` under ``key`` in the store (a
    :class:`~d2moe_mlx.store.reader.Store` or its path), replacing any extra of that key."""
    from safetensors.numpy import save

    _check_key(key)
    root = _root(store)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise StoreError(f"{root}: no {MANIFEST_NAME}; extras go into a store made by d2moe convert")
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    name = f"{EXTRAS_DIR}/{key}.safetensors"
    (root / EXTRAS_DIR).mkdir(exist_ok=True)
    _write_atomic(root / name, data)
    manifest = json.loads(mpath.read_text())
    entry = {"file": name, "bytes": len(data), "crc32": zlib.crc32(data) & 0xFFFFFFFF,
             "meta": json.loads(json.dumps(meta))}
    manifest.setdefault("extras", {})[key] = entry
    _write_atomic(mpath, json.dumps(manifest, indent=1).encode())
    if hasattr(store, "manifest"):
        store.manifest.setdefault("extras", {})[key] = entry


def read_extra(store, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """(tensors, meta) of the extra ``key``, or None when the store has none; a
    StoreError when its file is missing or does not match its size and crc32."""
    from safetensors.numpy import load

    _check_key(key)
    root = _root(store)
    manifest = getattr(store, "manifest", None)
    if manifest is None:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    entry = manifest.get("extras", {}).get(key)
    if entry is None:
        return None
    name = entry.get("file", "")
    path = (root / name).resolve()
    if not name.startswith(f"{EXTRAS_DIR}/") or path.parent != (root / EXTRAS_DIR).resolve():
        raise StoreError(f"{root / MANIFEST_NAME}: extra {key!r} names file {name!r} outside "
                         f"{EXTRAS_DIR}/; the manifest is damaged")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path}: missing (extra {key!r} of the manifest); write it again") from None
    if len(data) != entry.get("bytes") or zlib.crc32(data) & 0xFFFFFFFF != entry.get("crc32"):
        raise StoreError(f"{path}: size or checksum mismatch (file corrupted); write extra "
                         f"{key!r} again")
    return load(data), entry.get("meta", {})
