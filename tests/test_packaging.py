"""The wheel ships every package (convert/ and metal/ live at the top of the repo) and the bundled model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_packages_and_assets(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("d2moe_mlx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "d2moe_mlx/cli.py",
        "d2moe_mlx/mwq.py",
        "d2moe_mlx/store/reader.py",
        "d2moe_mlx/convert/convert.py",  # from the top-level convert/
        "d2moe_mlx/convert/hf_config.py",
        "d2moe_mlx/metal/__init__.py",  # from the top-level metal/
        "d2moe_mlx/assets/calib.txt",
        "d2moe_mlx/assets/tiny-moe/model.safetensors",
        "d2moe_mlx/assets/tiny-moe/tokenizer.json",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "d2moe = d2moe_mlx.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # every module under the source packages made it in
    for src, pkg in (("d2moe_mlx", "d2moe_mlx"), ("convert", "d2moe_mlx/convert"), ("metal", "d2moe_mlx/metal")):
        for py in (ROOT / src).rglob("*.py"):
            rel = py.relative_to(ROOT / src).as_posix()
            assert f"{pkg}/{rel}" in names, f"{pkg}/{rel} missing from the wheel"
