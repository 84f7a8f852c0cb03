"""``d2moe convert``: stream a Hugging Face MoE checkpoint into an MWQ expert store.

Data path, one decoder layer at a time (peak memory ~ one layer's experts):
read the layer's tensors (lazy ``mx.load``) -> normalise + mlx-lm ``sanitize``
-> run the layer on the calibration hidden states, recording each expert's
inputs -> MWQ-quantise every expert with its own Hessian -> write one expert
file per component -> quantise the layer's dense weights with mlx-lm's own
quantisation -> write a dense shard -> drop the layer.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchLinear

from d2moe_mlx import __version__, mwq
from d2moe_mlx.families import get_family
from d2moe_mlx.model import DTYPES
from d2moe_mlx.memory import peak_rss_bytes
from d2moe_mlx.moe import decoder_layers, layer_of, layers_path, projection_names, switch_modules
from d2moe_mlx.store.format import DENSE_BITS, DENSE_GROUP_SIZES
from d2moe_mlx.store.outdir import check_out_dir
from d2moe_mlx.store.writer import StoreWriter
from d2moe_mlx.system import return_freed_memory, trim_heap

from . import calibrate, formats, from_codes, source
from .hf_config import build_model, dropped_tensors, normalize_weights


@dataclass
class ConvertReport:
    """What a conversion did."""

    path: Path
    seconds: float
    peak_rss: int
    expert_bytes: int
    dense_bytes: int
    layers: int
    calibration: str  # e.g. "2048 tokens from text (22832 available)"
    dropped: str = ""  # checkpoint tensors not converted (vision tower, MTP layers), for people


@dataclass
class Conversion:
    """A checked conversion, from :func:`prepare`; ``run()`` does the work."""

    src: str | os.PathLike
    out: Path
    path: Path  # the checkpoint's local directory
    spec: mwq.MWQSpec
    method: str | None
    quantization: dict | None  # mlx-lm's dense quantization, None = unquantized
    dense: dict  # the manifest's "dense" section
    store_dtype: mx.Dtype
    calibration: tuple[str | None, int, int]  # (text, tokens, sequence length)
    overwrite: bool
    workers: int | None
    model: nn.Module  # mlx-lm's model, lazy random init, never evaluated
    config: dict
    weights: dict[str, mx.array]  # lazy
    switches: dict[int, str]  # layer -> switch module path
    num_experts: int
    start: float
    source_format: formats.SourceFormat | None = None  # None: float weights
    started: bool = False
    dropped: str = ""  # what of the checkpoint is not converted (hf_config.dropped_tensors)

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    def run(self, progress: Callable[[int, int], object] | None = None) -> ConvertReport:
        """Convert layer by layer (once); ``progress(done, total)`` is called after each layer."""
        if self.started:
            raise RuntimeError("this conversion has already run (it consumes its model); call prepare() again")
        self.started = True
        return _run(self, progress)


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    spec: mwq.MWQSpec | None = None,
    method: str | None = None,
    dense_bits: int = 8,
    dense_group_size: int = 64,
    dtype: str | None = None,
    calib_text: str | None = None,
    calib_tokens: int = 2048,
    seq_len: int = 256,
    overwrite: bool = False,
    revision: str | None = None,
    workers: int | None = None,
) -> Conversion:
    """Check everything that can be checked before converting: the options, that ``src``
    resolves to a checkpoint of a supported MoE family and source format (docs/SOURCES.md),
    and that a store may be written at ``out`` (``overwrite`` rules in docs/FORMAT.md).
    Reads configs and tensor headers only. ``spec`` None: ``mwq.DEFAULT_SPEC``, or for an
    mlx-quantized source levels that top out at its bits (:func:`from_codes.spec_for`)."""
    start = time.perf_counter()
    if dense_bits not in DENSE_BITS:
        raise ValueError(f"--dense-bits must be one of {DENSE_BITS} (0 = not quantized), got {dense_bits}")
    if dense_group_size not in DENSE_GROUP_SIZES:
        raise ValueError(f"dense_group_size must be one of {DENSE_GROUP_SIZES}, got {dense_group_size}")
    path = source.resolve_source(src, revision=revision)
    hf_config = source.read_config(path)
    model, config = build_model(hf_config)  # mlx-lm's model, lazy random init, never evaluated
    store_dtype = _store_dtype(dtype, config)
    weights = source.open_weights(path)
    fmt = formats.detect_format(path, hf_config)
    formats.validate(fmt)
    drop, dropped = dropped_tensors(config["model_type"], weights)
    weights = {k: v for k, v in weights.items() if k not in drop}
    switches = {layer_of(p): p for p, _ in switch_modules(model)}
    if not switches:
        raise source.SourceError(
            f"model type {config['model_type']!r} has no mlx-lm SwitchGLU experts; d2moe converts MoE models only"
        )
    if fmt.kind == "mlx":
        spec = from_codes.source_spec(model, fmt, switches, spec, weights)
    spec = spec or mwq.DEFAULT_SPEC
    num_experts = _check_dims(model, switches, spec)
    layers = decoder_layers(model)
    by_layer, _ = source.split_by_layer(weights)
    for l in source.mtp_layers(hf_config, by_layer, len(layers)):  # DeepSeek-V3's multi-token prediction
        for name in by_layer.pop(l):
            weights.pop(name)
    if set(by_layer) != set(range(len(layers))):
        raise source.SourceError(
            f"{path}: checkpoint has tensors for layers {sorted(by_layer)[:8]}..., "
            f"the config describes {len(layers)} layers"
        )
    check_out_dir(out, overwrite)
    quantization = {"group_size": dense_group_size, "bits": dense_bits, "mode": "affine"} if dense_bits else None
    dense = {"bits": dense_bits, "group_size": dense_group_size, "dtype": _dtype_name(store_dtype)}
    return Conversion(src, Path(out), path, spec, method, quantization, dense, store_dtype,
                      (calib_text, calib_tokens, seq_len), overwrite, workers, model, config,
                      weights, switches, num_experts, start, fmt, dropped=dropped)


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    spec: mwq.MWQSpec | None = None,
    method: str | None = None,
    dense_bits: int = 8,
    dense_group_size: int = 64,
    dtype: str | None = None,
    calib_text: str | None = None,
    calib_tokens: int = 2048,
    seq_len: int = 256,
    overwrite: bool = False,
    revision: str | None = None,
    progress: Callable[[int, int], object] | None = None,
    workers: int | None = None,
) -> ConvertReport:
    """Convert the checkpoint at ``src`` (local dir or hub id) into a store at ``out``.

    ``spec`` sets the MWQ levels (default ``mwq.DEFAULT_SPEC``); ``dense_bits``
    quantises the non-expert weights with mlx-lm's affine quantisation (0 keeps
    them in ``dtype``); ``overwrite`` replaces an empty directory or an existing
    store. Everything is checked first (:func:`prepare`), then converted
    (``Conversion.run``); ``progress(done, total)`` is called after each layer.
    """
    return prepare(
        src, out, spec=spec, method=method, dense_bits=dense_bits, dense_group_size=dense_group_size,
        dtype=dtype, calib_text=calib_text, calib_tokens=calib_tokens, seq_len=seq_len,
        overwrite=overwrite, revision=revision, workers=workers,
    ).run(progress)


def _run(job: Conversion, progress: Callable[[int, int], object] | None) -> ConvertReport:
    model, config, weights, spec = job.model, job.config, job.weights, job.spec
    # Each layer frees hundreds of MiB of numpy/MLX temporaries; with glibc's default
    # (rising) mmap threshold they stay in fragmented heap arenas and the peak grew
    # ~30-70 MiB a layer (docs/SOURCES.md "Peak memory"); trim_heap after each layer too.
    return_freed_memory()
    by_layer, rest = source.split_by_layer(weights)
    num_layers = job.num_layers
    with StoreWriter(job.out, overwrite=job.overwrite) as writer:
        # Embeddings, final norm and head: needed first for the calibration inputs.
        # Tensors are popped as they are used: an evaluated lazy array keeps its data.
        fmt = job.source_format or formats.SourceFormat("float")
        _load_subset(model, config, formats.dequantize(fmt, {n: weights.pop(n) for n in rest}), prefix=None)
        model.set_dtype(mx.float32)
        calib_text, calib_tokens, seq_len = job.calibration
        tokens, calib_note = calibrate.calibration_tokens(
            job.path, calib_text, calib_tokens, seq_len, config["vocab_size"]
        )
        h, calls = calibrate.layer_calls(model, tokens, get_family(config["model_type"]).carry)
        _quantize_dense(model, job.quantization, lambda p: layer_of(p) is None)
        writer.write_dense_shard(_dense_params(model, job.store_dtype))

        stats: dict[str, np.ndarray] = {}
        shapes: dict[str, dict] = {}
        inexact = 0
        for l in range(num_layers):
            subset = {n: weights.pop(n) for n in by_layer[l]}
            sw_path = job.switches.get(l)
            codes = None
            if fmt.kind == "mlx" and sw_path:  # the source's expert codes become the top level
                names = projection_names(calibrate.get_module(model, sw_path))
                codes = from_codes.expert_codes(fmt, subset, sw_path, names)
            subset = formats.dequantize(fmt, subset)
            h, layer_stats, layer_shapes = _convert_layer(
                writer, model, config, l, subset, h, calls[l], sw_path, spec, job.method,
                job.quantization, job.store_dtype, job.workers, codes,
            )
            inexact += layer_stats.pop("inexact_groups", 0)
            stats.update(layer_stats)
            shapes = layer_shapes or shapes
            if progress:
                progress(l + 1, num_layers)

        writer.write_calib_stats(stats)
        out_config = dict(config)
        out_config.pop("quantization_config", None)
        out_config.pop("quantization", None)  # an mlx-quantized source's; the store's is set below
        if job.quantization:
            out_config["quantization"] = job.quantization
        writer.write_json("config.json", out_config)
        writer.copy_file(job.path / "config.json", source.ORIGINAL_CONFIG)  # as the checkpoint had it
        for name in source.TOKENIZER_FILES:
            if (job.path / name).is_file():
                writer.copy_file(job.path / name, name)
        manifest = {
            "model_type": config["model_type"],
            "converter": f"d2moe-mlx {__version__}",
            "source": str(job.src),
            # nested: every component is a slice of one top-level code (the levels layout packs them)
            "mwq": {**spec.to_dict(), "nested": (job.method or mwq.DEFAULT_METHOD) == "nested"},
            "num_experts": job.num_experts,
            "switch_modules": {str(l): p for l, p in sorted(job.switches.items())},
            "projections": shapes,
            "dense": job.dense,
            "source_format": formats.describe(fmt, inexact),
            "calibration": {"tokens": int(tokens.size), "seq_len": int(tokens.shape[1]), "source": calib_note},
        }
        store_path = writer.finalize(manifest)
    sizes = _store_sizes(store_path)
    return ConvertReport(
        path=store_path,
        seconds=time.perf_counter() - job.start,
        peak_rss=peak_rss_bytes(),
        expert_bytes=sizes[0],
        dense_bytes=sizes[1],
        layers=num_layers,
        calibration=calibrate.describe_calibration(int(tokens.size), calib_note),
        dropped=job.dropped,
    )


def _convert_layer(writer, model, config, l, subset, h, call, sw_path, spec, method, quantization,
                   store_dtype, workers, codes=None) -> tuple[mx.array, dict[str, np.ndarray], dict]:
    """Load, calibrate, quantise and write decoder layer ``l``; returns the next hidden state.
    ``codes``: the source's quantized experts (:func:`from_codes.expert_codes`), kept as the top level."""
    layer_path = f"{layers_path(model)}.{l}"
    _load_subset(model, config, subset, prefix=layer_path, layer=l)
    subset.clear()  # the model holds what it needs; drop the checkpoint's arrays
    layers = decoder_layers(model)
    ex = calibrate.take_experts(calibrate.get_module(model, sw_path)) if sw_path else None
    layers[l].set_dtype(mx.float32)
    family = get_family(config["model_type"])
    h_next = calibrate.run_layer(model, family, l, h, call, ex)
    stats, shapes = {}, {}
    if ex is not None:
        scores = calibrate.router_scores(model, family, ex)
        for k, v in calibrate.layer_statistics(ex.indices, scores, ex.num_experts).items():
            stats[f"layer{l}.{k}"] = v
        shapes = _write_experts(writer, l, ex, spec, method, workers, codes)
        if codes is not None:
            stats["inexact_groups"] = shapes.pop("inexact_groups")
    _quantize_dense(model, quantization, lambda p: layer_of(p) == l)
    writer.write_dense_shard(_dense_params(layers[l], store_dtype, prefix=layer_path))
    layers[l] = _DroppedLayer()  # drop the layer: nothing of it is needed again
    mx.clear_cache()  # hand freed buffers back so peak memory stays at one layer
    trim_heap()  # and the C heap's free pages (glibc): the peak no longer creeps up a layer at a time
    return h_next, stats, shapes


