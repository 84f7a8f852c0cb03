"""Source formats (convert/formats.py, convert/from_codes.py): FP8, MXFP4 and mlx-quantized
checkpoints in the real repos' layouts (scripts/make_format_checkpoints.py), checked against
independent decodes of the formats, against mlx-lm's own loading of the same files, and
against a float twin of the dequantised weights; bf16/fp16 files; bad input."""

from __future__ import annotations

import json
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from make_format_checkpoints import make_format_checkpoint
from make_test_checkpoints import make_checkpoint

from d2moe_mlx import load_model, mwq
from d2moe_mlx.convert import formats
from d2moe_mlx.convert.convert import convert, prepare
from d2moe_mlx.convert.hf_config import apply_mlx_lm_fixes, build_model
from d2moe_mlx.convert.source import SourceError
from d2moe_mlx.layout import make_layout, build_part
from d2moe_mlx.packing import unpack_codes
from d2moe_mlx.store.reader import Store

FAST = dict(dense_bits=0, dtype="float32", calib_tokens=64, seq_len=32)
TOKENS = mx.array([[1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 2]])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    qwen = make_checkpoint("qwen3_moe", root / "qwen3_moe")
    out = {"qwen3_moe": qwen}
    for fmt in ("fp8", "mxfp4", "mlx4", "mlx8"):
        out[fmt] = make_format_checkpoint(fmt, root / fmt, base=qwen if fmt.startswith("mlx") else None)
    return out


