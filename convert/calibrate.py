"""Calibration: run the model one decoder layer at a time and collect each expert's inputs.

The converter never holds more than one layer: it records what the model's own
forward pass hands each decoder layer (the hidden state and masks, via probes
standing in for the layers), then calls the real layers one by one. Each switch
module is computed from numpy copies of its experts (which the quantizer needs
anyway), recording the rows every expert sees; from those come the per-expert
Hessians H = X^T X / n of the output-aware MWQ fit and the calibration
statistics (activation counts, mean gate scores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from d2moe_mlx import mwq
from d2moe_mlx.moe import decoder_layers, projection_names
from d2moe_mlx.families import Family, family_of, text_args
from d2moe_mlx.hooks import hooked


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
        note = f"text ({len(ids)} available)"
    if len(ids) < batch * seq_len:
        rng = np.random.default_rng(seed)
        missing = batch * seq_len - len(ids)
        ids = ids + rng.integers(0, vocab_size, size=missing).tolist()
        if note:
            note += f" and {missing} random token ids (the text is too short)"
        else:
            note = "random token ids (the checkpoint has no tokenizer)"
    arr = np.asarray(ids[: batch * seq_len], dtype=np.int32).reshape(batch, seq_len)
    return mx.array(arr), note


def describe_calibration(tokens: int, note: str) -> str:
    """``"2048 tokens from text (22832 available)"``: a store's calibration, for people."""
    return f"{tokens} tokens from {note}"


class _LayerProbe(nn.Module):
    """Stands in for a decoder layer: records its call arguments, returns the input (as
    the first of ``outputs`` values where the layer returns a tuple, the rest None).
    Other attributes are the layer's own (hybrid models ask a layer its kind)."""

    def __init__(self, record: list, layer: nn.Module | None = None, carry: tuple = (),
                 outputs: int = 1):
        super().__init__()
        self._record = record
        self._carry = carry
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_outputs", outputs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = object.__getattribute__(self, "_layer")
            if layer is None:
                raise
            return getattr(layer, name)
        # Plain flags a model's forward reads off its layers (exaone_moe: is_sliding_window).
        for k, v in vars(layer or {}).items():
            if not k.startswith("_") and isinstance(v, (bool, int, float, str)):
                setattr(self, k, v)

    def __call__(self, x, *args, **kwargs):
        self._record.append((x, args, kwargs))
        if self._carry:
            return (x, *carried(self._carry, args, kwargs))
        return x if self._outputs == 1 else (x, *[None] * (self._outputs - 1))


def carried(carry: tuple, args: tuple, kwargs: dict) -> tuple:
    """The values of a layer call's carried arguments (``Family.carry``), in order."""
    return tuple(args[c] if isinstance(c, int) else kwargs[c] for c in carry)


def with_carried(carry: tuple, args: tuple, kwargs: dict, values) -> tuple[tuple, dict]:
    """The call's arguments with the carried ones replaced by ``values``."""
    args, kwargs = list(args), dict(kwargs)
    for c, v in zip(carry, values, strict=True):
        if isinstance(c, int):
            args[c] = v
        else:
            kwargs[c] = v
    return tuple(args), kwargs


def _eval_arrays(state) -> None:
    mx.eval([v for v in (state if isinstance(state, tuple) else (state,)) if isinstance(v, mx.array)])


def layer_calls(model: nn.Module, tokens: mx.array, carry: tuple = ()) -> tuple[Any, list[tuple[tuple, dict]]]:
    """Run the model with probes in place of its layers.

    Returns the first layer's input hidden state and, per layer, the extra
    arguments (mask, cache, ...) that the model's own forward passes it.
    Only the embedding weights need to be loaded. With ``carry`` (the family's
    :attr:`~d2moe_mlx.families.Family.carry`) the state is the tuple of the hidden
    state and the carried arguments, as the layers return it.
    """
    layers = decoder_layers(model)
    saved = list(layers)
    record: list = []
    outputs = family_of(model).layer_outputs
    try:
        for i in range(len(layers)):
            layers[i] = _LayerProbe(record, saved[i], carry, outputs)
        model(tokens)  # lazy: only the recorded inputs are evaluated below
    finally:
        layers[:] = saved
    if len(record) != len(layers):
        raise RuntimeError(f"expected {len(layers)} layer calls, saw {len(record)}")
    x0, args0, kwargs0 = record[0]
    h0 = (x0, *carried(carry, args0, kwargs0)) if carry else x0
    _eval_arrays(h0)
    return h0, [(args, kwargs) for _, args, kwargs in record]


