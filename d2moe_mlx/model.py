"""Load a d2moe store as an mlx-lm model whose experts run from MWQ slot pools.

mlx-lm builds the model (its own code, config and sanitize) and loads the
dense weights; before any weight is loaded the expert engine
(:mod:`d2moe_mlx.engine`) puts an expert layer in place of every MoE block's
routed experts, so the full-precision expert stacks are never materialised.
Resident models then read every expert into pools that hold them all; streaming
models (a memory budget) get pools sized by the budget plan.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _get_classes, load_tokenizer
from mlx_lm.utils import load_model as mlx_load_model

from . import mwq
from .convert.hf_config import apply_mlx_lm_fixes
from .budget import plan_budget
from .engine import choose_layout, fill, install_engine, policy_parts
from .layout import make_layout
from .levels import for_quality
from .limits import bound_calls
from .memory import parse_size
from .profile import cached as cached_profile
from .store.format import MANIFEST_NAME, StoreError
from .store.reader import Store
from .system import IO_MODES, current_rss_bytes, return_freed_memory, set_wired_limit

# Files that make a tokenizer loadable (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def load(
    path: str | os.PathLike,
    tokenizer_config: dict[str, Any] | None = None,
    *,
    level: int | None = None,
    dtype: str | None = None,
    memory_budget: str | int | None = None,
    return_config: bool = False,
    **streaming,
):
    """Load the store at ``path``; returns ``(model, tokenizer)`` like ``mlx_lm.load``.

    ``level`` picks the MWQ level every expert computes at (0 = base only;
    default: the highest). ``dtype`` overrides the activation dtype (default:
    float32 on the CPU backend, else the dtype the store was converted with).
    ``memory_budget`` (``"6GB"``, bytes) streams experts from the store into a
    cache so that the whole process stays within the budget; the output is the
    same as with every expert resident. Streaming options (``cache_policy``,
    ``prefetch``, ``context``, ``prefill_step``, ``loader_threads``, ``mode``)
    are described in :func:`load_model`. The model works with mlx-lm's own
    ``generate`` and ``stream_generate``.
    """
    model, config = load_model(path, level=level, dtype=dtype, memory_budget=memory_budget,
                               **streaming)
    store_path = Path(path).expanduser()
    if not any((store_path / name).exists() for name in TOKENIZER_FILES):
        raise StoreError(
            f"{store_path} has no tokenizer files (its source checkpoint had none); "
            "use d2moe_mlx.load_model(path) for the model alone"
        )
    tokenizer = load_tokenizer(store_path, tokenizer_config, eos_token_ids=config.get("eos_token_id"))
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


def load_model(
    path: str | os.PathLike,
    *,
    level: int | None = None,
    dtype: str | None = None,
    memory_budget: str | int | None = None,
    cache_policy: str = "lru",
    policy_options: dict | None = None,
    prefetch: bool = False,
    overlap: bool = True,
    context: int = 4096,
    prefill_step: int | None = None,
    loader_threads: int = 4,
    mode: str = "stream",
    io_mode: str = "random",
    layout: str = "auto",
    verify: bool = True,
    batch: int = 1,
    quality: str = "exact",
    quality_options: dict | None = None,
    load_order: str = "hebf",
    phases: int = 2,
) -> tuple[nn.Module, dict]:
    """Build the mlx-lm model of the store at ``path`` with MWQ experts; returns ``(model, config)``.

    Without ``memory_budget`` every expert is read into memory. With it, the
    budget (process total: interpreter, dense weights, KV cache for ``context``
    tokens, working memory for ``prefill_step`` tokens (default: the largest step up to
    4096 whose working memory is at most a quarter of what the budget leaves after the
    weights and KV cache, so a long prompt reads each expert once per pass), expert
    cache) is split
    by :func:`d2moe_mlx.budget.plan_budget` and experts stream from the store:
    ``cache_policy`` ``lru`` / ``lfu`` / ``score`` (SMoE's lowest mean gate
    score) / ``cooc`` (co-occurrence tables and loads ahead; docs/EVICTION.md),
    ``prefetch`` loads the next layer's likely experts early (by the store's
    predictors when ``d2moe calibrate`` made them, else by the next layer's router
    on this layer's input),
    ``overlap`` computes a layer's resident experts while its misses load,
    ``loader_threads`` read in parallel, ``mode`` ``stream`` / ``sync`` /
    ``naive`` (see :mod:`d2moe_mlx.scheduler`), ``io_mode`` ``random`` /
    ``nocache`` / ``default`` (:mod:`d2moe_mlx.system`). A budget too small for one
    layer's top-k experts raises BudgetError before anything loads.

    ``layout``: ``levels`` (each level one packed tensor: one pass per projection;
    needs a nested-fitted store), ``planes`` (one tensor per stored component) or
    ``auto`` (levels where possible). ``verify``: check every expert block read
    from disk and the dense files against their crc32 (default; ~2% of a read).
    ``batch``: sequences the budget plans KV cache for (mlx-lm's ``BatchGenerator``
    runs several at once; every forward pass is held to ``prefill_step`` tokens).

    ``quality``: ``exact`` (every expert at ``level``) or a dual-routing preset
    (``high``, ``balanced``, ``fast``: important and hot experts at ``level``, the
    rest at a lower level, unimportant cache misses substituted; see
    :mod:`d2moe_mlx.levels`), or ``learned`` (the store's trained bit-width router,
    :mod:`d2moe_mlx.bitrouter`); ``quality_options`` (``alpha``, ``tau``, ``hot``,
    ``floor``) override the preset's knobs.
    """
    _start_device()
    gc.collect()  # what earlier models left: free it, so the baseline is what stays
    mx.clear_cache()
    baseline = current_rss_bytes()
    if io_mode not in IO_MODES:
        raise ValueError(f"io_mode must be one of {IO_MODES}, got {io_mode!r}")
    store = open_store(path)
    try:
        store.io_mode = io_mode
        spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
        level = spec.num_levels - 1 if level is None else level
        if not 0 <= level < spec.num_levels:
            raise ValueError(
                f"level {level} does not exist in {store.path}: it has levels 0..{spec.num_levels - 1} "
                f"({', '.join(f'{spec.level_bits(i)} bits' for i in range(spec.num_levels))})"
            )
        if dtype is None and mx.default_device() == mx.cpu:
            dtype = "float32"  # MLX's CPU quantized matmul is lossy in fp16/bf16
        act_dtype = _dtype(dtype or store.manifest["dense"]["dtype"])
        policy = for_quality(quality, level, store, **(quality_options or {}))
        plan = None
        kind = choose_layout(layout, spec, store.manifest, memory_budget is not None)
        if memory_budget is not None:
            return_freed_memory()  # RSS follows what is held, not its high-water mark
            lay = make_layout(kind, spec)
            parts, floor = policy_parts(policy, lay)
            plan = plan_budget(parse_size(memory_budget), store, store.config, lay, level,
                               act_dtype.size, baseline, context=context, prefill_step=prefill_step,
                               loader_threads=loader_threads, parts=parts, floor_parts=floor,
                               batch=batch)
        check_dense_files(store, verify)
    except BaseException:
        store.close()
        raise

    engine = None

    def get_classes(config: dict):
        model_class, args_class = _get_classes(config)

        def build(args):
            nonlocal engine
            model = model_class(args)
            apply_mlx_lm_fixes(model, config)
            engine = install_engine(model, store, spec, policy, act_dtype, plan=plan, layout=kind,
                                    cache_policy=cache_policy, policy_options=policy_options,
                                    mode=mode, prefetch=prefetch, overlap=overlap,
                                    loader_threads=loader_threads, verify=verify,
                                    load_order=load_order, phases=phases)
            return model

        return build, args_class

    try:
        model, config = mlx_load_model(store.path, lazy=False, strict=True, get_model_classes=get_classes)
        if dtype is not None:
            model.set_dtype(act_dtype, lambda t: mx.issubdtype(t, mx.floating))
        model.eval()
        fill(engine)
        if prefetch:
            from .predictor import install as install_predictor

            install_predictor(engine)  # the store's predictors, if calibrated
        engine.scheduler.costs = cached_profile(store, str(act_dtype).split(".")[-1])
    except BaseException:
        if engine is not None:
            engine.close()
        store.close()
        raise
    if plan is not None:
        bound_calls(model, plan.prefill_step, plan.context)  # whatever step the caller uses
        mx.set_cache_limit(plan.mlx_cache)  # freed buffers MLX keeps are planned in the budget
        set_wired_limit(plan.total)  # macOS: keep the budget wired (no-op elsewhere)
    return model, config


def check_dense_files(store: Store, verify: bool = True) -> None:
    """mlx-lm loads every ``model*.safetensors`` of the store: they must be exactly the
    manifest's ``dense_files``, and (``verify``) match their crc32."""
    import glob

    from .store.writer import file_crc32

    listed = set(store.manifest.get("dense_files", []))
    found = {Path(f).name for f in glob.glob(str(store.path / "model*.safetensors"))}
    if found != listed:
        extra, missing = sorted(found - listed), sorted(listed - found)
        raise StoreError(
            f"{store.path}: the dense weight files on disk ({', '.join(sorted(found)) or 'none'}) are "
            f"not the ones {MANIFEST_NAME} lists"
            + (f"; unexpected: {', '.join(extra)} (remove them)" if extra else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + "; re-run d2moe convert if the store is damaged")
    if verify:
        for name in sorted(listed):
            size, crc = file_crc32(store.path / name)
            info = store.manifest["files"][name]
            if (size, crc) != (info["size"], info["crc32"]):
                raise StoreError(f"{store.path / name}: checksum mismatch (file corrupted); re-run "
                                 "d2moe convert to rebuild the store (or skip this check: "
                                 "verify=False (--no-verify))")


def _start_device() -> None:
    """Run one small op of each kind the model uses, so that the device context and the
    kernel libraries a GPU loads on first use are in the baseline the budget measures."""
    x = mx.ones((2, 64))
    w, scales, biases = mx.quantize(mx.ones((64, 64)), group_size=64, bits=4)
    mx.eval(x @ x.T, mx.quantized_matmul(x, w, scales, biases, group_size=64, bits=4),
            mx.gather_qmm(x[:, None, None], w[None], scales[None], biases[None],
                          rhs_indices=mx.zeros((2, 1), dtype=mx.uint32), group_size=64, bits=4),
            mx.softmax(x, axis=-1))


def open_store(path: str | os.PathLike) -> Store:
    """Open a store, with a hint when ``path`` is a plain Hugging Face checkpoint."""
    path = Path(path).expanduser()
    if path.is_dir() and not (path / MANIFEST_NAME).exists() and (path / "config.json").exists():
        raise StoreError(
            f"{path} is a Hugging Face checkpoint, not a d2moe store (no {MANIFEST_NAME}); "
            f"convert it first: d2moe convert {path} -o STORE"
        )
    return Store.open(path)


def _dtype(name: str) -> mx.Dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


__all__ = ["load", "load_model", "open_store", "check_dense_files", "TokenizerWrapper"]
