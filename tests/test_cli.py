"""End-to-end runs of the CLI, and the bad inputs: one-line error, exit 2, nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from csulora.cli import main
from csulora.errors import CsuloraError


def run(*argv):
    return main([str(a) for a in argv])


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.slow
def test_subspace_correct_inspect_end_to_end(tmp_path, llama_pair, llama_adapter, capsys):
    base, aligned = llama_pair
    sub = tmp_path / "sub.safetensors"
    assert (
        run("subspace", "--base", base, "--aligned", aligned, "--targets", "q_proj,v_proj,down_proj", "-o", sub, "-q")
        == 0
    )
    assert "modules" in capsys.readouterr().out
    # the adapter targets more modules than the subspace holds: a clear error, not a crash
    assert run("correct", llama_adapter, "-o", tmp_path / "fail", "--subspace", sub, "-q") == 2
    assert "has no entry in the subspace" in capsys.readouterr().err
    assert not (tmp_path / "fail").exists()

    assert (
        run(
            "subspace",
            "--base",
            base,
            "--aligned",
            aligned,
            "--adapter",
            llama_adapter,
            "-o",
            sub,
            "--energy",
            "0.9",
            "--max-rank",
            "5",
            "--force",
            "-q",
        )
        == 0
    )
    out = tmp_path / "fixed"
    assert run("correct", llama_adapter, "-o", out, "--subspace", sub, "--lam", "3", "-q") == 0
    report = json.loads((out / "csulora_report.json").read_text())
    assert report["method"] == "csulora" and report["params"]["lam"] == 3.0
    assert all(row["k"] <= 5 for row in report["modules"].values())
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()

    # computing the subspace on the fly gives the same adapter as the cached subspace
    out2 = tmp_path / "fixed2"
    assert (
        run(
            "correct",
            llama_adapter,
            "-o",
            out2,
            "--base",
            base,
            "--energy",
            "0.9",
            "--max-rank",
            "5",
            "--lam",
            "3",
            "-q",
        )
        == 0
    )
    first, second = load_file(out / "adapter_model.safetensors"), load_file(out2 / "adapter_model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)

    capsys.readouterr()
    plot = tmp_path / "plot.png"
    assert run("inspect", llama_adapter, "--subspace", sub, "--json", "--plot", plot, "-q") == 0
    document = json.loads(capsys.readouterr().out)
    rows = document["modules"]
    assert len(rows) == 14 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:
        assert row["rho_f"] + row["rho_h"] + row["rho_o"] == pytest.approx(1.0)
        assert row["rho_f"] == pytest.approx(report["modules"][row["module"]]["rho_f"])
        assert row["signed_overlap"] == pytest.approx(report["modules"][row["module"]]["signed_overlap_before"])
        assert row["opposing_share"] == pytest.approx(report["modules"][row["module"]]["opposing_share_before"])
    assert document["adapter"]["signed_overlap"] == pytest.approx(report["signed_overlap_before"])
    assert document["adapter"]["opposing_share"] == pytest.approx(report["opposing_share_before"])
    assert run("inspect", llama_adapter, "--subspace", sub, "-q") == 0
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in table and "energy-weighted" in table
    assert run("inspect", llama_adapter, "--subspace", sub, "--plot", plot, "-q") == 2  # exists, no --force


@pytest.mark.slow
def test_console_script_runs_as_a_process(tmp_path, llama_pair, llama_adapter):
    base, aligned = llama_pair
    out = tmp_path / "out"
    script = Path(sys.executable).parent / "csulora"  # the console script pip installed beside python
    cmd = [
        str(script),
        "correct",
        str(llama_adapter),
        "-o",
        str(out),
        "--base",
        str(base),
        "--method",
        "safelora",
        "-q",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "safelora" in done.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr


def test_force_replaces_an_existing_output(tmp_path, llama_pair, llama_adapter):
    base, _ = llama_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert run("correct", llama_adapter, "-o", out, "--base", base, "-q") == 2
    assert (out / "keep.txt").read_text() == "user data"
    # --force replaces only what csulora wrote: a user's directory is never deleted
    assert run("correct", llama_adapter, "-o", out, "--base", base, "--force", "-q") == 2
    assert (out / "keep.txt").read_text() == "user data"
    ours = tmp_path / "ours"
    assert run("correct", llama_adapter, "-o", ours, "--base", base, "-q") == 0
    (ours / "csulora_report.json").write_text("{}")
    assert run("correct", llama_adapter, "-o", ours, "--base", base, "--force", "-q") == 0
    assert json.loads((ours / "csulora_report.json").read_text())["method"] == "csulora"
    assert leftovers(tmp_path) == []


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def mutate_tensor(directory, key, fn):
    """Rewrite the shard of ``directory`` holding ``key`` with ``fn`` applied to the state dict."""
    for file in directory.glob("*.safetensors"):
        state = load_file(file)
        if key in state:
            fn(state)
            save_file(state, str(file), metadata={"format": "pt"})
            return
    raise KeyError(key)


Q0 = "model.layers.0.self_attn.q_proj.weight"


def bad_shape(root, base, aligned):
    bad = copy_checkpoint(base, root / "bad-base")
    mutate_tensor(bad, Q0, lambda s: s.__setitem__(Q0, torch.zeros(16, 32)))
    return ["--base", bad, "--aligned", aligned], "shape"


def missing_module(root, base, aligned):
    bad = copy_checkpoint(aligned, root / "bad-aligned")
    mutate_tensor(bad, Q0, lambda s: s.pop(Q0))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(Q0)
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["--base", base, "--aligned", bad], "no weight for module model.layers.0.self_attn.q_proj"


def nan_weights(root, base, aligned):
    bad = copy_checkpoint(aligned, root / "bad-aligned")
    mutate_tensor(bad, Q0, lambda s: s[Q0].__setitem__((0, 0), float("nan")))
    return ["--base", base, "--aligned", bad], "NaN"


def truncated_file(root, base, aligned):
    bad = copy_checkpoint(base, root / "bad-base")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["--base", bad, "--aligned", aligned], "model.safetensors"


def pickled_checkpoint(root, base, aligned):
    bad = root / "pickled"
    bad.mkdir()
    shutil.copy(base / "config.json", bad / "config.json")
    torch.save(load_file(base / "model.safetensors"), bad / "pytorch_model.bin")
    return ["--base", bad, "--aligned", aligned], "--allow-pickle"


def different_model(root, base, aligned):
    from conftest import perturbed, save_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    other = LlamaForCausalLM(config)
    save_model(other, root / "other-base")
    save_model(perturbed(other, 4), root / "other-aligned")
    return ["--base", root / "other-base", "--aligned", root / "other-aligned"], "different model"


@pytest.mark.parametrize(
    "make_bad",
    [bad_shape, missing_module, nan_weights, truncated_file, pickled_checkpoint, different_model],
    ids=lambda f: f.__name__,
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, llama_pair, llama_adapter, capsys, make_bad):
    base, aligned = llama_pair
    args, expected = make_bad(tmp_path, base, aligned)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for command in (
        ["correct", llama_adapter, "-o", outputs / "adapter"],
        ["subspace", "--adapter", llama_adapter, "-o", outputs / "sub.safetensors"],
    ):
        capsys.readouterr()
        assert run(*command, *args, "-q") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("csulora: error:") and "\n" not in err, err
        assert expected in err
        assert list(outputs.iterdir()) == []


def test_pickle_opt_in_loads_with_weights_only(tmp_path, llama_pair, llama_adapter):
    base, aligned = llama_pair
    args, _ = pickled_checkpoint(tmp_path, base, aligned)
    assert run("correct", llama_adapter, "-o", tmp_path / "out", *args, "--allow-pickle", "-q") == 0
    reference = tmp_path / "reference"
    assert run("correct", llama_adapter, "-o", reference, "--base", base, "-q") == 0
    first = load_file(tmp_path / "out" / "adapter_model.safetensors")
    second = load_file(reference / "adapter_model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)


def unsupported(tmp_path, llama_adapter, change_config=None, extra_tensor=None):
    bad = copy_checkpoint(llama_adapter, tmp_path / "bad-adapter")
    if change_config:
        config = json.loads((bad / "adapter_config.json").read_text())
        config.update(change_config)
        (bad / "adapter_config.json").write_text(json.dumps(config))
    if extra_tensor:
        state = load_file(bad / "adapter_model.safetensors")
        state[extra_tensor] = torch.zeros(4, 8)
        save_file(state, str(bad / "adapter_model.safetensors"))
    return bad


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"change_config": {"use_dora": True}}, "DoRA"),
        ({"change_config": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
        ({"extra_tensor": "base_model.model.model.embed_tokens.lora_embedding_A"}, "embedding LoRA"),
        ({"change_config": {"peft_type": "IA3"}}, "IA3"),
        ({"change_config": {"r": 8}}, "rank 4 but the config says r=8"),
    ],
    ids=["dora", "modules_to_save", "embedding", "ia3", "rank-mismatch"],
)
def test_unsupported_adapters_are_refused(tmp_path, llama_pair, llama_adapter, capsys, change, expected):
    base, _ = llama_pair
    bad = unsupported(tmp_path, llama_adapter, **change)
    assert run("correct", bad, "-o", tmp_path / "out", "--base", base, "-q") == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_usage_errors(tmp_path, llama_pair, llama_adapter, capsys):
    base, _ = llama_pair
    assert run("correct", llama_adapter, "-o", tmp_path / "o", "-q") == 2
    assert "--subspace" in capsys.readouterr().err
    assert (
        run(
            "correct",
            llama_adapter,
            "-o",
            tmp_path / "o",
            "--method",
            "safelora",
            "--subspace",
            tmp_path / "nope.safetensors",
            "-q",
        )
        == 2
    )
    assert "full alignment matrix" in capsys.readouterr().err
    assert run("correct", tmp_path / "missing", "-o", tmp_path / "o", "--base", base, "-q") == 2
    assert "no such directory" in capsys.readouterr().err
    assert run("correct", llama_adapter, "-o", tmp_path / "o", "--base", base, "--lam", "-1", "-q") == 2
    assert "--lam" in capsys.readouterr().err
    assert run("subspace", "--base", base, "--aligned", base, "-o", tmp_path / "s.safetensors", "-q") == 2
    assert "--targets" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run("correct", llama_adapter, "-o", tmp_path / "o", "--base", base, "--device", "cuda", "-q") == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert run("correct", llama_adapter, "-o", tmp_path / "o", "--base", base, "--device", "gpu0", "-q") == 2
    assert "not a torch device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_offline_hub_id_is_a_clear_error(tmp_path, llama_pair, llama_adapter, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run("correct", llama_adapter, "-o", tmp_path / "o", "--base", "meta-llama/Llama-2-7b-hf", "-q") == 2
    err = capsys.readouterr().err
    assert "meta-llama/Llama-2-7b-hf" in err and "Hub" in err and err.count("\n") == 1


def test_adapter_from_another_model_name_warns(tmp_path, llama_adapter, subspace_file, capsys):
    other = unsupported(tmp_path, llama_adapter, change_config={"base_model_name_or_path": "someone/other-chat"})
    capsys.readouterr()
    assert run("correct", other, "-o", tmp_path / "out", "--subspace", subspace_file, "-q") == 0
    err = capsys.readouterr().err
    assert "csulora: warning:" in err and "someone/other-chat" in err


def test_only_commands_that_stream_checkpoints_map_large_allocations():
    from csulora.cli import _streams_checkpoints, build_parser

    def streams(*argv: str) -> bool:
        return _streams_checkpoints(build_parser().parse_args(argv))

    assert streams("subspace", "--base", "b", "--aligned", "a", "--targets", "q_proj", "-o", "s.safetensors")
    assert streams("correct", "adapter", "--base", "b", "-o", "out")
    assert streams("correct", "adapter", "--method", "safelora", "--subspace", "s", "--base", "b", "-o", "out")
    assert streams("inspect", "adapter", "--base", "b")
    assert streams("lab", "--out", "lab")
    assert not streams("correct", "adapter", "--subspace", "s.safetensors", "-o", "out")
    assert not streams("inspect", "adapter", "--subspace", "s.safetensors")
    assert not streams("eval", "model", "--prompts", "p.jsonl")


def test_library_errors_name_settings_and_the_cli_names_its_flags(tmp_path, llama_adapter, capsys):
    from csulora import correct_adapter
    from csulora.cli import _in_flags, build_parser

    with pytest.raises(CsuloraError, match=r"needs a subspace \(subspace=\.\.\.\), or a base checkpoint \(base=\.\.\."):
        correct_adapter(llama_adapter, tmp_path / "o")
    with pytest.raises(CsuloraError, match=r"method safelora needs the full alignment matrix V: .*\(base=\.\.\."):
        correct_adapter(llama_adapter, tmp_path / "o", method="safelora")
    assert run("correct", llama_adapter, "-o", tmp_path / "o", "--method", "safelora", "-q") == 2
    assert capsys.readouterr().err == (
        "csulora: error: method safelora needs the full alignment matrix V: "
        "give a base checkpoint (--base, and --aligned)\n"
    )
    args = build_parser().parse_args(["correct", "a", "-o", "o"])
    assert _in_flags("verify=True: x; allow_pickle=True; weights_only=True; eval_only=...", args) == (
        "--verify: x; --allow-pickle; weights_only=True; eval_only=..."  # only this command's flags
    )
