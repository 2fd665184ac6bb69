"""The README and docs/: the methods table is the registry's, every relative link resolves, and the
quick start's test command is the one CI runs."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def methods_table_module():
    spec = importlib.util.spec_from_file_location("methods_table", ROOT / "docs" / "methods_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_methods_table_is_the_registrys():
    tables = methods_table_module()
    text = (ROOT / "README.md").read_text()
    assert tables.with_table(text, tables.methods_table()) == text, "run: python docs/methods_table.py --write"


def test_the_methods_table_follows_a_registered_method():
    from csulora.methods import register, unregister
    from csulora.methods.project import method as project

    tables = methods_table_module()
    register(type(project)(**{**project.__dict__, "name": "project-copy", "summary": "a | copy"}))
    try:
        row = tables.methods_table().splitlines()[-1]
    finally:
        unregister("project-copy")
    assert row == "| `project-copy` | a \\| copy | the subspace | none |"
    with pytest.raises(ValueError, match="markers"):
        tables.with_table("no table here", "| a |")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document):
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)  # code blocks hold no links
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (document.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{document.relative_to(ROOT)} links to {target}, which does not exist"


def test_readme_stays_short_and_keeps_both_quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    setup = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    assert f'{setup}pip install -e ".[lab]" && csulora lab\n' in readme
    test_command = f'{setup}pip install -e ".[test]" && python -m pytest -q\n'
    assert test_command in readme
    # CI runs exactly the README's test command (after the lint steps): the last command of .ci/run
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert shlex.split(ci[-1]) == shlex.split(test_command.rsplit("&& ", 1)[1])