class _DroppedLayer(nn.Module):
    """Stands in for a converted layer. A family's ``sanitize`` may walk every layer
    (kimi_linear: ``layer.mlp``, ``layer.self_attn``); here those read as None."""

    def __getattr__(self, key: str):
        if key.startswith("_"):
            return super().__getattr__(key)
        return self.get(key)


def _store_dtype(dtype: str | None, config: dict) -> mx.Dtype:
    name = dtype or config.get("torch_dtype") or config.get("dtype") or "float16"
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _dtype_name(dtype: mx.Dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _check_dims(model: nn.Module, switches: dict[int, str], spec: mwq.MWQSpec) -> int:
    """Every expert projection's input width must split into MWQ groups; returns the expert count."""
    counts = set()
    for path in switches.values():
        switch = calibrate.get_module(model, path)
        for name in projection_names(switch):
            e, _, in_dims = getattr(switch, name).weight.shape
            counts.add(e)
            if in_dims % spec.group_size:
                raise ValueError(
                    f"{path}.{name} has input width {in_dims}, not a multiple of the MWQ group size "
                    f"{spec.group_size}; pass --group-size 32 (or a divisor of {in_dims})"
                )
    if len(counts) != 1:
        raise source.SourceError(f"MoE layers have different expert counts {sorted(counts)}; not supported")
    return counts.pop()


def _load_subset(model: nn.Module, config: dict, subset: dict[str, mx.array], prefix: str | None,
                 layer: int | None = None) -> None:
    """Normalise + sanitize one layer's (or the top-level) tensors and load them into ``model``.

    ``prefix`` is layer ``layer``'s path in the model's parameter names. mlx-lm's
    ``sanitize`` functions look for layer 0's keys to decide whether to restack
    experts, so a layer's tensors are renamed to layer 0 for the call
    (``...layers.{layer}.`` -> ``...layers.0.``, whatever comes before; GPT-2-style
    ``...h.{layer}.`` likewise) and back afterwards.
    """
    model_type = config["model_type"]
    # A family whose sanitize looks at each layer's own index keeps it (sanitize_layer0 False)
    rename = prefix is not None and get_family(model_type).sanitize_layer0
    if rename:
        subset = {re.sub(rf"(^|\.)(layers|h)\.{layer}\.", r"\1\2.0.", k, count=1): v
                  for k, v in subset.items()}
    subset = normalize_weights(model_type, config, subset)
    if hasattr(model, "sanitize"):
        subset = model.sanitize(dict(subset))
    if rename:
        subset = {re.sub(r"(^|\.)(layers|h)\.0\.", rf"\1\2.{layer}.", k, count=1): v
                  for k, v in subset.items()}
    params = dict(tree_flatten(model.parameters()))
    if prefix is None:
        wanted = {k for k in params if layer_of(k) is None}
    else:
        wanted = {k for k in params if k.startswith(prefix + ".")}
    extra = sorted(set(subset) - set(params))
    missing = sorted(wanted - set(subset))
    if extra or missing:
        where = prefix or "the non-layer weights"
        raise source.SourceError(
            f"checkpoint tensors for {where} do not match the {model_type} architecture: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for k, v in subset.items():
        if v.shape != params[k].shape:
            raise source.SourceError(f"tensor {k} has shape {v.shape}, the config implies {params[k].shape}")
    model.load_weights(list(subset.items()), strict=False)


def _quantize_dense(model: nn.Module, quantization: dict | None, select: Callable[[str], bool]) -> None:
    """Quantise the selected dense modules with mlx-lm's own rules (model.quant_predicate)."""
    if not quantization:
        return
    group_size = quantization["group_size"]
    family_predicate = getattr(model, "quant_predicate", None)

    def predicate(path, module):
        if not select(path) or not hasattr(module, "to_quantized") or isinstance(module, SwitchLinear):
            return False
        if module.weight.shape[-1] % group_size:
            return False
        decision = family_predicate(path, module) if family_predicate else True
        if isinstance(decision, dict):
            quantization[path] = decision
        return decision

    nn.quantize(model, group_size, quantization["bits"], mode="affine", class_predicate=predicate)


def _dense_params(module: nn.Module, dtype: mx.Dtype, prefix: str | None = None) -> dict[str, mx.array]:
    """The module's parameters (float ones cast to ``dtype``), named as in the whole model."""
    out = {}
    for name, value in tree_flatten(module.parameters()):
        if value.size == 0:
            continue  # emptied expert stacks and dropped layers
        full = f"{prefix}.{name}" if prefix else name
        if prefix is None and layer_of(full) is not None:
            continue
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        out[full] = value
    return out


def _write_experts(
    writer: StoreWriter,
    layer: int,
    experts: calibrate.Experts,
    spec: mwq.MWQSpec,
    method: str | None,
    workers: int | None,
    codes: dict | None = None,
) -> dict[str, dict]:
    """MWQ-quantise every expert of one switch module and write one file per component
    (``codes``: slice the source's own codes instead of fitting)."""
    names, inputs = experts.names, experts.inputs
    blocks_of = None if method == "gptq" else spec.group_size  # only GPTQ reads the full H
    priors = {id(inputs[n]): calibrate.layer_hessian(inputs[n], blocks_of) for n in names}  # gate/up share
    kwargs = {"method": method} if method else {}

    def quantize_expert(e: int) -> list[dict[str, np.ndarray]]:
        blocks = [dict() for _ in range(spec.num_levels)]
        hessians: dict[int, np.ndarray] = {}
        for n in names:
            key = id(inputs[n])
            if key not in hessians:
                hessians[key] = calibrate.expert_hessian(inputs[n][e], priors[key], blocks_of)
            comps = mwq.quantize_mwq(experts.weight(n, e), spec, hessians[key], **kwargs)
            for c, comp in enumerate(comps):
                for name, value in mwq.pack_component(comp).items():
                    blocks[c][f"{n}.{name}"] = value
            if n in experts.biases:
                blocks[0][f"{n}.bias"] = experts.biases[n][e]
        return blocks

    def slice_expert(e: int) -> list[dict[str, np.ndarray]]:
        blocks, bad = from_codes.expert_blocks(codes, e, spec, f"model.layers.{layer}")
        for n in names:
            if n in experts.biases:
                blocks[0][f"{n}.bias"] = experts.biases[n][e]
        inexact.append(bad)
        return blocks

    inexact: list[int] = []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        per_expert = list(pool.map(quantize_expert if codes is None else slice_expert, range(experts.num_experts)))
    for c in range(spec.num_levels):
        writer.write_expert_file(layer, c, [blocks[c] for blocks in per_expert])
    shapes = {n: {"shape": list(experts.shape(n)), "bias": n in experts.biases} for n in names}
    if codes is not None:
        shapes["inexact_groups"] = sum(inexact)
    return shapes


def _store_sizes(path: Path) -> tuple[int, int]:
    experts = sum(f.stat().st_size for f in (path / "experts").glob("*"))
    dense = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return experts, dense
