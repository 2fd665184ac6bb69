"""Sharded subspace runs: a deterministic balanced split, and a merge equal to one process's file."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csulora.cli import main
from csulora.errors import CsuloraError
from csulora.shards import assign_shards, parse_shard

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def run(*argv):
    return main([str(a) for a in argv])


@given(st.lists(st.integers(1, 10**6), max_size=60), st.integers(1, 9))
def test_assign_shards_covers_everything_once_and_balances(sizes, count):
    owner = assign_shards(sizes, count)
    assert len(owner) == len(sizes) and all(0 <= s < count for s in owner)
    loads = [sum(size for size, s in zip(sizes, owner, strict=True) if s == shard) for shard in range(count)]
    # largest-first greedy: no shard exceeds the lightest by more than one item
    assert not sizes or max(loads) - min(loads) <= max(sizes)
    assert assign_shards(list(sizes), count) == owner  # deterministic


@pytest.mark.parametrize("bad", ["3", "a/b", "4/4", "-1/4", "0/0", "1/2/3"])
def test_parse_shard_refuses_bad_specs(bad):
    with pytest.raises(CsuloraError, match="--shard"):
        parse_shard(bad)


def _shards(tmp_path, base, aligned, count, *extra, name="part"):
    paths = []
    for index in range(count):
        path = tmp_path / f"{name}{index}.safetensors"
        assert run("subspace", "--base", base, "--aligned", aligned, "--targets", TARGETS, "-o", path, "-q",
                   "--shard", f"{index}/{count}", *extra) == 0  # fmt: skip
        paths.append(path)
    return paths


@pytest.mark.parametrize("count", [1, 3, 20])
def test_merged_shards_equal_a_single_run_byte_for_byte(tmp_path, llama_pair, count, capsys):
    base, aligned = llama_pair
    single = tmp_path / "single.safetensors"
    assert run("subspace", "--base", base, "--aligned", aligned, "--targets", TARGETS, "-o", single, "-q") == 0
    parts = _shards(tmp_path, base, aligned, count)  # 20 shards > 14 modules: some are empty
    merged = tmp_path / "merged.safetensors"
    assert run("subspace", "--merge", *reversed(parts), "-o", merged) == 0
    assert "14 modules" in capsys.readouterr().out
    assert merged.read_bytes() == single.read_bytes()


def test_merge_refuses_incomplete_overlapping_or_foreign_shards(tmp_path, llama_pair, capsys):
    import json

    from conftest import perturbed
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    base, aligned = llama_pair
    parts = _shards(tmp_path, base, aligned, 3)
    out = tmp_path / "merged.safetensors"

    def refused(*files, match):
        assert run("subspace", "--merge", *files, "-o", out) == 2
        err = capsys.readouterr().err
        assert err.startswith("csulora: error: ") and err.count("\n") == 1 and match in err, err
        assert not out.exists()

    refused(parts[0], parts[2], match="in no shard file")
    refused(*parts, parts[1], match="is also in")
    energy = _shards(tmp_path, base, aligned, 3, "--energy", "0.9", name="energy")
    refused(parts[0], parts[1], energy[2], match="settings differs")
    other = tmp_path / "other"
    perturbed(LlamaForCausalLM.from_pretrained(base), seed=2).save_pretrained(other)
    foreign = _shards(tmp_path, base, other, 3, name="foreign")
    capsys.readouterr()
    refused(parts[0], parts[1], foreign[2], match="another checkpoint pair")
    split = _shards(tmp_path, base, aligned, 2, name="split")
    refused(parts[0], parts[1], split[1], match="another shard count")
    single = tmp_path / "single.safetensors"
    assert run("subspace", "--base", base, "--aligned", aligned, "--targets", TARGETS, "-o", single, "-q") == 0
    refused(parts[0], single, match="not a shard file")
    assert run("subspace", "--merge", *parts, "--base", base, "-o", out) == 2
    assert "--merge takes only" in capsys.readouterr().err
    # each shard file is itself a usable subspace that names its place in the run
    with safe_open(str(parts[1]), framework="pt") as f:
        document = json.loads(f.metadata()["csulora"])
    assert document["shard"]["index"] == 1 and len(document["shard"]["modules"]) == 14
    assert all(len(m["sha256"]["aligned"]) == 64 for m in document["modules"].values())


def _naive_assign(sizes, count):
    loads, owner = [0] * count, [0] * len(sizes)
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        shard = min(range(count), key=lambda s: (loads[s], s))
        owner[item], loads[shard] = shard, loads[shard] + sizes[item]
    return owner


@given(st.lists(st.integers(0, 50), max_size=30), st.integers(1, 40))
def test_assign_shards_is_the_greedy_split_whatever_the_count(sizes, count):
    assert assign_shards(sizes, count) == _naive_assign(sizes, count)


def test_absurd_or_empty_shard_specs_are_one_line(tmp_path, llama_pair, capsys):
    import time

    base, aligned = llama_pair
    out = tmp_path / "s.safetensors"
    for spec in ["", "0/10000000000", "0/10000000"]:
        start = time.monotonic()
        assert run("subspace", "--base", base, "--aligned", aligned, "--targets", "q_proj", "-o", out, "-q",
                   "--shard", spec) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert err.startswith("csulora: error: --shard") and err.count("\n") == 1, err
        assert time.monotonic() - start < 5 and not out.exists()
    assert assign_shards([3, 2, 1], 10**12) == [0, 1, 2]  # the cost does not grow with the count


def _checkpoint_copy(src, dst):
    import shutil

    return shutil.copytree(src, dst)


def _edit_weights(directory, edit):
    """``edit(name, tensor)`` on every weight of the checkpoint in ``directory``, in place (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata()
        state = load_file(file)
        for name, tensor in state.items():
            edit(name, tensor)
        save_file(state, str(file), metadata=metadata)


def test_merge_refuses_shards_whose_weights_changed_between_runs(tmp_path, llama_pair, capsys):
    """The issue's case: shard 0 from one checkpoint, shards 1-2 after noise on every layer-1 weight."""
    import torch

    base, aligned = llama_pair
    moved = _checkpoint_copy(aligned, tmp_path / "aligned")
    first = _shards(tmp_path, base, moved, 3, name="before")[0]
    generator = torch.Generator().manual_seed(5)

    def noise(name, tensor):
        if name.startswith("model.layers.1.") and tensor.dim() == 2:
            tensor += 1e-3 * torch.randn(tensor.shape, generator=generator)

    _edit_weights(moved, noise)
    later = _shards(tmp_path, base, moved, 3, name="after")
    out = tmp_path / "merged.safetensors"
    assert run("subspace", "--merge", first, *later[1:], "-o", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another checkpoint pair" in err and "aligned weights of model.layers.1." in err
    assert not out.exists()


def test_merge_says_what_it_did_not_compare(tmp_path, llama_pair, capsys):
    """A change in a row no shard samples cannot be seen: the merge succeeds and says what was not compared."""
    import os

    from csulora.checkpoint import sample_rows

    base, aligned = llama_pair
    moved = _checkpoint_copy(aligned, tmp_path / "aligned")
    parts = _shards(tmp_path, base, moved, 3)
    out = tmp_path / "merged.safetensors"
    assert run("subspace", "--merge", *parts, "-o", out) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("csulora: warning: merged 3 shards")
    assert f"same {len(sample_rows(32))} sampled rows of each module's weights" in err
    assert "read only by the shard that computed it" in err and "modification times" not in err
    # a shard computed from a copy made elsewhere: equal contents, other modification times
    for file in moved.iterdir():
        os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    elsewhere = _shards(tmp_path, base, moved, 3, name="elsewhere")
    assert run("subspace", "--merge", parts[0], elsewhere[1], parts[2], "-o", out, "--force") == 0
    assert "modification times differ between shards" in capsys.readouterr().err
    unsampled = next(row for row in range(32) if row not in sample_rows(32))

    def one_row(name, tensor):
        if name == "model.layers.1.self_attn.q_proj.weight":
            tensor[unsampled] += 1.0

    _edit_weights(moved, one_row)
    assert run("subspace", "--merge", *parts[:2], *_shards(tmp_path, base, moved, 3, name="late")[2:], "-o", out,
               "--force") == 0  # fmt: skip
    assert "warning: merged 3 shards" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.pop("base"), "no base checkpoint record"),
        (lambda d: d.__setitem__("base", "x"), "corrupt csulora metadata (base"),
        (lambda d: d["aligned"].__setitem__("sha256", "abc"), "corrupt csulora metadata (aligned"),
        (lambda d: d["aligned"].__setitem__("sha256", 5), "corrupt csulora metadata (aligned"),
        (lambda d: next(iter(d["modules"].values())).__setitem__("sha256", 5), "corrupt metadata (sha256 5)"),
        (lambda d: next(iter(d["modules"].values()))["sha256"].__setitem__("base", "0" * 63), "corrupt metadata"),
        (lambda d: d["shard"].__setitem__("index", 7), "corrupt shard record (index 7 of 3)"),
        (lambda d: d["shard"].__setitem__("index", "1"), "corrupt shard record"),
        (lambda d: d["shard"].__setitem__("count", 10**12), "corrupt shard record"),
        (lambda d: d["shard"].__setitem__("modules", "q_proj"), "corrupt shard record (its module list)"),
        (lambda d: d["shard"].__setitem__("fingerprint", 3), "corrupt shard record (fingerprint 3)"),
        (lambda d: d["shard"]["samples"].popitem(), "corrupt shard record (its sampled weights)"),
        (lambda d: d.__setitem__("model_type", 3), "corrupt csulora metadata (model_type 3)"),
    ],
    ids=["no_base", "base_text", "bad_sha", "int_sha", "module_sha_int", "module_sha_short", "index_7_of_3",
         "index_text", "count_huge", "modules_text", "fingerprint_int", "samples_short", "model_type_int"],
)  # fmt: skip
def test_merge_of_edited_shard_metadata_is_one_line(tmp_path, llama_pair, capsys, edit, message):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base, aligned = llama_pair
    parts = _shards(tmp_path, base, aligned, 3)
    victim = next(p for p in parts if json.loads(safe_open(str(p), "pt").metadata()["csulora"])["modules"])
    with safe_open(str(victim), framework="pt") as f:
        document = json.loads(f.metadata()["csulora"])
    edit(document)
    save_file(load_file(victim), str(victim), metadata={"csulora": json.dumps(document)})
    out = tmp_path / "merged.safetensors"
    assert run("subspace", "--merge", *parts, "-o", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"csulora: error: {victim}: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()
