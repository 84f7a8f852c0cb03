"""On-disk expert store: one aligned block per (layer, MWQ component, expert).

See docs/FORMAT.md for the format.
"""

from .format import (
    BLOCK_ALIGN, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, TENSOR_ALIGN, StoreError,
    TensorSpec, block_layout, expert_file_name,
)
from .outdir import check_out_dir
from .reader import Store
from .writer import StoreWriter, clean_stale_tmp

__all__ = [
    "BLOCK_ALIGN", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "TENSOR_ALIGN",
    "Store", "StoreError", "StoreWriter", "TensorSpec", "block_layout", "check_out_dir",
    "clean_stale_tmp", "expert_file_name",
]
