"""Outputs never destroy data: --force replaces only csulora's outputs, never an input; outputs are
checked before any work, locked against a concurrent writer, atomic under signals and --force, and
honour the umask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from csulora.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(*argv):
    return main([str(a) for a in argv])


def dotfiles(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("csulora: error:") and "\n" not in err, err
    return err


# -- --force replaces only what csulora wrote ----------------------------------------------------
def test_force_refuses_a_directory_csulora_did_not_write(tmp_path, llama_adapter, subspace_file, capsys):
    out = tmp_path / "mine"
    (out / "llama").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "llama" / "w.bin").write_bytes(b"weights")
    assert run("correct", llama_adapter, "-o", out, "--subspace", subspace_file, "--force", "-q") == 2
    assert "not written by csulora" in one_error_line(capsys)
    assert (out / "notes.txt").read_text() == "my notes" and (out / "llama" / "w.bin").read_bytes() == b"weights"
    assert dotfiles(tmp_path) == []


def test_force_refuses_a_file_that_is_not_a_subspace(tmp_path, llama_pair, llama_adapter, capsys):
    base, aligned = llama_pair
    target = tmp_path / "thesis.safetensors"
    target.write_text("my thesis")
    args = ["subspace", "--base", base, "--aligned", aligned, "--adapter", llama_adapter, "-o", target]
    assert run(*args, "--force", "-q") == 2
    assert "not written by csulora" in one_error_line(capsys)
    assert target.read_text() == "my thesis"


def test_force_replaces_a_subspace_and_an_adapter_csulora_wrote(tmp_path, llama_pair, llama_adapter, capsys):
    base, aligned = llama_pair
    sub = tmp_path / "sub.safetensors"
    args = ["subspace", "--base", base, "--aligned", aligned, "--adapter", llama_adapter, "-o", sub, "-q"]
    assert run(*args) == 0
    assert run(*args, "--rank", "2", "--force") == 0
    assert {v.shape[1] for k, v in load_file(sub).items() if k.endswith(".U")} == {2}
    out = tmp_path / "fixed"
    assert run("correct", llama_adapter, "-o", out, "--subspace", sub, "-q") == 0
    assert run("correct", llama_adapter, "-o", out, "--subspace", sub, "--lam", "5", "--force", "-q") == 0
    assert json.loads((out / "csulora_report.json").read_text())["params"]["lam"] == 5
    assert dotfiles(tmp_path) == []


# -- outputs never touch inputs ------------------------------------------------------------------
def test_output_onto_an_input_is_refused_even_with_force(tmp_path, llama_pair, llama_adapter, subspace_file, capsys):
    base, aligned = llama_pair
    copy = shutil.copytree(base, tmp_path / "base")
    weights = copy / "model.safetensors"
    before = sha256(weights)
    link = tmp_path / "link.safetensors"
    link.symlink_to(weights)
    for output in (weights, link, copy, tmp_path):  # equal, via a symlink, the directory, a parent
        args = ["subspace", "--base", copy, "--aligned", aligned, "--adapter", llama_adapter, "-o", output]
        assert run(*args, "--force", "-q") == 2
        assert "input" in one_error_line(capsys)
    assert sha256(weights) == before
    adapter_copy = shutil.copytree(llama_adapter, tmp_path / "adapter")
    for output in (adapter_copy, adapter_copy / "fixed", subspace_file.parent):
        src = adapter_copy
        assert run("correct", src, "-o", output, "--subspace", subspace_file, "--force", "-q") == 2
        assert "input" in one_error_line(capsys)
    assert not (adapter_copy / "fixed").exists() and subspace_file.is_file()


def test_output_is_not_the_current_directory(tmp_path, llama_adapter, subspace_file, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run("correct", llama_adapter, "-o", ".", "--subspace", subspace_file, "--force", "-q") == 2
    assert "current directory" in one_error_line(capsys)
    assert list(work.iterdir()) == [] and dotfiles(tmp_path) == []


# -- checked before any work ---------------------------------------------------------------------
def test_unwritable_output_fails_before_any_svd(tmp_path, llama_pair, llama_adapter, capsys, monkeypatch):
    import csulora.subspace_stream

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran before the output was checked")

    monkeypatch.setattr(csulora.subspace_stream, "module_basis", no_svd)
    base, aligned = llama_pair
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for command in (
        ["subspace", "--base", base, "--aligned", aligned, "--adapter", llama_adapter, "-o", blocker / "s.safetensors"],
        ["correct", llama_adapter, "--base", base, "--aligned", aligned, "-o", blocker / "out"],
    ):
        assert run(*command, "-q") == 2
        assert str(blocker) in one_error_line(capsys)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "x").write_text("x")
    assert run("correct", llama_adapter, "--base", base, "--aligned", aligned, "-o", existing, "-q") == 2
    assert "already exists" in one_error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_directory_is_one_line(tmp_path, llama_adapter, subspace_file, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert run("correct", llama_adapter, "-o", locked / "out", "--subspace", subspace_file, "-q") == 2
        assert "cannot write" in one_error_line(capsys)
    finally:
        locked.chmod(0o755)


# -- atomic replacement and recovery -------------------------------------------------------------
def test_force_swaps_old_and_new_in_one_step(tmp_path, llama_adapter, subspace_file, monkeypatch):
    import csulora.safe_output as safe_output

    out = tmp_path / "fixed"
    assert run("correct", llama_adapter, "-o", out, "--subspace", subspace_file, "-q") == 0
    swaps = []
    real_exchange = safe_output._exchange
    monkeypatch.setattr(safe_output, "_exchange", lambda a, b: swaps.append(b) or real_exchange(a, b))

    def no_rename(*args):
        raise AssertionError("a rename leaves a moment with no output at the path")

    monkeypatch.setattr(os, "rename", no_rename)
    assert run("correct", llama_adapter, "-o", out, "--subspace", subspace_file, "--lam", "2", "--force", "-q") == 0
    assert swaps == [out] and json.loads((out / "csulora_report.json").read_text())["params"]["lam"] == 2
    assert dotfiles(tmp_path) == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_output_displaced_by_a_killed_run_is_restored(tmp_path, llama_adapter, subspace_file, capsys):
    """Without an atomic swap the old output is renamed aside first; a run killed right then loses nothing."""
    out = tmp_path / "fixed"
    assert run("correct", llama_adapter, "-o", out, "--subspace", subspace_file, "-q") == 0
    report = (out / "csulora_report.json").read_text()
    out.rename(tmp_path / f".fixed.csulora-old-{dead_pid()}-0a1b2c3d")  # what the kill left behind
    assert run("correct", llama_adapter, "-o", out, "--subspace", subspace_file, "-q") == 2
    assert "already exists" in one_error_line(capsys)
    assert (out / "csulora_report.json").read_text() == report and dotfiles(tmp_path) == []


def test_fallback_replacement_without_exchange(tmp_path, llama_adapter, subspace_file, monkeypatch):
    import csulora.safe_output as safe_output

    monkeypatch.setattr(safe_output, "_exchange", lambda a, b: False)
    out = tmp_path / "fixed"
    assert run("correct", llama_adapter, "-o", out, "--subspace", subspace_file, "-q") == 0
    assert run("correct", llama_adapter, "-o", out, "--subspace", subspace_file, "--lam", "3", "--force", "-q") == 0
    assert json.loads((out / "csulora_report.json").read_text())["params"]["lam"] == 3
    assert dotfiles(tmp_path) == []


@pytest.mark.parametrize("command", ["correct", "subspace", "inspect"])
def test_the_output_is_checked_once_then_written_under_that_reservation(
    command, tmp_path, llama_pair, llama_adapter, subspace_file, monkeypatch
):
    """One check before the work (inputs, stale temporaries, replaceable), one guard before the rename."""
    import csulora.safe_output as safe_output

    calls: dict[str, int] = {}
    for name in ("check_not_input", "_clean_stale", "_check_replaceable"):
        real = getattr(safe_output, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(safe_output, name, counted)
    base, aligned = llama_pair
    if command == "correct":
        argv = ["correct", llama_adapter, "-o", tmp_path / "out", "--subspace", subspace_file, "-q"]
    elif command == "inspect":
        pytest.importorskip("matplotlib")
        argv = ["inspect", llama_adapter, "--subspace", subspace_file, "--plot", tmp_path / "p.png", "--json"]
    else:
        argv = ["subspace", "--base", base, "--aligned", aligned, "--adapter", llama_adapter, "-o", tmp_path / "s"]
    assert main([str(a) for a in argv + ["-q"]]) == 0
    assert calls == {"check_not_input": 1, "_clean_stale": 1, "_check_replaceable": 2}


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, llama_adapter, subspace_file):
    pid = dead_pid()
    (tmp_path / f".fixed.csulora-tmp-{pid}-deadbeef").mkdir()
    (tmp_path / f".fixed.csulora-tmp-{pid}-deadbeef" / "half").write_text("x")
    (tmp_path / ".fixed.csulora-lock").write_text(f"{pid}\n")
    (tmp_path / ".unrelated").write_text("not ours")
    assert run("correct", llama_adapter, "-o", tmp_path / "fixed", "--subspace", subspace_file, "-q") == 0
    assert dotfiles(tmp_path) == [".unrelated"]


def test_a_live_writer_holds_the_output(tmp_path, llama_adapter, subspace_file, capsys):
    (tmp_path / ".fixed.csulora-lock").write_text(f"{os.getppid()}\n")  # a live process
    assert run("correct", llama_adapter, "-o", tmp_path / "fixed", "--subspace", subspace_file, "-q") == 2
    assert "another csulora run" in one_error_line(capsys)
    assert not (tmp_path / "fixed").exists()


def test_outputs_honour_the_umask(tmp_path, llama_pair, llama_adapter):
    base, aligned = llama_pair
    for mask, dir_mode, file_mode in ((0o022, 0o755, 0o644), (0o077, 0o700, 0o600)):
        old = os.umask(mask)
        try:
            out, sub = tmp_path / f"fixed{mask}", tmp_path / f"sub{mask}.safetensors"
            args = ["subspace", "--base", base, "--aligned", aligned, "--adapter", llama_adapter, "-o", sub, "-q"]
            assert run(*args) == 0
            assert run("correct", llama_adapter, "-o", out, "--subspace", sub, "-q") == 0
        finally:
            os.umask(old)
        assert sub.stat().st_mode & 0o777 == file_mode
        assert out.stat().st_mode & 0o777 == dir_mode
        assert (out / "adapter_model.safetensors").stat().st_mode & 0o777 == file_mode


# -- real processes: concurrent writers and signals ----------------------------------------------
def csulora_process(*argv, patch: str = "") -> subprocess.Popen:
    """``csulora ARGV`` in a fresh interpreter; ``patch`` is Python run first (e.g. to slow a step)."""
    code = textwrap.dedent(patch) + "\nimport sys\nfrom csulora.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = os.environ | {"PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a background test run may ignore SIGINT, and a child inherits that: give it a terminal's default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.slow
def test_two_concurrent_writers_exactly_one_wins(tmp_path, llama_pair, llama_adapter, subspace_file):
    base, aligned = llama_pair
    for argv, check in (
        (["correct", llama_adapter, "-o", tmp_path / "fixed", "--subspace", subspace_file, "-q"], "fixed"),
        (
            ["subspace", "--base", base, "--aligned", aligned, "--adapter", llama_adapter,
             "-o", tmp_path / "sub.safetensors", "-q"],
            "sub.safetensors",
        ),
    ):  # fmt: skip
        procs = [csulora_process(*argv, patch=SLOW_WRITE.replace("60", "1.5")) for _ in range(2)]
        results = [p.communicate(timeout=240) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 2], results
        loser = next(err for (out, err), p in zip(results, procs, strict=True) if p.returncode == 2)
        assert loser.strip().count("\n") == 0 and ("another csulora run" in loser or "already exists" in loser), loser
        target = tmp_path / check
        if target.is_dir():
            assert load_file(target / "adapter_model.safetensors") and (target / "csulora_report.json").is_file()
        else:
            assert load_file(target)
    assert dotfiles(tmp_path) == []


SLOW_WRITE = """
import os, sys, time
import safetensors.torch
real = safetensors.torch.save_file
def slow_save(*args, **kwargs):
    real(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(60)
safetensors.torch.save_file = slow_save
import csulora.adapter
csulora.adapter.save_file = slow_save
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("command", ["correct", "subspace"])
def test_a_signal_mid_write_exits_130_and_leaves_nothing(
    tmp_path, llama_pair, llama_adapter, subspace_file, sig, command
):
    base, aligned = llama_pair
    out = tmp_path / "out" / ("fixed" if command == "correct" else "sub.safetensors")
    if command == "correct":
        argv = ["correct", llama_adapter, "-o", out, "--subspace", subspace_file, "-q"]
    else:
        argv = ["subspace", "--base", base, "--aligned", aligned, "--adapter", llama_adapter, "-o", out, "-q"]
    proc = csulora_process(*argv, patch=SLOW_WRITE)
    assert proc.stdout.readline().strip() == "writing"  # the temporary output exists now
    assert any(name.startswith(f".{out.name}.csulora-tmp-") for name in dotfiles(out.parent))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "csulora: interrupted", err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_after_sigkill_the_next_run_cleans_up(tmp_path, llama_adapter, subspace_file):
    out = tmp_path / "fixed"
    proc = csulora_process("correct", llama_adapter, "-o", out, "--subspace", subspace_file, "-q", patch=SLOW_WRITE)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.communicate(timeout=60)
    left = dotfiles(tmp_path)
    assert any(".csulora-tmp-" in name for name in left) and ".fixed.csulora-lock" in left
    assert not out.exists()
    assert run("correct", llama_adapter, "-o", out, "--subspace", subspace_file, "-q") == 0
    assert dotfiles(tmp_path) == [] and (out / "csulora_report.json").is_file()


def test_the_serializer_writes_inside_a_temporary_directory_of_ours(tmp_path, llama_pair, llama_adapter, monkeypatch):
    """safetensors writes a ``.tmpXXXXXX`` beside the path it is given: that path is inside csulora's own
    temporary directory, so what a killed run leaves is provably csulora's and removed by the next run."""
    import re

    import safetensors.torch

    base, aligned = llama_pair
    given = []
    real = safetensors.torch.save_file

    def spy(tensors, filename, metadata=None):
        given.append(Path(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", spy)
    (tmp_path / ".tmpUSER01").write_text("the user's own file")
    sub = tmp_path / "sub.safetensors"
    assert run("subspace", "--base", base, "--aligned", aligned, "--adapter", llama_adapter, "-o", sub, "-q") == 0
    (written,) = given
    assert written.name == sub.name and written.parent.parent == tmp_path
    assert re.fullmatch(rf"\.sub\.safetensors\.csulora-tmp-{os.getpid()}-[0-9a-f]+", written.parent.name)
    assert not written.parent.exists() and dotfiles(tmp_path) == [".tmpUSER01"]


KILL_AFTER_SERIALIZER_TMP = """
import time
from pathlib import Path
import safetensors.torch
def stopped_mid_write(tensors, filename, metadata=None):
    # what safetensors has on disk while it writes: its own full-size temporary beside the target
    (Path(filename).parent / ".tmpAbC123").write_bytes(b"half a subspace")
    print("writing", flush=True)
    time.sleep(60)
safetensors.torch.save_file = stopped_mid_write
"""


@pytest.mark.slow
def test_after_sigkill_in_the_serializer_the_next_run_removes_its_temporary(tmp_path, llama_pair, llama_adapter):
    base, aligned = llama_pair
    sub = tmp_path / "sub.safetensors"
    (tmp_path / ".tmpUSER01").write_text("the user's own file")
    argv = ["subspace", "--base", base, "--aligned", aligned, "--adapter", llama_adapter, "-o", sub, "-q"]
    proc = csulora_process(*argv, patch=KILL_AFTER_SERIALIZER_TMP)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.communicate(timeout=60)
    left = [path for path in tmp_path.rglob(".tmpAbC123")]
    assert len(left) == 1 and ".csulora-tmp-" in left[0].parent.name and not sub.exists()
    assert run(*argv) == 0
    assert dotfiles(tmp_path) == [".tmpUSER01"] and sub.is_file()