@dataclass
class Experts:
    """One switch module's expert weights as numpy stacks, and what they saw.

    The stacks keep the checkpoint's precision (bfloat16 as its raw uint16
    words); :meth:`weight` gives one expert in float32. ``inputs[p][e]`` holds
    the rows projection ``p`` of expert ``e`` received during calibration (gate
    and up share one list; down sees the activation).
    """

    names: tuple[str, ...]
    stacks: dict[str, np.ndarray]  # [E, out, in] float32, float16 or bfloat16 bits (uint16)
    biases: dict[str, np.ndarray]  # [E, out] float32, projections with a bias only
    activation: Callable
    x: np.ndarray | None = None  # [N, hidden] the switch's input rows
    indices: np.ndarray | None = None  # [N, k]
    logits: mx.array | None = None  # [..., E] the router's logits in the layer's forward pass
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.stacks[self.names[0]].shape[0]

    def shape(self, name: str) -> tuple[int, int]:
        """[out, in] of projection ``name``."""
        return tuple(self.stacks[name].shape[1:])

    def weight(self, name: str, expert: int) -> np.ndarray:
        """Expert ``expert``'s ``name`` weight in float32 [out, in]."""
        w = self.stacks[name][expert]
        if w.dtype == np.uint16:  # bfloat16: the high half of a float32
            return (w.astype(np.uint32) << 16).view(np.float32)
        return w.astype(np.float32)


def take_experts(switch: nn.Module) -> Experts:
    """Move a switch module's expert stacks into numpy (same precision), freeing the MLX arrays."""
    names = projection_names(switch)
    stacks, biases = {}, {}
    for name in names:
        proj = getattr(switch, name)
        weight = proj.weight
        mx.eval(weight)
        if weight.dtype == mx.bfloat16:
            stacks[name] = np.array(weight.view(mx.uint16))
        elif weight.dtype in (mx.float16, mx.float32):
            stacks[name] = np.array(weight)
        else:
            stacks[name] = np.array(weight.astype(mx.float32))
        proj.weight = mx.zeros((0,), dtype=weight.dtype)
        if "bias" in proj:
            biases[name] = np.array(proj.bias.astype(mx.float32))
            proj.bias = mx.zeros((0,), dtype=proj.bias.dtype)
    return Experts(names, stacks, biases, switch.activation)


