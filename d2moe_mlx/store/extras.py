"""Extras: small products added to a finished store (predictors, a bit-width router).

An extra is one safetensors file of numpy arrays plus a JSON ``meta`` object,
recorded in the manifest's ``extras`` section (docs/FORMAT.md)::

    "extras": {"predictor": {"file": "extras/predictor-1a2b3c4d.safetensors",
                             "bytes": 12345, "crc32": 439041101, "meta": {...}}}

:func:`write_extra` never leaves a half-written store: the new file gets a name of
its own (its crc32 in the name), is fsynced, then the manifest is replaced
atomically (temp file, fsync, rename) under an exclusive lock on the store
directory, and only then is the file it replaced removed. A crash at any point
leaves the old or the new extra, both whole.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import format as F
from .format import StoreError
from .validate import CONVERT_HINT, load_json
from .writer import _fsync_path

EXTRAS_DIR = "extras"
KEY_RE = re.compile(r"[a-z0-9_]{1,64}")
MAX_META_BYTES = 1 << 20  # a meta object is a few numbers and names, not data
MAX_EXTRA_BYTES = 1 << 34  # 16 GiB


def check_key(key) -> str:
    """``key`` if it is a plain extra name ([a-z0-9_], 1-64 characters), else ValueError."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ValueError(f"extra key {key!r} must be 1-64 characters of a-z, 0-9 and _")
    return key


def extra_file_name(key: str, crc: int) -> str:
    """Relative path of an extra's file: ``extras/<key>-<crc32 hex>.safetensors``."""
    return f"{EXTRAS_DIR}/{check_key(key)}-{crc:08x}.safetensors"


