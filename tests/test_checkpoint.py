"""Checkpoint discovery and key mapping, and atomic outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from csulora import Checkpoint, CsuloraError
from csulora.checkpoint import match_module
from csulora.safe_output import atomic_dir, atomic_file


def test_match_module_tolerates_prefixes():
    names = ["h.0.attn.c_attn", "h.1.attn.c_attn", "h.0.mlp.c_fc"]
    assert match_module("transformer.h.0.attn.c_attn", names) == "h.0.attn.c_attn"
    assert match_module("h.1.attn.c_attn", ["transformer.h.1.attn.c_attn"]) == "transformer.h.1.attn.c_attn"
    assert match_module("h.2.attn.c_attn", names) is None
    # an ambiguous suffix is not guessed
    assert match_module("attn.c_attn", ["a.attn.c_attn", "b.attn.c_attn"]) is None


def write_checkpoint(directory, tensors, shards=1):
    directory.mkdir()
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(directory / name))
        weight_map |= {k: name for k in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def test_sharded_and_single_file_read_the_same(tmp_path):
    tensors = {f"layers.{i}.proj.weight": torch.randn(4, 3, dtype=torch.bfloat16) for i in range(5)}
    tensors["layers.0.proj.bias"] = torch.randn(4)
    single = Checkpoint(write_checkpoint(tmp_path / "single", tensors))
    sharded = Checkpoint(write_checkpoint(tmp_path / "sharded", tensors, shards=3))
    for key, value in tensors.items():
        assert torch.equal(single.read(key), value) and torch.equal(sharded.read(key), value)
        assert single.read(key).dtype == value.dtype
    assert sharded.linear_modules(["proj"]) == [f"layers.{i}.proj" for i in range(5)]
    assert sharded.weight_key("model.layers.3.proj") == "layers.3.proj.weight"
    with pytest.raises(CsuloraError, match="no weight for module model.layers.9.proj"):
        sharded.weight_key("model.layers.9.proj")


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    directory = write_checkpoint(tmp_path / "c", {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2, 2)}, 2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CsuloraError, match="shard model-00002-of-00002.safetensors is missing"):
        Checkpoint(directory)


def test_empty_directory_and_file_paths(tmp_path):
    with pytest.raises(CsuloraError, match="no model.safetensors"):
        Checkpoint(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(CsuloraError, match="expected a checkpoint directory"):
        Checkpoint(tmp_path / "f")


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out, force=True, owned=lambda path: True) as tmp:
        raise RuntimeError("boom")
    assert (out / "old").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(out, force=True, owned=lambda path: True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_refuses_to_overwrite(tmp_path):
    target = tmp_path / "f.bin"
    with atomic_file(target) as tmp:
        tmp.write_text("one")
    with pytest.raises(CsuloraError, match="already exists"), atomic_file(target) as tmp:
        tmp.write_text("two")
    assert target.read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
