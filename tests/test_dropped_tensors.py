"""Checkpoint tensors the text model does not use (vision towers, MTP layers) are dropped
before conversion, with a message saying what they were; the rest converts."""

from __future__ import annotations

import shutil

import mlx.core as mx
import pytest

from d2moe_mlx.convert.convert import prepare
from d2moe_mlx.convert.hf_config import dropped_tensors


def test_dropped_tensors_names_what_they_are():
    names = ["model.language_model.layers.0.mlp.gate.weight", "model.visual.blocks.0.attn.qkv.weight",
             "model.visual.merger.linear_fc1.weight", "mtp.layers.0.mlp.gate.weight", "lm_head.weight"]
    dropped, message = dropped_tensors("qwen3_5_moe", names)
    assert dropped == set(names[1:4])
    assert "1 tensors of the MTP" in message and "2 tensors of the vision tower" in message
    assert dropped_tensors("qwen3_moe", names) == (set(), "")


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe"])
def test_prepare_drops_mtp_and_vision_tensors(family, hf_checkpoint, tmp_path):
    ckpt = tmp_path / "hf"
    shutil.copytree(hf_checkpoint(family), ckpt)
    # An MTP layer as released Qwen3-Next / Qwen3.5 checkpoints carry it: "mtp.layers.0..."
    mx.save_safetensors(str(ckpt / "mtp.safetensors"),
                        {"mtp.layers.0.mlp.gate.weight": mx.zeros((8, 64)), "mtp.fc.weight": mx.zeros((64, 128))})
    job = prepare(ckpt, tmp_path / "store")
    assert not any(k.startswith(("mtp.", "model.visual.")) for k in job.weights)
    assert "2 tensors of the MTP" in job.dropped
    assert ("vision tower" in job.dropped) == (family == "qwen3_5_moe")


def test_prepare_drops_the_kimi_k25_vision_tower(hf_checkpoint, tmp_path):
    job = prepare(hf_checkpoint("kimi_k25"), tmp_path / "store")
    assert job.weights and all(k.startswith("language_model.") for k in job.weights)
    assert "tensors of the vision tower and projector" in job.dropped


@pytest.mark.parametrize("family,tower", [("gemma4", "model.vision_tower."), ("llama4", "vision_model.")])
def test_prepare_drops_gemma4_and_llama4_towers(family, tower, hf_checkpoint, tmp_path):
    job = prepare(hf_checkpoint(family), tmp_path / "store")
    assert not any(k.startswith(tower) or "embed_vision" in k or "multi_modal_projector" in k
                   for k in job.weights)
    assert "vision" in job.dropped and family in job.dropped
