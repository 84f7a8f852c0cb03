"""Build the English training corpus for the shipped tiny MoE.

Source: the Python 3.11 documentation (HTML) as shipped by Debian bookworm's
package ``python3.11-doc`` (version 3.11.2-6+deb12u8), licence: PSF License
Version 2 (the documentation's own licence page, ``license.html``).

Steps (all reproducible, no network except Debian's package mirror):

1. ``apt-get download python3.11-doc`` into ``--work`` (skipped if the .deb is there).
2. ``dpkg-deb -x`` it; take every ``.html`` under ``usr/share/doc/python3.11/html``,
   sorted by path, except the generated index pages (genindex*, py-modindex, search).
3. Keep the text of ``<div role="main">`` with the stdlib ``html.parser`` (scripts,
   styles, header-link symbols dropped), one paragraph per line, whitespace collapsed.
4. Split by document (sorted path index i): i % 50 == 7 is the held-out test split
   (~2%), i % 50 == 32 the validation split used for early stopping (~2%), the rest
   is training text. Documents are joined with two blank lines (paragraphs inside a
   document with one). Writes ``train.txt``, ``valid.txt``, ``heldout.txt`` and
   ``manifest.json`` to ``--work``.
5. Writes ``d2moe_mlx/assets/calib.txt``: the first ~80 KB of held-out text.

Usage: python scripts/build_corpus.py [--work .train]
"""

import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

PACKAGE = "python3.11-doc"
VERSION = "3.11.2-6+deb12u8"
DOC_ROOT = "usr/share/doc/python3.11/html"
SKIP = re.compile(r"(genindex|py-modindex|search|contents)[^/]*\.html$")
BLOCK_TAGS = {"p", "div", "li", "dt", "dd", "pre", "h1", "h2", "h3", "h4", "h5",
              "h6", "tr", "table", "blockquote", "section", "br", "dl", "ul", "ol"}
REPO = Path(__file__).resolve().parents[1]


class MainText(HTMLParser):
    """Collect the text inside <div role="main">, one block per line."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0  # div depth inside main; 0 = outside
        self.skip = 0
        self.pre = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and a.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in ("script", "style") or (tag == "a" and a.get("class") == "headerlink"):
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag in ("script", "style") or (tag == "a" and self.skip):
            self.skip = max(0, self.skip - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in BLOCK_TAGS:
            self.parts.append("\n")
        if tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [ln.rstrip() for ln in "".join(self.parts).split("\n")]
        out, blank = [], False
        for ln in lines:
            if not ln.strip():
                blank = True
                continue
            if blank and out:
                out.append("")
            out.append(ln if ln.startswith("  ") else ln.strip())
            blank = False
        return "\n".join(out).replace("\u00b6", "")


def html_to_text(html: str) -> str:
    """Main-body text of one Sphinx HTML page."""
    p = MainText()
    p.feed(html)
    return p.text()


def fetch_docs(work: Path) -> Path:
    """Download and extract the Debian package; return the HTML root."""
    deb = work / f"{PACKAGE}_{VERSION}_all.deb"
    if not deb.exists():
        subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=work, check=True)
    root = work / "deb"
    if not (root / DOC_ROOT).exists():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root / DOC_ROOT


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(REPO / ".train"))
    ap.add_argument("--calib-bytes", type=int, default=80_000)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    html_root = fetch_docs(work)
    files = sorted(f for f in glob.glob(str(html_root / "**" / "*.html"), recursive=True)
                   if not SKIP.search(f))
    train, valid, held, names = [], [], [], []
    for i, f in enumerate(files):
        text = html_to_text(Path(f).read_text(encoding="utf-8", errors="replace"))
        if len(text) < 200:
            continue
        rel = os.path.relpath(f, html_root)
        (held if i % 50 == 7 else valid if i % 50 == 32 else train).append(text)
        if i % 50 == 7:
            names.append(rel)
    tr, va, ho = ("\n\n\n".join(d) + "\n" for d in (train, valid, held))
    (work / "train.txt").write_text(tr, encoding="utf-8")
    (work / "valid.txt").write_text(va, encoding="utf-8")
    (work / "heldout.txt").write_text(ho, encoding="utf-8")
    # calibration text: whole paragraphs from the held-out split, ~calib_bytes
    calib, n = [], 0
    for para in ho.replace("\n\n\n", "\n\n").split("\n\n"):
        if n + len(para) > args.calib_bytes:
            break
        calib.append(para)
        n += len(para) + 2
    calib_path = REPO / "d2moe_mlx" / "assets" / "calib.txt"
    calib_path.parent.mkdir(parents=True, exist_ok=True)
    calib_path.write_text("\n\n".join(calib) + "\n", encoding="utf-8")
    manifest = {
        "source": f"Debian bookworm package {PACKAGE} {VERSION} ({DOC_ROOT})",
        "licence": "PSF License Version 2 (Python documentation)",
        "documents": len(train) + len(valid) + len(held), "heldout_documents": names,
        "train_bytes": len(tr.encode()), "valid_bytes": len(va.encode()),
        "heldout_bytes": len(ho.encode()),
        "train_sha256": hashlib.sha256(tr.encode()).hexdigest(),
        "heldout_sha256": hashlib.sha256(ho.encode()).hexdigest(),
        "calib_bytes": calib_path.stat().st_size,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps({k: v for k, v in manifest.items() if k != "heldout_documents"}, indent=1))


if __name__ == "__main__":
    main()
