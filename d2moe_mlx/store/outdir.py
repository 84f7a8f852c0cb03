"""Which output paths a new store may replace (``overwrite=True``; see docs/FORMAT.md).

Only an empty directory or one of our stores, holding nothing its manifest does
not list, is ever deleted to make room for a new store: never a user's files.
"""

from __future__ import annotations

import os
from pathlib import Path

from .format import (
    EXPERTS_DIR, FORMAT_NAME, MANIFEST_NAME, MAX_MANIFEST_BYTES, StoreError, is_partial_name,
)
from .validate import load_json


def check_out_dir(out: str | Path, overwrite: bool) -> None:
    """Raise FileExistsError (naming ``out`` and what to do) unless a store may be written there.

    A path that does not exist is fine. An existing one needs ``overwrite``, and even
    then only an empty directory, or a directory that is one of our stores (damaged or
    not) and holds nothing a store does not hold, is replaced; a symlink to one of our
    stores is replaced by the new store (its target is left as it is).
    """
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists: pass overwrite=True (--overwrite) to "
                              "replace it, or choose another output directory")
    try:
        why = _why_not_replaceable(out)
    except OSError as e:
        why = f"cannot be read ({e.strerror or e})"
    if why:
        raise FileExistsError(
            f"{out} {why}; overwrite=True (--overwrite) only replaces an empty directory or a "
            "store made by `d2moe convert`, so nothing was deleted: move those files elsewhere "
            "or choose another output directory")


def _why_not_replaceable(out: Path) -> str | None:
    """Why ``out`` must not be deleted to make room for a new store (None: it may be)."""
    if out.is_symlink():
        try:
            target = out.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling, or a loop
            return f"is a symlink to {os.readlink(out)}, which does not lead to a d2moe store"
        if not (target.is_dir() and _store_paths(target) is not None):
            return f"is a symlink to {target}, which is not a d2moe store"
        return None
    if not out.is_dir():
        return "is a file, not a d2moe store"
    entries = sorted(os.listdir(out))
    if not entries:
        return None
    allowed = _store_paths(out)
    if allowed is None:
        return (f"is not a d2moe store (no {MANIFEST_NAME} of format {FORMAT_NAME!r}) and "
                f"holds {_few(entries)}")
    extra = _unexpected(out, "", *allowed)
    if extra:
        return f"is a d2moe store but also holds {_few(extra)}, which the store does not list"
    return None


def _store_paths(path: Path) -> tuple[set[str], set[str]] | None:
    """(files, directories) the store at ``path`` may hold, by its manifest; None if it has
    no manifest of ours. Sizes and checksums do not matter: a damaged store is still ours."""
    try:
        m = load_json(path / MANIFEST_NAME, "manifest", MAX_MANIFEST_BYTES)
    except StoreError:
        return None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        return None
    files = {MANIFEST_NAME}
    if isinstance(m.get("files"), dict):
        files.update(n for n in m["files"] if isinstance(n, str))
    experts = m.get("experts")
    if isinstance(experts, dict) and isinstance(experts.get("files"), list):
        files.update(e["file"] for e in experts["files"]
                     if isinstance(e, dict) and isinstance(e.get("file"), str))
    from .extras import EXTRAS_DIR, extra_files

    files |= extra_files(m)
    dirs = {EXPERTS_DIR, EXTRAS_DIR} | {p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)}
    return files, dirs


def _unexpected(root: Path, rel: str, files: set[str], dirs: set[str]) -> list[str]:
    """Entries under ``root/rel`` that are not in ``files``/``dirs`` (symlinks not followed)."""
    found = []
    for entry in sorted(os.scandir(root / rel), key=lambda e: e.name):
        name = rel + entry.name
        if entry.is_dir(follow_symlinks=False):
            if name in dirs:
                found += _unexpected(root, name + "/", files, dirs)
            else:
                found.append(name + "/")
        elif name not in files and not (not rel and is_partial_name(name)):
            found.append(name)
    return found


def _few(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
