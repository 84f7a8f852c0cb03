"""Tests of the on-disk expert store (d2moe_mlx.store): synthetic blocks, no converter."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from d2moe_mlx.store import (
    BLOCK_ALIGN, FORMAT_VERSION, MANIFEST_NAME, TENSOR_ALIGN, Store, StoreError,
    StoreWriter, block_layout, expert_file_name,
)
from d2moe_mlx.store.format import DTYPES

LAYERS = (1, 3)
COMPONENTS = 3
EXPERTS = 5


def make_block(rng, component, out=48, inp=64, group=32):
    bits = 2 if component == 0 else 1
    d = {}
    for proj in ("gate_proj", "down_proj"):
        d[f"{proj}.weight"] = rng.integers(0, 2**32, (out, inp * bits // 32), dtype=np.uint32)
        d[f"{proj}.scales"] = rng.standard_normal((out, inp // group)).astype(np.float16)
        if component == 0:
            d[f"{proj}.biases"] = rng.standard_normal((out, inp // group)).astype(np.float16)
            d[f"{proj}.bias"] = rng.standard_normal(out).astype(np.float32)
    return d


def write_store(out, seed=0, overwrite=False, dense=True, calib=True):
    rng = np.random.default_rng(seed)
    blocks = {(l, c): [make_block(rng, c) for _ in range(EXPERTS)]
              for l in LAYERS for c in range(COMPONENTS)}
    with StoreWriter(out, overwrite=overwrite) as w:
        for (l, c), b in blocks.items():
            w.write_expert_file(l, c, b)
        if dense:
            w.write_dense_shard({"model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32),
                                 "model.norm.weight": mx.ones((8,), dtype=mx.bfloat16)})
            w.write_dense_shard({"lm_head.weight": rng.standard_normal((16, 8)).astype(np.float16)})
        if calib:
            w.write_calib_stats({"counts": rng.integers(0, 100, (len(LAYERS), EXPERTS)).astype(np.int64)})
        w.write_json("config.json", {"model_type": "toy", "seed": seed})
        (w.tmp_dir / "src_tok.json").write_text('{"tok": 1}')
        w.copy_file(w.tmp_dir / "src_tok.json", "tokenizer.json")
        os.remove(w.tmp_dir / "src_tok.json")
        w.finalize(model_manifest())
    return blocks


def model_manifest():
    """What the converter adds to the manifest, for the blocks of make_block (spec 2 + 1 + 1 bits)."""
    return {"model_type": "toy", "num_experts": EXPERTS, "moe_layers": list(LAYERS),
            "mwq": {"base_bits": 2, "plane_bits": [1, 1], "group_size": 32},
            "switch_modules": {str(l): f"model.layers.{l}.mlp.switch_mlp" for l in LAYERS},
            "projections": {p: {"shape": [48, 64], "bias": True} for p in ("gate_proj", "down_proj")},
            "dense": {"bits": 0, "group_size": 64, "dtype": "float32"},
            "calibration": {"tokens": 128, "seq_len": 32, "source": "text (500 available)"}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "store"
    return out, write_store(out)


@pytest.fixture
def store(built, tmp_path):
    """A private copy of the module's store, free to damage."""
    out = tmp_path / "store"
    shutil.copytree(built[0], out)
    return out, built[1]


def edit_manifest(path, fn):
    m = json.loads((path / MANIFEST_NAME).read_text())
    fn(m)
    (path / MANIFEST_NAME).write_text(json.dumps(m))


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


# -- round trip --------------------------------------------------------------
def test_round_trip_read_block(built):
    out, blocks = built
    with Store.open(out) as s:
        assert s.moe_layers == list(LAYERS) and s.num_experts == EXPERTS
        assert s.config == {"model_type": "toy", "seed": 0}
        for (l, c), bl in blocks.items():
            assert s.num_components(l) == COMPONENTS
            for e, want in enumerate(bl):
                got = s.read_block(l, c, e)
                assert list(got) == list(want)
                for k, v in want.items():
                    assert got[k].dtype == v.dtype and np.array_equal(got[k], v), (l, c, e, k)