def write_extra(store, key: str, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """Write ``tensors`` (name -> numpy array) and ``meta`` (a JSON object) as extra ``key`` of
    ``store`` (a path or an opened :class:`~d2moe_mlx.store.reader.Store`), replacing an
    extra of that key. Atomic (see the module docstring)."""
    from safetensors.numpy import save

    from .reader import Store

    check_key(key)
    if not isinstance(meta, dict):
        raise ValueError(f"extra {key!r}: meta must be a dict, got {type(meta).__name__}")
    meta_text = json.dumps(meta, allow_nan=False)  # ValueError for what JSON cannot hold
    if len(meta_text) > MAX_META_BYTES:
        raise ValueError(f"extra {key!r}: meta is {len(meta_text)} bytes of JSON (limit {MAX_META_BYTES})")
    if not tensors or not all(isinstance(k, str) and k for k in tensors):
        raise ValueError(f"extra {key!r}: need at least one tensor, each with a non-empty name")
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    data = save(arrays, metadata={"format": "np"})
    crc = zlib.crc32(data)
    root = Path(store.path if isinstance(store, Store) else store).expanduser()
    Store.open(root).close()  # only a whole, valid store gets extras
    root = root.resolve()
    name = extra_file_name(key, crc)
    final = root / name
    (root / EXTRAS_DIR).mkdir(exist_ok=True)
    tmp = root / f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    old = None
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_path(root / EXTRAS_DIR, directory=True)
        with _locked(root):
            manifest = load_json(root / F.MANIFEST_NAME, "manifest", F.MAX_MANIFEST_BYTES)
            extras = manifest.get("extras", {})
            if not isinstance(extras, dict):
                raise StoreError(f"{root / F.MANIFEST_NAME}: 'extras' is not an object; {CONVERT_HINT}")
            old = extras.get(key, {}).get("file") if isinstance(extras.get(key), dict) else None
            extras[key] = {"file": name, "bytes": len(data), "crc32": crc, "meta": json.loads(meta_text)}
            manifest["extras"] = dict(sorted(extras.items()))
            _replace_manifest(root, manifest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if old != name:
            _unlink_unlisted(root, name)
        raise
    if old and old != name:
        _unlink_unlisted(root, old)


def read_extra(store, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """``(tensors, meta)`` of extra ``key`` of ``store`` (a path or an opened
    :class:`~d2moe_mlx.store.reader.Store`), None if the store has no such extra;
    StoreError naming the file if it is missing, damaged or its entry is malformed."""
    from safetensors.numpy import load

    from .reader import Store

    check_key(key)
    if isinstance(store, Store):
        root, manifest = store.path, store.manifest
    else:
        opened = Store.open(Path(store).expanduser())  # validates the extras section too
        opened.close()
        root, manifest = opened.path, opened.manifest
    entry = manifest.get("extras", {}).get(key)
    if entry is None:
        return None
    path = root / entry["file"]
    try:
        with open(path, "rb") as f:
            data = f.read(entry["bytes"] + 1)
    except FileNotFoundError:
        raise StoreError(f"{path}: the file of extra {key!r} is missing; re-run the command "
                         f"that made it (d2moe calibrate {root})") from None
    if len(data) != entry["bytes"] or zlib.crc32(data) != entry["crc32"]:
        raise StoreError(f"{path}: extra {key!r} is corrupted ({len(data)} bytes, crc32 "
                         f"{zlib.crc32(data)}; the manifest says {entry['bytes']} bytes, crc32 "
                         f"{entry['crc32']}); re-run the command that made it (d2moe calibrate {root})")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types
        raise StoreError(f"{path}: extra {key!r} is not a readable safetensors file ({e})") from None
    return tensors, entry["meta"]


def validate_extras(root: Path, m: dict, bad) -> None:
    """The manifest's ``extras`` section: plain keys, files under ``extras/`` of the
    recorded size, integer crc32, object meta (contents are checked by :func:`read_extra`)."""
    from .validate import _int, _safe, _stat

    extras = m.get("extras", {})
    if not isinstance(extras, dict):
        raise bad("'extras' must be an object {key: {file, bytes, crc32, meta}}")
    for key, e in extras.items():
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise bad(f"extra key {key!r} must be 1-64 characters of a-z, 0-9 and _")
        if not (isinstance(e, dict) and isinstance(e.get("file"), str)
                and _int(e.get("bytes"), 1, MAX_EXTRA_BYTES) and _int(e.get("crc32"), 0, 0xFFFFFFFF)
                and isinstance(e.get("meta"), dict)):
            raise bad(f"extra {key!r} must be {{\"file\": str, \"bytes\": int, \"crc32\": uint32, "
                      f"\"meta\": object}}")
        name = e["file"]
        if not re.fullmatch(rf"{EXTRAS_DIR}/{key}-[0-9a-f]{{8}}\.safetensors", name):
            raise bad(f"extra {key!r}: file {name!r} must be {EXTRAS_DIR}/{key}-<8 hex>.safetensors")
        _stat(_safe(root, name, root / F.MANIFEST_NAME), e["bytes"])


def extra_files(m: dict) -> set[str]:
    """Relative paths of the extras' files a manifest lists (for tools that list a store)."""
    extras = m.get("extras")
    if not isinstance(extras, dict):
        return set()
    return {e["file"] for e in extras.values() if isinstance(e, dict) and isinstance(e.get("file"), str)}


@contextmanager
def _locked(root: Path):
    """An exclusive lock on the store directory (writers of extras take turns)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass  # no flock here: writers must not overlap
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace_manifest(root: Path, manifest: dict) -> None:
    tmp = root / f"{F.MANIFEST_PARTIAL_NAME}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / F.MANIFEST_NAME)
        _fsync_path(root, directory=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _unlink_unlisted(root: Path, name: str) -> None:
    """Remove an extras file the manifest does not (or no longer) list."""
    try:
        manifest = load_json(root / F.MANIFEST_NAME, "manifest", F.MAX_MANIFEST_BYTES)
    except StoreError:
        return
    if name not in extra_files(manifest):
        (root / name).unlink(missing_ok=True)