def experts_forward(experts: Experts, x: mx.array, indices: mx.array) -> mx.array:
    """The switch module's output, computed with numpy on each expert's routed rows.

    Same maths as mlx-lm's SwitchGLU / SwitchMLP (numpy's BLAS is far faster
    than MLX's CPU matmul), and it records every expert's inputs on the way.
    """
    first, last = experts.names[:-1], experts.names[-1]
    xs = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])
    idx = np.array(indices).reshape(-1, indices.shape[-1])
    out_dims = experts.shape(last)[0]
    out = np.zeros((*idx.shape, out_dims), np.float32)
    routed, acts = [], []
    for e in range(experts.num_experts):
        tok, slot = np.nonzero(idx == e)
        xe = xs[tok]
        ys = []
        for n in first:
            y = xe @ experts.weight(n, e).T
            ys.append(y + experts.biases[n][e] if n in experts.biases else y)
        # SwitchGLU calls activation(x_up, x_gate); its projections are (gate, up, down).
        if tok.size:
            a = experts.activation(*[mx.array(y) for y in ys[::-1]])
            a = np.array(a.astype(mx.float32))
        else:  # an expert no token chose: MLX's CUDA backend aborts (SIGFPE) on empty inputs
            a = np.zeros(ys[0].shape, np.float32)
        y = a @ experts.weight(last, e).T
        out[tok, slot] = y + experts.biases[last][e] if last in experts.biases else y
        routed.append(xe)
        acts.append(a)
    experts.x, experts.indices = xs, idx
    experts.inputs = {**{n: routed for n in first}, last: acts}
    return mx.array(out.reshape(*indices.shape, out_dims)).astype(x.dtype)


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule of ``root`` at a dotted path (list indices allowed)."""
    module = root
    for part in path.split("."):
        module = module[int(part)] if isinstance(module, list) else getattr(module, part)
    return module


def run_layer(model: nn.Module, family: Family, layer_idx: int, h: Any,
              call: tuple[tuple, dict], experts: Experts | None) -> Any:
    """Apply decoder layer ``layer_idx`` to ``h`` and return its hidden state (the first
    value where the layer returns a tuple); its routed experts (if any) are computed from
    ``experts`` by :func:`experts_forward`, which records their inputs and router logits.
    A family that carries layer state (:attr:`~d2moe_mlx.families.Family.carry`) takes
    and returns the tuple of the hidden state and the carried values."""
    layer = decoder_layers(model)[layer_idx]
    blocks = [(layer_idx, family.block_of(layer))] if experts is not None else []

    def make_fn(_layer, block, _original):
        def probe(x, indices):
            if experts.x is not None:
                raise RuntimeError("a switch module was called twice in one layer forward")
            experts.logits = family.router_logits(block, x.astype(mx.float32))
            return experts_forward(experts, x, indices)
        return probe

    args, kwargs = call
    if family.carry:
        h, *values = h
        args, kwargs = with_carried(family.carry, args, kwargs, values)
    with hooked(blocks, family, make_fn):
        out = layer(h, *args, **kwargs)
        if isinstance(out, tuple) and not family.carry:
            out = out[0]
        state = out if isinstance(out, tuple) else (out,)
        _eval_arrays((*state, *([experts.logits] if experts is not None else [])))
    if experts is not None and experts.x is None:
        raise RuntimeError(f"layer {layer_idx}: its experts were not called in the layer's forward pass")
    return out


def router_scores(model: nn.Module, family: Family, experts: Experts) -> np.ndarray:
    """Router probabilities [N, E] of the MoE block whose ``experts`` :func:`run_layer` ran
    (softmax, or sigmoid where the family scores with it), via the family adapter."""
    scores = family.gating(text_args(model)).scores(experts.logits.astype(mx.float32))
    return np.array(scores).reshape(-1, scores.shape[-1])


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


def _gram(x: np.ndarray, group_size: int | None) -> np.ndarray:
    """X^T X (float64): full, or only its diagonal blocks when ``group_size`` is given."""
    if group_size:
        return mwq.hessian_blocks(x, group_size) * len(x)
    x64 = x.astype(np.float64)
    return x64.T @ x64


def layer_hessian(inputs: list[np.ndarray], group_size: int | None = None) -> np.ndarray:
    """X^T X / n over the input rows of all of a layer's experts (float64).

    With ``group_size``, only the diagonal blocks [G, gs, gs] the MWQ fits read
    (all but GPTQ): in/gs times cheaper to build and hold.
    """
    gram = sum(_gram(a, group_size) for a in inputs)
    return gram / max(sum(len(a) for a in inputs), 1)


def expert_hessian(x: np.ndarray, layer_h: np.ndarray, group_size: int | None = None) -> np.ndarray:
    """H_e = X_e^T X_e / n_e for one expert's rows, blended with the layer's H.

    Rarely routed experts lean on the layer's Hessian (``mwq.blend_hessian``):
    the H of a few tokens over-fits the scales.
    """
    n = len(x)
    h = _gram(x, group_size) / n if n else None
    return mwq.blend_hessian(h, n, layer_h)
