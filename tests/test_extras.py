"""The core install runs subspace / correct / inspect; other commands name the extra they need."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from csulora.cli import main

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("transformers", "peft", "matplotlib", "tokenizers", "gguf")


@pytest.mark.parametrize(
    "argv,blocked,extra",
    [
        (["eval", "model", "--prompts", "p.jsonl"], "transformers", "eval"),
        (["eval", "model", "--prompts", "p.jsonl"], "peft", "eval"),
        (["lab", "--size", "tiny"], "tokenizers", "lab"),
        (["inspect", "adapter", "--subspace", "s.safetensors", "--plot", "p.png"], "matplotlib", "plot"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys, argv, blocked, extra):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, blocked, None)  # import of `blocked` now raises ImportError
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"csulora: error: csulora {argv[0]}{' --plot' if extra == 'plot' else ''} needs {blocked}: " + (
        f"pip install 'csulora[{extra}]'"
    )
    assert list(tmp_path.iterdir()) == []


CORE_RUN = """
import sys
for name in {optional!r}:
    sys.modules[name] = None  # as if not installed
from csulora.cli import main
for argv in (
    ["subspace", "--base", "base", "--aligned", "aligned", "--adapter", "lora", "-o", "pair.safetensors", "-q"],
    ["correct", "lora", "-o", "lora-safe", "--subspace", "pair.safetensors", "-q"],
    ["inspect", "lora", "--subspace", "pair.safetensors", "--json", "-q"],
):
    assert main(argv) == 0, argv
"""


@pytest.mark.slow
def test_core_commands_run_without_the_extras(tmp_path):
    """What CI's core-install step checks, here with the optional packages blocked at import."""
    subprocess.run([sys.executable, str(ROOT / ".ci" / "core_fixture.py"), str(tmp_path)], check=True)
    done = subprocess.run(
        [sys.executable, "-c", CORE_RUN.format(optional=OPTIONAL)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    # after subspace's and correct's "wrote" lines
    rows = json.loads(done.stdout[done.stdout.index("{") :])["modules"]
    assert len(rows) == 4 and all(abs(r["rho_f"] + r["rho_h"] + r["rho_o"] - 1) < 1e-6 for r in rows)
    assert (tmp_path / "lora-safe" / "adapter_model.safetensors").is_file()