def test_read_block_into_numpy_and_mlx_buffer(built):
    out, blocks = built
    with Store.open(out) as s:
        bb = s.block_bytes(3, 1)
        buf = np.zeros(bb + 100, np.uint8)
        s.read_block_into(3, 1, 4, buf)
        views = s.tensor_views(3, 1, buf)
        for k, v in blocks[(3, 1)][4].items():
            assert np.array_equal(views[k], v)
        # zero-copy into MLX memory, as the streaming runtime does
        slot = mx.zeros((bb,), dtype=mx.uint8)
        mx.eval(slot)
        s.read_block_into(3, 1, 2, np.asarray(slot))
        ref = np.zeros(bb, np.uint8)
        s.read_block_into(3, 1, 2, ref)
        assert np.array_equal(np.array(slot), ref)
        w = s.layout(3, 1)[0]
        got = mx.array(np.array(slot)[w.offset:w.offset + w.nbytes]).view(mx.uint32).reshape(w.shape)
        assert np.array_equal(np.array(got), blocks[(3, 1)][2][w.name])
        with pytest.raises(ValueError):
            s.read_block_into(3, 1, 0, np.zeros(bb - 1, np.uint8))
        with pytest.raises(ValueError):
            s.read_block_into(3, 1, 0, np.zeros(2 * bb, np.uint8)[::2])
        ro = np.zeros(bb, np.uint8)
        ro.flags.writeable = False
        with pytest.raises(ValueError):
            s.read_block_into(3, 1, 0, ro)
        words = np.zeros((2, (bb + 7) // 8), np.uint32)  # any dtype/shape, bytes in order
        s.read_block_into(3, 1, 2, words)
        assert np.array_equal(words.reshape(-1).view(np.uint8)[:bb], ref)
        with pytest.raises(IndexError):
            s.read_block(3, 1, EXPERTS)
        with pytest.raises(KeyError):
            s.read_block(2, 0, 0)


def test_read_expert_stack(built):
    out, blocks = built
    with Store.open(out) as s:
        for (l, c), bl in blocks.items():
            st = s.read_expert_stack(l, c)
            for k in bl[0]:
                assert np.array_equal(st[k], np.stack([b[k] for b in bl]))
        sub = s.read_expert_stack(1, 0, experts=[4, 0, 2])
        for k in blocks[(1, 0)][0]:
            assert np.array_equal(sub[k], np.stack([blocks[(1, 0)][i][k] for i in (4, 0, 2)]))


def test_alignment_and_padding(built):
    out, _ = built
    with Store.open(out) as s:
        for l in s.moe_layers:
            for c in range(s.num_components(l)):
                stride = s.block_stride(l, c)
                assert stride % BLOCK_ALIGN == 0 and s.block_bytes(l, c) <= stride
                assert all(t.offset % TENSOR_ALIGN == 0 for t in s.layout(l, c))
                data = s.expert_file(l, c).read_bytes()
                assert len(data) == EXPERTS * stride
                for e in range(EXPERTS):  # offset = e * stride, a multiple of 16 KiB
                    pad = data[e * stride + s.block_bytes(l, c):(e + 1) * stride]
                    assert pad == bytes(len(pad))
        assert s.verify() == []


def test_block_layout_offsets():
    specs, nbytes = block_layout({"a": np.zeros(3, np.uint8), "b": np.zeros((2, 5), np.float32),
                                  "c": np.zeros(1, np.float16)})
    assert [t.offset for t in specs] == [0, 64, 128] and nbytes == 192
    with pytest.raises(ValueError):
        block_layout({"a": np.zeros(2, np.float64)})


def test_bf16_mlx_tensors(tmp_path):
    w16 = mx.random.normal((4, 8)).astype(mx.bfloat16)
    with StoreWriter(tmp_path / "s") as w:
        w.write_expert_file(0, 0, [{"w.scales": w16}, {"w.scales": w16 * 2}])
        w.write_json("config.json", {})
        w.finalize({})
    with Store.open(tmp_path / "s") as s:
        assert s.layout(0, 0)[0].dtype == "bfloat16"
        got = mx.array(s.read_block(0, 0, 1)["w.scales"]).view(mx.bfloat16)
        assert mx.array_equal(got, w16 * 2).item()


def test_dense_calib_summary(built):
    out, _ = built
    with Store.open(out) as s:
        files = s.dense_files()
        assert [f.name for f in files] == ["model-00001-of-00002.safetensors",
                                           "model-00002-of-00002.safetensors"]
        # mlx-lm's load_model globs model*.safetensors: exactly the dense shards
        assert sorted(out.glob("model*.safetensors")) == files
        idx = json.loads((out / "model.safetensors.index.json").read_text())
        assert idx["weight_map"]["lm_head.weight"] == files[1].name
        w = mx.load(str(files[0]))
        assert w["model.norm.weight"].dtype == mx.bfloat16
        assert s.calib_stats()["counts"].shape == (len(LAYERS), EXPERTS)
        summ = s.summary()
        assert set(summ["components"]) == set(range(COMPONENTS))
        assert summ["level_bytes"][COMPONENTS - 1] == sum(
            d["block_bytes"] for d in summ["components"].values())
        assert (out / "tokenizer.json").read_text() == '{"tok": 1}'
        assert json.loads((out / MANIFEST_NAME).read_text())["mwq"]["base_bits"] == 2


# -- corruption ----------------------------------------------------------------
def test_flipped_byte_in_expert_file(store):
    out, _ = store
    with Store.open(out) as s:
        path, off = s.expert_file(3, 2), 3 * s.block_stride(3, 2) + 70
    flip_byte(path, off)
    with Store.open(out) as s:
        s.read_block(3, 2, 2)  # other experts are fine
        with pytest.raises(StoreError, match=r"L003\.c2\.bin.*expert 3"):
            s.read_block(3, 2, 3)
        with pytest.raises(StoreError, match="expert 3"):
            s.read_expert_stack(3, 2)
        s.read_block(3, 2, 3, verify=False)
        problems = s.verify()
    assert len(problems) == 1 and "L003.c2.bin" in problems[0] and "expert 3" in problems[0]


def test_nonzero_padding_reported(store):
    out, _ = store
    with Store.open(out) as s:
        path, off = s.expert_file(1, 0), s.block_stride(1, 0) - 1
    flip_byte(path, off)
    with Store.open(out) as s:
        s.read_block(1, 0, 0)
        assert any("padding" in p for p in s.verify())


def test_flipped_byte_in_dense_shard(store):
    out, _ = store
    shard = out / "model-00002-of-00002.safetensors"
    flip_byte(shard, shard.stat().st_size - 3)
    with Store.open(out) as s:
        problems = s.verify()
    assert len(problems) == 1 and shard.name in problems[0]


def test_truncated_expert_file(store):
    out, _ = store
    path = out / expert_file_name(1, 1)
    os.truncate(path, path.stat().st_size - BLOCK_ALIGN)
    with pytest.raises(StoreError, match=r"L001\.c1\.bin: truncated"):
        Store.open(out)


def test_missing_plane_file(store):
    out, _ = store
    os.remove(out / expert_file_name(3, 2))
    with pytest.raises(StoreError, match=r"L003\.c2\.bin: file is missing"):
        Store.open(out)


def test_missing_dense_shard_and_manifest(store):
    out, _ = store
    os.remove(out / "model-00001-of-00002.safetensors")
    with pytest.raises(StoreError, match="model-00001-of-00002.safetensors: file is missing"):
        Store.open(out)
    os.remove(out / MANIFEST_NAME)
    with pytest.raises(StoreError, match="d2moe.json: missing manifest.*d2moe convert"):
        Store.open(out)


def test_newer_version_refused(store):
    out, _ = store
    edit_manifest(out, lambda m: m.update(version=FORMAT_VERSION + 1))
    with pytest.raises(StoreError) as ei:
        Store.open(out)
    msg = str(ei.value)
    assert MANIFEST_NAME in msg and f"version {FORMAT_VERSION + 1}" in msg
    assert f"supported version {FORMAT_VERSION}" in msg and "upgrade d2moe-mlx" in msg


@pytest.mark.parametrize("text", ['{"format": "d2moe-mwq", "version": 1', "[1, 2]", "",
                                  "[" * 100000, '{"format": "other", "version": 1}'],
                         ids=["truncated", "list", "empty", "deep", "other-format"])
def test_corrupted_manifest(store, text):
    out, _ = store
    (out / MANIFEST_NAME).write_text(text)
    with pytest.raises(StoreError, match=MANIFEST_NAME):
        Store.open(out)


# -- hostile manifests -----------------------------------------------------------
def _add_file(name, size=2, crc=0):
    return lambda m: m["files"].update({name: {"size": size, "crc32": crc}})


def test_path_traversal_refused(store, tmp_path):
    out, _ = store
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    for name in ("../outside.json", str(outside), "a/../../outside.json", "./config.json",
                 "experts//L001.c0.bin", "x\\..\\y", ""):
        edit_manifest(out, _add_file(name))
        with pytest.raises(StoreError, match="not a plain relative path"):
            Store.open(out)
        edit_manifest(out, lambda m: m["files"].pop(name))
    Store.open(out).close()
    # a symlink escaping the store, even with the right size and checksum
    link = out / "evil.json"
    link.symlink_to(outside)
    edit_manifest(out, _add_file("evil.json", 2, zlib.crc32(b"{}")))
    with pytest.raises(StoreError, match="outside the store"):
        Store.open(out)


def test_symlinked_expert_file_outside_refused(store, tmp_path):
    out, _ = store
    path = out / expert_file_name(1, 2)
    moved = tmp_path / "moved.bin"
    os.replace(path, moved)
    path.symlink_to(moved)
    with pytest.raises(StoreError, match="outside the store"):
        Store.open(out)


def _entry(m, i=0):
    return m["experts"]["files"][i]


def _tensor(m, name, i=0):
    return next(t for t in _entry(m, i)["tensors"] if t["name"] == name)


# The sections the runtime reads: mwq, switch_modules, dense, projections (and their fit
# with the expert files). Entry 0 is layer 1 component 0 (2-bit base); entry 1 a 1-bit plane.
MODEL_MUTATIONS = [
    (lambda m: m["mwq"].update(plane_bits=[1]), "layer 1 has 3 components.*'mwq'.*2 levels"),
    (lambda m: m["mwq"].update(plane_bits=[1, 1, 1]), "layer 1 has 3 components.*'mwq'.*4 levels"),
    (lambda m: m["mwq"].update(base_bits=7), "'mwq'.*base of 7 bits"),
    (lambda m: m["mwq"].update(plane_bits=[0, 1]), "'mwq'.*plane of 0 bits"),
    (lambda m: m["mwq"].update(plane_bits=[1, 7]), "'mwq'.*plane of 7 bits"),
    (lambda m: m["mwq"].update(base_bits="2"), "'mwq'"),
    (lambda m: m["mwq"].update(base_bits=True), "'mwq'"),
    (lambda m: m["mwq"].update(plane_bits="11"), "'mwq'"),
    (lambda m: m["mwq"].update(group_size=48), "'mwq'.*group size 48"),
    (lambda m: m["mwq"].pop("group_size"), "'mwq'"),
    (lambda m: m["mwq"].update(nested="yes"), "'mwq' nested must be true or false"),
    (lambda m: m.update(mwq=[2, 1, 1]), "'mwq'"),
    (lambda m: m.pop("mwq"), "'mwq'.*missing"),
    (lambda m: m.update(switch_modules=["model.layers.1.mlp.switch_mlp"]), "'switch_modules'"),
    (lambda m: m["switch_modules"].update({"1": 5}), "'switch_modules'"),
    (lambda m: m["switch_modules"].update({"1": ""}), "'switch_modules'"),
    (lambda m: m["switch_modules"].update({"x": "model.layers.x"}), "'switch_modules'"),
    (lambda m: m["switch_modules"].update({"01": "model.layers.1.mlp"}), "'switch_modules'"),
    (lambda m: m["switch_modules"].pop("3"), "'switch_modules'.*layers"),
    (lambda m: m["switch_modules"].update({"2": "model.layers.2.mlp.switch_mlp"}), "'switch_modules'.*layers"),
    (lambda m: m.pop("switch_modules"), "'switch_modules'.*missing"),
    (lambda m: m["dense"].update(dtype="float64"), "'dense'.*dtype"),
    (lambda m: m["dense"].update(dtype=None), "'dense'.*dtype"),
    (lambda m: m["dense"].update(bits=7), "'dense'.*bits"),
    (lambda m: m["dense"].update(bits="8"), "'dense'.*bits"),
    (lambda m: m["dense"].update(group_size=0), "'dense'.*group_size"),
    (lambda m: m["dense"].pop("dtype"), "'dense'.*dtype"),
    (lambda m: m.update(dense="float32"), "'dense'"),
    (lambda m: m.pop("dense"), "'dense'.*missing"),
    (lambda m: m.update(model_type=3), "'model_type'"),
    (lambda m: m.update(calibration=[128]), "'calibration'"),
    (lambda m: m["calibration"].update(tokens="many"), "'calibration'"),
    (lambda m: m.update(projections={}), "'projections'"),
    (lambda m: m.update(projections=[]), "'projections'"),
    (lambda m: m.pop("projections"), "'projections'.*missing"),
    (lambda m: m["projections"]["gate_proj"].update(shape=[48, 128]), "gate_proj.weight"),
    (lambda m: m["projections"]["gate_proj"].update(shape=[96, 32]), "gate_proj.weight"),
    (lambda m: m["projections"]["gate_proj"].update(shape=[48, 48]), "gate_proj.*group_size"),
    (lambda m: m["projections"]["gate_proj"].update(shape=[48]), "'projections'.*gate_proj"),
    (lambda m: m["projections"]["gate_proj"].update(shape=[0, 64]), "'projections'.*gate_proj"),
    (lambda m: m["projections"]["gate_proj"].update(bias="yes"), "'projections'.*gate_proj"),
    (lambda m: m["projections"]["gate_proj"].update(bias=False), "unexpected.*gate_proj.bias"),
    (lambda m: m["projections"].pop("down_proj"), "unexpected.*down_proj"),
    (lambda m: m["projections"].update(up_proj={"shape": [48, 64], "bias": False}), "missing.*up_proj"),
    (lambda m: m["projections"].update({"a.b": {"shape": [48, 64], "bias": False}}), "'projections'"),
    (lambda m: _tensor(m, "gate_proj.scales").update(dtype="int16"), "gate_proj.scales.*float16"),
    (lambda m: _tensor(m, "gate_proj.bias").update(dtype="int32"), "gate_proj.bias"),
    (lambda m: _tensor(m, "gate_proj.weight").update(dtype="int32"), "gate_proj.weight.*uint32"),
    (lambda m: _tensor(m, "gate_proj.weight").update(shape=[24, 8]), "gate_proj.weight.*48, 4"),
    (lambda m: _tensor(m, "gate_proj.weight", 1).update(shape=[24, 4]), "gate_proj.weight.*48, 2"),
    (lambda m: _tensor(m, "down_proj.scales", 1).update(shape=[96, 1]), "down_proj.scales.*48, 2"),
]


@pytest.mark.parametrize("mutate,match", MODEL_MUTATIONS)
def test_model_sections_validated_before_allocation(store, monkeypatch, mutate, match):
    """A bad mwq / switch_modules / dense / projections section is a StoreError naming
    d2moe.json and the field, raised at open, before anything is allocated."""
    out, _ = store
    edit_manifest(out, mutate)
    allocs = []
    real_empty = np.empty
    monkeypatch.setattr(np, "empty", lambda *a, **k: allocs.append(a) or real_empty(*a, **k))
    with pytest.raises(StoreError, match=match) as ei:
        Store.open(out)
    assert str(out / MANIFEST_NAME) in str(ei.value) and "d2moe convert" in str(ei.value)
    assert allocs == []


def test_model_sections_validated_in_a_binary_plane_store(store):
    """1-bit planes store 1 bit per weight and no biases: a plane that has them is refused."""
    out, blocks = store
    with Store.open(out) as s:  # the valid store opens, with the layout the spec implies
        assert [t.shape for t in s.layout(1, 1)][:2] == [(48, 2), (48, 2)]
    edit_manifest(out, lambda m: m["mwq"].update(plane_bits=[2, 1]))  # component 1 claimed 2-bit
    with pytest.raises(StoreError, match=r"component 1.*gate_proj.weight.*48, 4|missing.*biases"):
        Store.open(out)


def test_container_store_without_model_sections_opens(tmp_path):
    """The expert container alone (no model sections at all) still opens; a partial set does not."""
    with StoreWriter(tmp_path / "s") as w:
        w.write_expert_file(0, 0, [{"x": np.zeros(4, np.uint32)}])
        w.write_json("config.json", {})
        w.finalize({"num_experts": 1})
    Store.open(tmp_path / "s").close()
    edit_manifest(tmp_path / "s", lambda m: m.update(mwq={"base_bits": 2, "plane_bits": [], "group_size": 64}))
    with pytest.raises(StoreError, match="missing"):
        Store.open(tmp_path / "s")


def test_format_layout_is_what_the_packer_writes():
    """format.component_tensors (what the reader checks) matches mwq.pack_component (what the
    converter writes) for every component width."""
    from d2moe_mlx import mwq
    from d2moe_mlx.store.format import component_tensors

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    for spec in (mwq.MWQSpec(2, (1, 1), 32), mwq.MWQSpec(3, (2, 3), 64), mwq.MWQSpec(4, (4,), 128)):
        for c, comp in enumerate(mwq.quantize_mwq(w, spec, method="rtn")):
            packed = {f"p.{k}": v for k, v in mwq.pack_component(comp).items()}
            want = component_tensors({"p": (16, 128, False)}, spec.component_bits(c), spec.group_size, c)
            assert set(packed) == set(want), (spec, c)
            for k, v in packed.items():
                assert v.dtype.name in want[k][0] and v.shape == want[k][1], (spec, c, k)
        with_bias = component_tensors({"p": (16, 128, True)}, spec.base_bits, spec.group_size, 0)
        assert with_bias["p.bias"][1] == (16,)
        assert "p.bias" not in component_tensors({"p": (16, 128, True)}, 1, spec.group_size, 1)


@pytest.mark.parametrize("mutate,match", [
    (lambda m: _entry(m)["tensors"][0].update(shape=[2**40, 2**40]), "bad shape|does not fit"),
    (lambda m: _entry(m)["tensors"][0].update(shape=[-1, 4]), "bad shape"),
    (lambda m: _entry(m)["tensors"][0].update(shape=[4] * 20), "bad shape"),
    (lambda m: _entry(m)["tensors"][0].update(shape=[2**20, 2**20]), "does not fit"),
    (lambda m: _entry(m)["tensors"][1].update(offset=2**62), "offset"),
    (lambda m: _entry(m)["tensors"][1].update(offset=65), "offset"),
    (lambda m: _entry(m)["tensors"][1].update(offset=0), "overlap"),
    (lambda m: _entry(m)["tensors"][1].update(offset=True), "offset"),
    (lambda m: _entry(m)["tensors"][0].update(dtype="object"), "dtype"),
    (lambda m: _entry(m)["tensors"][0].update(name=_entry(m)["tensors"][1]["name"]), "duplicate"),
    (lambda m: _entry(m).update(tensors=[]), "tensors"),
    (lambda m: _entry(m).update(num_blocks=10**9), "out of range"),
    (lambda m: _entry(m).update(num_blocks=EXPERTS + 1, crc32=[0] * (EXPERTS + 1)), "truncated"),
    (lambda m: _entry(m).update(block_stride=BLOCK_ALIGN + 64), "multiple"),
    (lambda m: _entry(m).update(block_stride=2**62), "out of range"),
    (lambda m: _entry(m).update(block_bytes=_entry(m)["block_stride"] + 1), "block_bytes|multiple"),
    (lambda m: _entry(m).update(block_bytes=64), "does not fit"),
    (lambda m: _entry(m).update(file="../experts/L001.c0.bin"), "file must be"),
    (lambda m: _entry(m).update(crc32=[0]), "crc32"),
    (lambda m: _entry(m).update(layer="1"), "out of range"),
    (lambda m: m["experts"]["files"].append(dict(_entry(m))), "listed twice"),
    (lambda m: m["experts"]["files"].pop(1), "components"),
    (lambda m: m["experts"].update(block_align=4096), "alignment"),
    (lambda m: m["experts"].update(files={"a": 1}), "files"),
    (lambda m: m.update(num_experts=EXPERTS + 1), "num_experts"),
    (lambda m: m["files"]["config.json"].update(size=2**60), "size"),
    (lambda m: m["files"]["config.json"].update(crc32=-1), "crc32"),
    (lambda m: m.update(dense_files=["/etc/passwd"]), "dense_files"),
    (lambda m: m.update(dense_files=[["x"]]), "dense_files"),
    (lambda m: m.update(dense_files="config.json"), "dense_files"),
    (lambda m: m.update(files=[]), "'files'"),
])
def test_absurd_manifest_refused_before_allocation(store, monkeypatch, mutate, match):
    out, _ = store
    edit_manifest(out, mutate)
    allocs = []
    real_empty = np.empty
    monkeypatch.setattr(np, "empty", lambda *a, **k: allocs.append(a) or real_empty(*a, **k))
    with pytest.raises(StoreError, match=match) as ei:
        Store.open(out)
    assert MANIFEST_NAME in str(ei.value) or "L001.c0.bin" in str(ei.value)
    assert allocs == []


# -- writer: atomicity, overwrite, validation -----------------------------------------
def test_exception_inside_writer_leaves_nothing(tmp_path):
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(out) as w:
            w.write_expert_file(0, 0, [{"x": np.zeros(4, np.uint32)}])
            tmp = w.tmp_dir
            raise RuntimeError("boom")
    assert not out.exists() and not tmp.exists()
    assert list(tmp_path.iterdir()) == []
    with StoreWriter(out) as w:  # leaving the block without finalize() also aborts
        w.write_json("config.json", {})
    assert list(tmp_path.iterdir()) == []


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np
    from d2moe_mlx.store import StoreWriter
    w = StoreWriter(sys.argv[1])
    w.write_json("config.json", {})
    w.write_expert_file(0, 0, [{"x": np.ones(4096, np.uint32)}] * 4)
    print(w.tmp_dir, flush=True)
    time.sleep(60)
""")


def test_sigkill_mid_write_then_next_writer_cleans_up(tmp_path):
    out = tmp_path / "store"
    p = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out)],
                         stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(p.stdout.readline().strip())
        assert tmp.is_dir() and tmp.name.startswith("store.d2moe-tmp-")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not out.exists()
    with pytest.raises(StoreError):
        Store.open(tmp)  # even the temp dir has no manifest: nothing loads
    write_store(out, seed=1)
    assert not tmp.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["store"]
    with Store.open(out) as s:
        assert s.verify() == []


def test_overwrite_semantics(tmp_path):
    out = tmp_path / "store"
    write_store(out, seed=0)
    with pytest.raises(FileExistsError, match="overwrite"):
        StoreWriter(out)
    blocks = write_store(out, seed=7, overwrite=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["store"]
    with Store.open(out) as s:
        assert s.config["seed"] == 7
        assert np.array_equal(s.read_block(1, 0, 0)["gate_proj.weight"],
                              blocks[(1, 0)][0]["gate_proj.weight"])
    # a failed overwrite leaves the old store intact
    with pytest.raises(RuntimeError):
        with StoreWriter(out, overwrite=True):
            raise RuntimeError("boom")
    with Store.open(out) as s:
        assert s.config["seed"] == 7 and s.verify() == []


def test_writer_validation(tmp_path):
    with StoreWriter(tmp_path / "s") as w:
        with pytest.raises(ValueError, match="share one layout"):
            w.write_expert_file(0, 0, [{"x": np.zeros(4, np.uint32)}, {"x": np.zeros(5, np.uint32)}])
        with pytest.raises(ValueError, match="share one layout"):
            w.write_expert_file(0, 1, [{"x": np.zeros(4, np.uint32)}, {"x": np.zeros(4, np.float16)}])
        with pytest.raises(ValueError, match="share one layout"):
            w.write_expert_file(0, 2, [{"x": np.zeros(4, np.uint32)}, {"y": np.zeros(4, np.uint32)}])
        with pytest.raises(ValueError, match="plain file name"):
            w.copy_file(__file__, "../x")
        with pytest.raises(ValueError, match="reserved"):
            w.write_json(MANIFEST_NAME, {})
        with pytest.raises(ValueError, match="config.json"):
            w.finalize({})
        w.write_json("config.json", {})
        with pytest.raises(ValueError, match="set by StoreWriter"):
            w.finalize({"files": {}})
        w.write_expert_file(0, 0, [{"x": np.zeros(4, np.uint32)}] * 2)
        with pytest.raises(ValueError, match="twice"):
            w.write_expert_file(0, 0, [{"x": np.zeros(4, np.uint32)}] * 2)
        w.write_expert_file(0, 2, [{"x": np.zeros(4, np.uint32)}] * 2)
        with pytest.raises(ValueError, match="0..n-1"):
            w.finalize({})
    assert list(tmp_path.iterdir()) == []


def test_dtypes_table_has_no_object_types():
    assert all(dt.kind in "uif" for dt in DTYPES.values())


def test_concurrent_reads_and_readahead_hint(built, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from d2moe_mlx.store import reader

    out, blocks = built
    calls = []
    real = reader.open_for_expert_reads
    monkeypatch.setattr(reader, "open_for_expert_reads",
                        lambda path, mode: calls.append((path, mode)) or real(path, mode))
    with Store.open(out) as s:
        keys = [(l, c, e) for (l, c) in blocks for e in range(EXPERTS)] * 4

        def one(k):
            got = s.read_block(*k)
            return all(np.array_equal(got[n], v) for n, v in blocks[k[:2]][k[2]].items())

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(one, keys))
        assert len(calls) == len(blocks)  # one descriptor per expert file, opened once
        assert {mode for _, mode in calls} == {"random"}  # readahead off for random reads


def test_file_truncated_after_open(store):
    out, _ = store
    with Store.open(out) as s:
        path = s.expert_file(1, 0)
        os.truncate(path, path.stat().st_size - BLOCK_ALIGN + 10)
        with pytest.raises(StoreError, match=r"L001\.c0\.bin: truncated"):
            s.read_block(1, 0, EXPERTS - 1)
        buf = np.empty(s.block_bytes(1, 0), np.uint8)
        with pytest.raises(StoreError, match="truncated"):
            s.read_block_into(1, 0, EXPERTS - 1, buf)
        s.read_block(1, 0, 0)


def test_store_without_calib_or_dense(tmp_path):
    with StoreWriter(tmp_path / "s") as w:
        w.write_expert_file(2, 0, [{"x": np.arange(4, dtype=np.uint32)}])
        w.write_json("config.json", {"a": 1})
        w.finalize({"num_experts": 1})
    with Store.open(tmp_path / "s") as s:
        assert s.calib_stats() is None and s.dense_files() == []
        assert s.moe_layers == [2] and s.num_experts == 1 and s.verify() == []
        assert s.read_block(2, 0, 0)["x"].tolist() == [0, 1, 2, 3]
        with pytest.raises(KeyError):
            s.num_components(0)


def test_clean_stale_tmp_keeps_live_writers(tmp_path):
    from d2moe_mlx.store import clean_stale_tmp

    out = tmp_path / "store"
    live = tmp_path / f"store.d2moe-tmp-{os.getppid()}-aaaa"
    dead = tmp_path / "store.d2moe-tmp-2147483600-bbbb"
    old = tmp_path / "store.d2moe-old-2147483600-cccc"
    other = tmp_path / "other.d2moe-tmp-2147483600-dddd"
    for d in (live, dead, old, other):
        d.mkdir()
    assert sorted(clean_stale_tmp(out)) == sorted([dead, old])
    assert live.exists() and other.exists() and not dead.exists() and not old.exists()


def _use_like_the_runtime(out):
    """Read what load_model (model.py, moe.py) and `d2moe inspect` read from an opened store."""
    from d2moe_mlx import mwq
    from d2moe_mlx.inspect import describe
    from d2moe_mlx.model import DTYPES

    describe(out, verify=False)
    with Store.open(out) as s:
        m = s.manifest
        spec = mwq.MWQSpec.from_dict(m["mwq"])
        assert m["dense"]["dtype"] in DTYPES
        assert sorted(int(k) for k in m["switch_modules"]) == s.moe_layers
        for layer in s.moe_layers:
            assert s.num_components(layer) == spec.num_levels
            for c in range(spec.num_levels):
                block = s.read_block(layer, c, 0, verify=False)
                for name, proj in m["projections"].items():
                    packed = {k.split(".", 1)[1]: v for k, v in block.items() if k.startswith(name + ".")}
                    packed.pop("bias", None)
                    w, scales, biases, bits = mwq.component_to_mlx(packed, spec.component_bits(c))
                    assert (w.shape[0], w.shape[1] * 32 // bits) == tuple(proj["shape"])
                    assert scales.shape == biases.shape == (proj["shape"][0], proj["shape"][1] // spec.group_size)


def test_fuzzed_manifests_raise_only_store_error(store):
    """Random type/value mutations of a valid manifest: StoreError, or a store that opens and
    that the runtime can use (mwq, dense, switch_modules, projections), nothing else."""
    import random

    out, _ = store
    _use_like_the_runtime(out)
    base = json.loads((out / MANIFEST_NAME).read_text())
    values = [None, True, -1, 0, 1, 2**70, 1.5, "x", "../x", "float16", [], {}, [1], [[1]],
              {"a": 1}, "config.json", "experts/L001.c0.bin", BLOCK_ALIGN, "\x00",
              3, 4, 7, 32, 48, 64, "1", "2", "bfloat16", "float64", [48, 64], [1, 1], [2, 1], [48, 2]]

    def paths(o, pre=()):
        if pre:
            yield pre
        items = o.items() if isinstance(o, dict) else enumerate(o[:3]) if isinstance(o, list) else ()
        for k, v in items:
            yield from paths(v, pre + (k,))

    all_paths = list(paths(base))
    rng = random.Random(0)
    for _ in range(400):
        m = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            *parents, key = rng.choice(all_paths)
            o = m
            try:
                for k in parents:
                    o = o[k]
                if isinstance(o, dict) and rng.random() < 0.2:
                    del o[key]
                else:
                    o[key] = rng.choice(values)
            except (KeyError, IndexError, TypeError):
                pass  # an earlier mutation changed the structure
        (out / MANIFEST_NAME).write_text(json.dumps(m))
        try:
            Store.open(out).close()
        except StoreError:
            continue
        _use_like_the_runtime(out)


# -- overwrite: only an empty directory or one of our stores is ever replaced ------------
def _tree(path):
    """{relative path: bytes or '/' for a directory}, without following symlinks."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        out[str(p.relative_to(path))] = "/" if p.is_dir() and not p.is_symlink() else (
            f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes())
    return out


def _assert_refused(tmp_path, out, *names):
    """Writing over ``out`` with overwrite=True is refused naming it and ``names``; nothing changes."""
    before = _tree(tmp_path)
    for attempt in (lambda: StoreWriter(out, overwrite=True), lambda: write_store(out, overwrite=True)):
        with pytest.raises(FileExistsError) as ei:
            attempt()
        msg = str(ei.value)
        assert str(out) in msg and "overwrite" in msg, msg
        for name in names:
            assert name in msg, msg
        assert _tree(tmp_path) == before  # nothing deleted, no temp directory left behind
    return msg


def test_overwrite_refuses_a_directory_that_is_not_a_store(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    msg = _assert_refused(tmp_path, out, "keep.txt")
    assert "not a d2moe store" in msg
    assert (out / "keep.txt").read_text() == "precious"
    # a manifest of another format does not make it ours
    (out / MANIFEST_NAME).write_text(json.dumps({"format": "something-else", "files": {"keep.txt": {}}}))
    _assert_refused(tmp_path, out, "keep.txt")
    (out / MANIFEST_NAME).write_text('{"format": "d2moe-mwq", "files": ')  # unreadable: not provably ours
    _assert_refused(tmp_path, out, "keep.txt")


def test_overwrite_refuses_a_store_holding_user_files(tmp_path):
    out = tmp_path / "store"
    write_store(out)
    (out / "notes.txt").write_text("mine")
    (out / "experts" / "extra.bin").write_bytes(b"mine too")
    (out / "results").mkdir()
    (out / "results" / "run1.json").write_text("{}")
    _assert_refused(tmp_path, out, "notes.txt", "experts/extra.bin", "results/")
    with Store.open(out) as s:  # the store itself is untouched too
        assert s.config["seed"] == 0 and s.verify() == []


def test_overwrite_refuses_many_entries_with_a_short_list(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(30):
        (out / f"f{i:02d}.txt").write_text(str(i))
    msg = _assert_refused(tmp_path, out, "f00.txt", "25 more")
    assert "f29.txt" not in msg


def test_overwrite_replaces_a_damaged_store(tmp_path):
    out = tmp_path / "store"
    write_store(out, seed=0)
    flip_byte(out / expert_file_name(1, 0), 70)
    path = out / expert_file_name(3, 2)
    os.truncate(path, path.stat().st_size - BLOCK_ALIGN)
    (out / "model-00001-of-00002.safetensors").unlink()
    (out / (MANIFEST_NAME + ".partial")).write_text("{")  # the writer's own temporary name
    with pytest.raises(StoreError):
        Store.open(out)
    write_store(out, seed=3, overwrite=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["store"]
    with Store.open(out) as s:
        assert s.config["seed"] == 3 and s.verify() == []


def test_overwrite_replaces_an_empty_directory(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_store(out)  # without overwrite even an empty directory is kept
    write_store(out, seed=4, overwrite=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["store"]
    with Store.open(out) as s:
        assert s.config["seed"] == 4


def test_overwrite_refuses_a_file(tmp_path):
    out = tmp_path / "store"
    out.write_text("not a directory")
    _assert_refused(tmp_path, out)
    assert out.read_text() == "not a directory"


def test_overwrite_symlinks(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    link = tmp_path / "store"
    link.symlink_to(target)
    _assert_refused(tmp_path, link, "not a d2moe store")
    link.unlink()
    link.symlink_to(tmp_path / "nowhere")  # dangling
    _assert_refused(tmp_path, link, "nowhere")
    assert link.is_symlink()
    link.unlink()
    link.symlink_to(tmp_path / "loop")
    (tmp_path / "loop").symlink_to(link)
    _assert_refused(tmp_path, link, "loop")
    (tmp_path / "loop").unlink()
    # a symlink to a store: the link is replaced by the new store, the target kept as it was
    link.unlink()
    write_store(target.with_name("real"), seed=5)
    link.symlink_to(tmp_path / "real")
    write_store(link, seed=6, overwrite=True)
    assert link.is_dir() and not link.is_symlink()
    with Store.open(link) as s, Store.open(tmp_path / "real") as r:
        assert s.config["seed"] == 6 and r.config["seed"] == 5 and r.verify() == []
    assert (target / "keep.txt").read_text() == "precious"


def test_overwrite_checks_again_before_the_final_rename(tmp_path):
    """A directory that appears at ``out`` while the store is written is not replaced either."""
    out = tmp_path / "store"
    with pytest.raises(FileExistsError, match="keep.txt"):
        with StoreWriter(out, overwrite=True) as w:
            w.write_expert_file(0, 0, [{"x": np.zeros(4, np.uint32)}])
            w.write_json("config.json", {})
            out.mkdir()
            (out / "keep.txt").write_text("precious")
            w.finalize({})
    assert sorted(x.name for x in tmp_path.iterdir()) == ["store"]
    assert [x.name for x in out.iterdir()] == ["keep.txt"]


def test_inspect_of_an_expert_container_is_a_store_error(tmp_path):
    from d2moe_mlx.inspect import describe

    with StoreWriter(tmp_path / "s") as w:
        w.write_expert_file(0, 0, [{"x": np.zeros(4, np.uint32)}])
        w.write_json("config.json", {})
        w.finalize({})
    with pytest.raises(StoreError, match=f"{MANIFEST_NAME}: has no model sections"):
        describe(tmp_path / "s")