@pytest.fixture(scope="module")
def stores(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {fmt: convert(ckpts[fmt], root / fmt, method="rtn", **FAST).path
            for fmt in ("fp8", "mxfp4", "mlx4", "mlx8")}


# -- independent readers and decoders ---------------------------------------------------

def _raw(path, name):
    """A tensor's bytes straight from the safetensors file (no MLX, no safetensors library)."""
    for f in sorted(path.glob("*.safetensors")):
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        if name in header:
            meta = header[name]
            a, b = meta["data_offsets"]
            dtype = {"F32": "<f4", "U8": "u1", "F8_E4M3": "u1", "U32": "<u4", "BF16": "<u2"}[meta["dtype"]]
            return np.frombuffer(data[8 + n + a: 8 + n + b], dtype=dtype).reshape(meta["shape"])
    raise KeyError(name)


def _e4m3(bits):
    """float8 e4m3fn bytes -> float32, by assembling float32 bit patterns."""
    bits = bits.astype(np.uint32)
    sign, exp, man = bits >> 7, (bits >> 3) & 0xF, bits & 0x7
    normal = ((sign << 31) | ((exp + 120) << 23) | (man << 20)).view(np.float32)
    sub = np.where(sign == 1, -1.0, 1.0).astype(np.float32) * man.astype(np.float32) * np.float32(2.0 ** -9)
    out = np.where(exp == 0, sub, normal)
    return np.where((exp == 15) & (man == 7), np.nan, out).astype(np.float32)


def _mxfp4(blocks, scales):
    """gpt-oss blocks [..., G, 16] + e8m0 scales -> float32 [..., G*32], from e2m1's bit fields."""
    nib = np.empty((*blocks.shape[:-1], 32), np.uint8)
    nib[..., 0::2], nib[..., 1::2] = blocks & 0xF, blocks >> 4
    e, m = (nib >> 1) & 3, nib & 1
    mag = np.where(e == 0, 0.5 * m, (1 + 0.5 * m) * 2.0 ** (e.astype(np.float64) - 1))
    val = np.where(nib & 8, -mag, mag) * 2.0 ** (scales.astype(np.float64) - 127)[..., None]
    return val.reshape(*blocks.shape[:-2], -1).astype(np.float32)


def _bf16(x):
    """float32 -> bfloat16 (round to nearest even) -> float32."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16
    return b.astype(np.uint32).view(np.float32)


def _logits(model):
    out = model(TOKENS).astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def _mlx_lm_load(path):
    """mlx-lm's own loader on the checkpoint, in float32 (plus the yarn fix d2moe applies everywhere)."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, config = mlx_lm_load_model(path)
    model.set_dtype(mx.float32)  # float params only: packed codes and e8m0 scales stay
    apply_mlx_lm_fixes(model, config)
    return model


# -- detection --------------------------------------------------------------------------

def test_formats_are_detected(ckpts):
    kinds = {k: formats.detect_format(p, json.loads((p / "config.json").read_text())).kind for k, p in ckpts.items()}
    assert kinds == {"qwen3_moe": "float", "fp8": "fp8", "mxfp4": "mxfp4", "mlx4": "mlx", "mlx8": "mlx"}


# -- dequantisation against independent decodes ----------------------------------------

def test_fp8_dequantisation_matches_numpy_torch_and_mlx_lm(ckpts):
    import torch
    from safetensors.torch import load_file

    path = ckpts["fp8"]
    config = json.loads((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    mlx_lm_model, _ = build_model(config)
    names = ["model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.2.mlp.experts.0.down_proj.weight",
             "model.layers.0.self_attn.q_b_proj.weight", "model.layers.0.mlp.gate_proj.weight"]
    shapes = set()
    for name in names:
        w, s = _raw(path, name), _raw(path, name + "_scale_inv")
        shapes.add((w.shape, s.shape))
        full = np.repeat(np.repeat(s, 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
        want = _e4m3(w) * full
        got = formats.dequantize_fp8(mx.array(w), mx.array(s), (128, 128), mx.float32)
        np.testing.assert_array_equal(np.array(got), want)
        assert tensors[name].dtype == torch.float8_e4m3fn
        np.testing.assert_array_equal(tensors[name].float().numpy() * full, want)  # torch's own e4m3 decode
        # mlx-lm's sanitize dequantises to bfloat16: same values
        probe = "probe.weight"  # a neutral name: sanitize would stack an expert 0 with its siblings
        theirs = mlx_lm_model.sanitize({probe: mx.array(w), probe + "_scale_inv": mx.array(s)})[probe]
        ours = formats.dequantize_fp8(mx.array(w), mx.array(s), (128, 128), mx.bfloat16)
        np.testing.assert_array_equal(np.array(theirs.astype(mx.float32)), np.array(ours.astype(mx.float32)))
        np.testing.assert_array_equal(np.array(ours.astype(mx.float32)), _bf16(want))
    assert ((192, 64), (2, 1)) in shapes and ((64, 192), (1, 2)) in shapes  # partial edge blocks


def test_mxfp4_dequantisation_matches_numpy_transformers_and_mlx_lm(ckpts):
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    path = ckpts["mxfp4"]
    config = json.loads((path / "config.json").read_text())
    mlx_lm_model, _ = build_model(config)
    prefix = "model.layers.1.mlp.experts."
    for proj in ("gate_up_proj", "down_proj"):
        blocks, scales = _raw(path, prefix + proj + "_blocks"), _raw(path, prefix + proj + "_scales")
        want = _mxfp4(blocks, scales)  # [E, out, in]
        got = formats.dequantize(formats.SourceFormat("mxfp4", mx.float32),
                                 {prefix + proj + "_blocks": mx.array(blocks), prefix + proj + "_scales": mx.array(scales)})
        assert list(got) == [prefix + proj]
        np.testing.assert_array_equal(np.array(got[prefix + proj]), want.swapaxes(-1, -2))  # float layout [E, in, out]
        hf = convert_moe_packed_tensors(torch.from_numpy(blocks.copy()), torch.from_numpy(scales.copy()), dtype=torch.float32)
        np.testing.assert_array_equal(hf.numpy(), want.swapaxes(-1, -2))
        # mlx-lm keeps MXFP4 packed (mode "mxfp4"); its dequantisation of what its sanitize makes
        theirs = mlx_lm_model.sanitize({prefix + proj + "_blocks": mx.array(blocks), prefix + proj + "_scales": mx.array(scales)})
        for name, rows in ((("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))) if proj == "gate_up_proj"
                           else (("down_proj", slice(None)),)):
            deq = mx.dequantize(theirs[prefix + name + ".weight"], theirs[prefix + name + ".scales"], None,
                                group_size=32, bits=4, mode="mxfp4")
            np.testing.assert_array_equal(np.array(deq.astype(mx.float32)), want[:, rows])



@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_mxfp4_dequantisation_is_exact_for_every_byte_and_scale(dtype):
    """Every code byte under every e8m0 scale (NaN at 0xff, float32 subnormals at the
    bottom, inf past the top): the bfloat16 result, computed in bfloat16, is the exact
    value rounded once, as float32 and float16 are."""
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16), (256, 16, 16)).copy()
    scales = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 16)).copy()
    with np.errstate(over="ignore", invalid="ignore"):
        want = _mxfp4(blocks, scales)  # float64 maths, one rounding
    want[255] = np.nan  # e8m0 0xff
    want = mx.array(want).astype(dtype)
    got = formats.dequantize_mxfp4(mx.array(blocks), mx.array(scales), dtype)
    assert got.dtype == dtype and got.shape == (256, 512)
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))

# -- converted stores -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["mlx4", "mlx8"])
def test_mlx_source_codes_are_the_top_level_and_nest_below(fmt, ckpts, stores):
    """Every expert's top level is the source's codes, scales and biases bit for bit; level k
    holds the top level_bits(k) bits of each code."""
    path = ckpts[fmt]
    bits = int(fmt[3:])
    with Store.open(stores[fmt]) as store:
        man = store.manifest
        spec = mwq.MWQSpec.from_dict(man["mwq"])
        assert spec.level_bits(spec.num_levels - 1) == bits and man["source_format"]["inexact_groups"] == 0
        layout = make_layout("levels", spec)
        for layer, sw in ((int(k), v) for k, v in man["switch_modules"].items()):
            for e in range(man["num_experts"]):
                blocks = {c: store.read_block(layer, c, e) for c in range(spec.num_levels)}
                for level, part in enumerate(layout.parts):
                    slot = build_part(part, spec, blocks, "test")
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        src = f"{sw}.{proj}"
                        words = _raw(path, src + ".weight")[e]
                        s = (_raw(path, src + ".scales")[e].astype(np.uint32) << 16).view(np.float32)
                        b = (_raw(path, src + ".biases")[e].astype(np.uint32) << 16).view(np.float32)
                        n = words.shape[-1] * 32 // bits
                        want = unpack_codes(words, bits, n) >> (bits - spec.level_bits(level))
                        assert np.array_equal(unpack_codes(slot[f"{proj}.weight"], part.bits, n), want)
                        if level == spec.num_levels - 1:
                            np.testing.assert_array_equal(slot[f"{proj}.weight"], words)
                            np.testing.assert_array_equal(slot[f"{proj}.scales"], s)
                            np.testing.assert_array_equal(slot[f"{proj}.biases"], b)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4", "mlx4", "mlx8"])
def test_top_level_logits_match_mlx_lm_loading_the_source(fmt, ckpts, stores):
    want = _logits(_mlx_lm_load(ckpts[fmt]))
    got = _logits(load_model(stores[fmt], dtype="float32")[0])
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    # mlx: the same codes, dense weights dequantised exactly: float rounding only;
    # fp8/mxfp4: the store's top level is an 8-bit MWQ fit of the dequantised weights
    assert err < (1e-5 if fmt.startswith("mlx") else 0.02), f"{fmt}: relative logit error {err}"


def _float_twin(path, out, decode):
    """A float32 checkpoint of ``path``'s dequantised weights (``decode(tensors) -> tensors``)."""
    from safetensors.numpy import save_file

    shutil.copytree(path, out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    header_names = list(formats.read_index(path))
    save_file(decode({n: _raw(path, n) for n in header_names}), str(out / "model.safetensors"))
    return out


def test_fp8_and_mxfp4_convert_like_their_float_twins(ckpts, stores, tmp_path):
    """The converter reads the dequantised weights: a float32 checkpoint of the numpy decode
    gives the identical store (every expert block's checksum)."""
    def fp8(t):
        out = {}
        for n, v in t.items():
            if n.endswith("_scale_inv"):
                continue
            if n + "_scale_inv" in t:
                s = t[n + "_scale_inv"]
                v = _e4m3(v) * np.repeat(np.repeat(s, 128, 0), 128, 1)[: v.shape[0], : v.shape[1]]
            out[n] = np.ascontiguousarray(v)
        return out

    def mxfp4(t):
        out = {}
        for n, v in t.items():
            if n.endswith("_scales"):
                continue
            if n.endswith("_blocks"):
                n, v = n[: -len("_blocks")], _mxfp4(v, t[n[: -len("_blocks")] + "_scales"]).swapaxes(-1, -2)
            out[n] = np.ascontiguousarray(v)
        return out

    for fmt, decode in (("fp8", fp8), ("mxfp4", mxfp4)):
        twin = convert(_float_twin(ckpts[fmt], tmp_path / fmt, decode), tmp_path / (fmt + "-store"), method="rtn", **FAST)
        with Store.open(stores[fmt]) as a, Store.open(twin.path) as b:
            assert a.manifest["experts"] == b.manifest["experts"], fmt


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_files_convert_like_float32_of_the_same_values(dtype, ckpts, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    src = ckpts["qwen3_moe"]
    tensors = load_file(str(src / "model.safetensors"))
    half = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors.items()}
    dirs = {}
    for name, ts in (("half", half), ("twin", {k: v.float().contiguous() for k, v in half.items()})):
        shutil.copytree(src, tmp_path / name)
        save_file(ts, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        dirs[name] = convert(tmp_path / name, tmp_path / (name + "-store"), method="rtn", **FAST).path
    assert formats.read_index(tmp_path / "half")["lm_head.weight"].dtype == {"bfloat16": "BF16", "float16": "F16"}[dtype]
    with Store.open(dirs["half"]) as a, Store.open(dirs["twin"]) as b:
        assert a.manifest["experts"] == b.manifest["experts"]


# -- bad input --------------------------------------------------------------------------

def _edit(src, out, change_tensors=None, change_config=None):
    """A copy of checkpoint ``src`` with its tensors and/or config edited."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    if change_tensors:
        files = sorted(out.glob("*.safetensors"))
        t = load_file(str(files[0]))
        change_tensors(t)
        save_file(t, str(files[0]), metadata={"format": "mlx" if "mlx" in src.name else "pt"})
    if change_config:
        cfg = json.loads((out / "config.json").read_text())
        change_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_unknown_quant_method_is_refused_by_name(ckpts, tmp_path):
    bad = _edit(ckpts["fp8"], tmp_path / "c", change_config=lambda c: c["quantization_config"].update(quant_method="hqq"))
    with pytest.raises(SourceError, match=r"'hqq' is not supported.*fp8, mxfp4, mlx"):
        prepare(bad, tmp_path / "s")
    bad = _edit(ckpts["fp8"], tmp_path / "e5", change_config=lambda c: c["quantization_config"].update(fmt="e5m2"))
    with pytest.raises(SourceError, match="e5m2"):
        prepare(bad, tmp_path / "s")


def test_missing_or_misshapen_scales_are_named_with_their_file(ckpts, tmp_path):
    import torch

    w = "model.layers.1.mlp.experts.2.gate_proj.weight"
    bad = _edit(ckpts["fp8"], tmp_path / "a", lambda t: t.pop(w + "_scale_inv"))
    with pytest.raises(SourceError, match=rf"{w} in model.safetensors is FP8.*{w}_scale_inv is missing"):
        prepare(bad, tmp_path / "s")
    bad = _edit(ckpts["fp8"], tmp_path / "b", lambda t: t.update({w + "_scale_inv": torch.ones(1, 1)}))
    with pytest.raises(SourceError, match=rf"{w}_scale_inv in model.safetensors has shape \[1, 1\].*needs \[2, 1\]"):
        prepare(bad, tmp_path / "s")
    blocks = "model.layers.0.mlp.experts.down_proj"
    bad = _edit(ckpts["mxfp4"], tmp_path / "c", lambda t: t.pop(blocks + "_scales"))
    with pytest.raises(SourceError, match=rf"{blocks}_blocks in model.safetensors has no {blocks}_scales"):
        prepare(bad, tmp_path / "s")
    bad = _edit(ckpts["mxfp4"], tmp_path / "d", lambda t: t.update({blocks + "_scales": t[blocks + "_scales"][:, :, :1].contiguous()}))
    with pytest.raises(SourceError, match=rf"{blocks}_scales in model.safetensors is U8 \[8, 64, 1\]"):
        prepare(bad, tmp_path / "s")
    sw = "model.layers.1.mlp.switch_mlp.up_proj"
    bad = _edit(ckpts["mlx4"], tmp_path / "e", lambda t: t.update({sw + ".biases": t[sw + ".biases"][:, :4].contiguous()}))
    with pytest.raises(SourceError, match=rf"{sw}.biases in model.safetensors has shape"):
        prepare(bad, tmp_path / "s")
    with pytest.raises(SourceError, match=r"4-bit with group size 64.*--levels 2,4 --group-size 64"):
        prepare(ckpts["mlx4"], tmp_path / "s", spec=mwq.MWQSpec(2, (2, 4), 64))
    with pytest.raises(SourceError, match=r"group size 64.*--group-size 64"):
        prepare(ckpts["mlx8"], tmp_path / "s", spec=mwq.MWQSpec(2, (2, 4), 128))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_sliced_levels_of_mx_quantize_codes(bits):
    """Any width mlx quantizes to: the top level is mx.dequantize's weights exactly, each
    level below is the top bits of the codes and its error grows as bits drop."""
    from d2moe_mlx.convert.from_codes import components, spec_for

    w = mx.random.normal((48, 256), key=mx.random.key(bits)).astype(mx.float16)
    q, s, b = mx.quantize(w, group_size=64, bits=bits)
    spec = spec_for(bits, 64)
    assert spec.level_bits(spec.num_levels - 1) == bits
    comps, inexact = components(np.array(q), np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32)), bits, spec)
    assert inexact == 0
    want = np.array(mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=bits))
    np.testing.assert_array_equal(mwq.reconstruct(comps, 64, spec.num_levels - 1), want)
    codes = unpack_codes(np.array(q), bits, 256)
    errs = []
    for level in range(spec.num_levels):
        rem = bits - spec.level_bits(level)
        got = comps[0].codes.astype(np.int32) << sum(spec.plane_bits[:level])
        for j in range(1, level + 1):
            got = got | (comps[j].codes.astype(np.int32) << sum(spec.plane_bits[j:level]))
        np.testing.assert_array_equal(got, codes >> rem)
        errs.append(np.abs(mwq.reconstruct(comps, 64, level) - np.array(w.astype(mx.float32))).mean())
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_mlx_source_with_unquantized_override_and_wrong_dtype_is_refused(ckpts, tmp_path):
    gate = "model.layers.0.mlp.gate"
    bad = _edit(ckpts["mlx4"], tmp_path / "a", change_config=lambda c: c["quantization"].update({gate: False}))
    with pytest.raises(SourceError, match=rf"{gate}.scales in model.safetensors: config.json marks {gate} as not quantized"):
        prepare(bad, tmp_path / "s")
    bad = _edit(ckpts["mlx4"], tmp_path / "b", change_config=lambda c: c["quantization"].update(mode="fp3"))
    with pytest.raises(SourceError, match="mode 'fp3' is not supported"):
        prepare(bad, tmp_path / "s")


def test_deepseek_mtp_layer_is_skipped_only_when_the_config_declares_it(ckpts, tmp_path):
    """DeepSeek-V3 repos carry num_nextn_predict_layers extra layers after the decoder layers."""
    import torch

    def add_mtp(t):
        t["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
        t["model.layers.3.enorm.weight"] = torch.ones(64)

    ok = _edit(ckpts["fp8"], tmp_path / "a", add_mtp)
    assert json.loads((ok / "config.json").read_text())["num_nextn_predict_layers"] == 1  # as DeepSeek-V3's
    job = prepare(ok, tmp_path / "s")
    assert not any(n.startswith("model.layers.3.") for n in job.weights)
    bad = _edit(ok, tmp_path / "b", change_config=lambda c: c.update(num_nextn_predict_layers=0))
    with pytest.raises(SourceError, match=r"layers \[0, 1, 2, 3\].*describes 3 layers"):
        prepare(bad, tmp_path / "s")


@pytest.mark.parametrize("mode,bits,group_size", [("affine", 3, 32), ("affine", 6, 128), ("mxfp4", 4, 32), ("mxfp8", 8, 32)])
@pytest.mark.parametrize("shape", [(32, 256), (2, 32, 256)], ids=["dense", "experts"])
def test_mlx_modes_dequantise_as_mx_dequantize(mode, bits, group_size, shape):
    """Every mlx mode a checkpoint may use: the values mx.dequantize gives (dense weights in
    float32; stacked experts in their scales' dtype, bfloat16 here, or float32 for fp modes)."""
    w = mx.random.normal(shape, key=mx.random.key(7)) * 0.1
    q = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    tensors = {"m.weight": q[0], "m.scales": q[1]}
    if mode == "affine":
        tensors["m.scales"], tensors["m.biases"] = q[1].astype(mx.bfloat16), q[2].astype(mx.bfloat16)
    fmt = formats.SourceFormat("mlx", quantization={"group_size": 64, "bits": 4, "m": {"group_size": group_size,
                                                                                       "bits": bits, "mode": mode}})
    got = formats.dequantize(fmt, tensors)
    assert list(got) == ["m.weight"]
    affine = mode == "affine"
    want = mx.dequantize(tensors["m.weight"], tensors["m.scales"].astype(mx.float32) if affine else tensors["m.scales"],
                         tensors["m.biases"].astype(mx.float32) if affine else None,
                         group_size=group_size, bits=bits, mode=mode)
    want = want.astype(mx.bfloat16 if affine and len(shape) == 3 else mx.float32)  # fp modes: exact either way
    assert got["m.weight"].dtype == want.dtype
    np.testing.assert_array_equal(np.array(got["m.weight"].astype(mx.float32)), np.array(want.astype(mx.float32)))
    assert np.abs(np.array(want.astype(mx.float32)) - np.array(w)).max() < 0.1  # the reference decodes w
