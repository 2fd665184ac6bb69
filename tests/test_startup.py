"""What starting the CLI costs: ``csulora --help`` and ``--version`` load neither torch nor the registry,
and the version lives in a module that imports nothing, where the build reads it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import csulora
from csulora import _version

ROOT = Path(__file__).resolve().parents[1]

# Run main() in a fresh interpreter, then say which heavy modules it loaded.
PROBE = """
import sys
from csulora.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("LOADED", sorted(m for m in ("torch", "numpy", "safetensors", "csulora.methods") if m in sys.modules))
"""


def loaded_by(*argv: str) -> tuple[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    head, _, loaded = done.stdout.rpartition("LOADED ")
    return head, ast.literal_eval(loaded.strip())


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["subspace", "--help"], ["inspect", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    output, loaded = loaded_by(*argv)
    assert loaded == []
    assert "usage: csulora" in output or output.strip() == f"csulora {csulora.__version__}"


def test_correct_help_still_lists_the_generated_method_flags():
    output, loaded = loaded_by("correct", "--help")
    assert "--lam" in output and "--threshold" in output and "--method" in output
    assert "csulora.methods" in loaded  # the registry is read when `correct` needs its flags


def test_version_module_imports_nothing_and_the_build_reads_it():
    tree = ast.parse(Path(_version.__file__).read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    assert 'version = { attr = "csulora._version.__version__" }' in (ROOT / "pyproject.toml").read_text()
    assert csulora.__version__ == _version.__version__


def test_public_names_resolve_on_first_use():
    from csulora.methods import METHODS

    assert sorted(csulora.__all__) == sorted(csulora._EXPORTS)
    for name in csulora.__all__:
        assert name == "METHODS" or getattr(csulora, name).__name__ == name
    assert csulora.METHODS is METHODS
    assert set(csulora.__all__) <= set(dir(csulora))
    from csulora import MethodParams, correct_adapter  # noqa: F401 - the documented import still works

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        csulora.nothing_here  # noqa: B018
