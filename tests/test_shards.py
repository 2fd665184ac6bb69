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
