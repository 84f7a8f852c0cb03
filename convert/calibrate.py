"""Calibration: run the model one decoder layer at a time and collect each expert's inputs.

The converter never holds more than one layer: it records what the model's own
forward pass hands each decoder layer (the hidden state and masks, via probes
standing in for the layers), then calls the real layers one by one. A probe on
each switch module records the tokens routed to every expert, from which we
build per-expert Hessians H = X^T X / n for the output-aware MWQ fit, and the
calibration statistics (activation counts, mean gate scores).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from d2moe_mlx.moe import projection_names

# Pseudo-token weight of the layer-wide Hessian mixed into each expert's own.
HESSIAN_PRIOR_TOKENS = 16.0


def default_calibration_text() -> str:
    """The calibration text shipped with the package (held-out text of the tiny model's corpus)."""
    return resources.files("d2moe_mlx").joinpath("assets/calib.txt").read_text(encoding="utf-8")


def calibration_tokens(
    source: Path, text: str | None, num_tokens: int, seq_len: int, vocab_size: int, seed: int = 0
) -> tuple[mx.array, str]:
    """Token ids [batch, seq_len] for calibration and a note on where they came from.

    Uses the checkpoint's tokenizer on ``text`` (default: the packaged text);
    a checkpoint without a tokenizer gets reproducible random ids.
    """
    seq_len = max(1, min(seq_len, num_tokens))
    batch = max(1, num_tokens // seq_len)
    ids: list[int] = []
    note = ""
    if (source / "tokenizer.json").exists() or (source / "tokenizer_config.json").exists():
        from mlx_lm.utils import load_tokenizer

        tokenizer = load_tokenizer(source)
        text = text if text is not None else default_calibration_text()
        # Paragraph by paragraph: the tokenizer warns about texts longer than the model's context.
        ids = [i for part in text.split("\n\n") if part.strip() for i in tokenizer.encode(part + "\n\n")]
        ids = [i for i in ids if 0 <= i < vocab_size]
        note = f"{len(ids)} tokens of text"
    if len(ids) < batch * seq_len:
        rng = np.random.default_rng(seed)
        missing = batch * seq_len - len(ids)
        ids = ids + rng.integers(0, vocab_size, size=missing).tolist()
        note = (note + ", " if note else "") + f"{missing} random token ids (no tokenizer or text too short)"
    arr = np.asarray(ids[: batch * seq_len], dtype=np.int32).reshape(batch, seq_len)
    return mx.array(arr), note


class _LayerProbe(nn.Module):
    """Stands in for a decoder layer: records its call arguments, returns the input."""

    def __init__(self, record: list):
        super().__init__()
        self._record = record

    def __call__(self, x, *args, **kwargs):
        self._record.append((x, args, kwargs))
        return x


def decoder_layers(model: nn.Module) -> list:
    """The model's list of decoder layers (the real list, so it can be edited in place)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, list):
        raise ValueError(f"{type(model).__module__} has no model.layers list")
    return layers


def layer_calls(model: nn.Module, tokens: mx.array) -> tuple[mx.array, list[tuple[tuple, dict]]]:
    """Run the model with probes in place of its layers.

    Returns the first layer's input hidden state and, per layer, the extra
    arguments (mask, cache, ...) that the model's own forward passes it.
    Only the embedding weights need to be loaded.
    """
    layers = decoder_layers(model)
    saved = list(layers)
    record: list = []
    try:
        for i in range(len(layers)):
            layers[i] = _LayerProbe(record)
        model(tokens)  # lazy: only the recorded inputs are evaluated below
    finally:
        layers[:] = saved
    if len(record) != len(layers):
        raise RuntimeError(f"expected {len(layers)} layer calls, saw {len(record)}")
    h0 = record[0][0]
    mx.eval(h0)
    return h0, [(args, kwargs) for _, args, kwargs in record]


class _SwitchProbe(nn.Module):
    """Wraps a switch module: records (x, indices) of every call, then runs it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self._calls: list[tuple[mx.array, mx.array]] = []

    def __call__(self, x, indices):
        self._calls.append((x, indices))
        return self.inner(x, indices)


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule of ``root`` at a dotted path (list indices allowed)."""
    module = root
    for part in path.split("."):
        module = module[int(part)] if isinstance(module, list) else getattr(module, part)
    return module


def _set_module(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, name, value)


def run_layer(
    model: nn.Module, layer_idx: int, h: mx.array, call: tuple[tuple, dict], switch_paths: list[str]
) -> tuple[mx.array, dict[str, tuple[mx.array, mx.array]]]:
    """Apply decoder layer ``layer_idx`` to ``h``; return the output and each switch module's inputs."""
    probes = {}
    for path in switch_paths:
        probe = _SwitchProbe(get_module(model, path))
        _set_module(model, path, probe)
        probes[path] = probe
    try:
        args, kwargs = call
        out = decoder_layers(model)[layer_idx](h, *args, **kwargs)
        mx.eval(out)
    finally:
        for path, probe in probes.items():
            _set_module(model, path, probe.inner)
    seen = {}
    for path, probe in probes.items():
        if len(probe._calls) != 1:
            raise RuntimeError(f"{path} was called {len(probe._calls)} times in one layer forward")
        seen[path] = probe._calls[0]
    return out, seen


def router_scores(model: nn.Module, switch_path: str, x: mx.array, config: dict) -> np.ndarray | None:
    """Router probabilities [N, E] for inputs ``x`` of the MoE block owning ``switch_path``.

    The router is the block's matrix of shape [num_experts, hidden] outside the
    switch and shared experts; probabilities use softmax, or sigmoid where the
    family scores with it (DeepSeek-V3 ``scoring_func``).
    """
    block_path = switch_path.rpartition(".")[0]
    block = get_module(model, block_path)
    switch = get_module(model, switch_path)
    num_experts = getattr(switch, projection_names(switch)[0]).weight.shape[0]
    for path, module in block.named_modules():
        if module is switch or "shared" in path or path.startswith(switch_path.rpartition(".")[2]):
            continue
        weight = module.get("weight") if isinstance(module, dict) else None
        if isinstance(weight, mx.array) and weight.shape == (num_experts, x.shape[-1]):
            logits = x.astype(mx.float32) @ weight.astype(mx.float32).T
            bias = module.get("bias")
            if isinstance(bias, mx.array) and bias.shape == (num_experts,):
                logits = logits + bias.astype(mx.float32)
            if config.get("scoring_func") == "sigmoid":
                probs = mx.sigmoid(logits)
            else:
                probs = mx.softmax(logits, axis=-1)
            return np.array(probs)
    return None


def layer_statistics(indices: np.ndarray, scores: np.ndarray | None, num_experts: int) -> dict[str, np.ndarray]:
    """Per-expert activation counts and mean gate scores over the calibration tokens."""
    counts = np.bincount(indices.reshape(-1), minlength=num_experts).astype(np.int64)
    stats = {"counts": counts}
    if scores is not None:
        stats["mean_score"] = scores.mean(axis=0).astype(np.float32)
        chosen = np.zeros_like(scores, dtype=bool)
        np.put_along_axis(chosen, indices.astype(np.int64), True, axis=1)
        sums = (scores * chosen).sum(axis=0)
        stats["mean_selected_score"] = (sums / np.maximum(counts, 1)).astype(np.float32)
    return stats


def expert_rows(indices: np.ndarray, num_experts: int) -> list[np.ndarray]:
    """For each expert, the calibration token rows routed to it."""
    return [np.nonzero((indices == e).any(axis=1))[0] for e in range(num_experts)]


def layer_hessian(inputs: list[np.ndarray]) -> np.ndarray:
    """X^T X / n over the input rows of all of a layer's experts (float64)."""
    width = inputs[0].shape[1]
    gram = np.zeros((width, width))
    for a in inputs:
        a64 = a.astype(np.float64)
        gram += a64.T @ a64
    return gram / max(sum(len(a) for a in inputs), 1)


def shrunk_hessian(x: np.ndarray, layer_h: np.ndarray) -> np.ndarray:
    """H_e = X_e^T X_e / n_e for one expert's input rows, shrunk towards the layer's H.

    An expert that saw few or no calibration tokens falls back smoothly to the
    Hessian of all rows entering the layer's experts.
    """
    x64 = x.astype(np.float64)
    h = (x64.T @ x64 + HESSIAN_PRIOR_TOKENS * layer_h) / (len(x64) + HESSIAN_PRIOR_TOKENS)
    return h.astype(np.float32)
