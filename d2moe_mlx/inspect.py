"""``d2moe inspect``: what a store holds and whether it is intact."""

from __future__ import annotations

from . import mwq
from .convert.calibrate import describe_calibration
from .model import open_store
from .memory import format_bytes
from .progress import progress_bar
from .store.format import MANIFEST_NAME, MODEL_KEYS, StoreError


def describe(path: str, verify: bool = True, progress: bool = False) -> tuple[dict, list[str]]:
    """A readable summary of the store at ``path`` and its integrity problems (empty = OK)."""
    store = open_store(path)
    with store:
        m = store.manifest
        if "mwq" not in m:  # Store.open checked the sections: all of them or none
            raise StoreError(f"{store.path / MANIFEST_NAME}: has no model sections "
                             f"({', '.join(MODEL_KEYS)}): these experts were not written by "
                             "`d2moe convert`")
        spec = mwq.MWQSpec.from_dict(m["mwq"])
        raw = store.summary()
        levels = []
        for level in range(spec.num_levels):
            size = raw["level_bytes"].get(level, 0)
            levels.append(
                f"L{level}: {spec.level_bits(level)} bits ({spec.stored_bits(level):.2f} stored b/w), "
                f"{format_bytes(size)}"
            )
        dense = m.get("dense", {})
        calib = m.get("calibration", {})
        summary = {
            "store": str(store.path),
            "format": f"{raw['format']} v{raw['version']}",
            "model_type": m.get("model_type"),
            "source": m.get("source"),
            "moe_layers": raw["moe_layers"],
            "experts/layer": raw["num_experts"],
            "levels": "; ".join(levels),
            "group_size": spec.group_size,
            "dense": f"{format_bytes(raw['dense_bytes'])}, "
            + (f"{dense.get('bits')}-bit (mlx-lm affine)" if dense.get("bits") else f"{dense.get('dtype')} unquantized"),
            "expert files": format_bytes(raw["expert_file_bytes"]),
            "total": f"{format_bytes(raw['total_bytes'])} in {raw['num_files']} files",
            "calibration": describe_calibration(calib["tokens"], calib["source"])
            if {"tokens", "source"} <= set(calib) else "not recorded",
        }
        problems: list[str] = []
        if verify:
            with progress_bar("verifying", enabled=progress) as tick:
                problems = store.verify(progress=tick)
    return summary, problems
