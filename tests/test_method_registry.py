"""Methods own their settings: a method registered at run time (one definition, one ``register`` call)
shows up in the ``correct`` CLI (flags, help, a run), in its report, and in the lab's sweep (over its
knob), report and plot; nothing outside the registry names a method, but for the lab's table of roles."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from csulora.adapter import load_adapter
from csulora.cli import main
from csulora.correct import Corrected, LoraFactors, decompose
from csulora.errors import CsuloraError
from csulora.methods import (
    METHODS,
    MethodParams,
    ModuleInputs,
    Needs,
    Settings,
    define_method,
    get_method,
    method_needs,
    register,
    setting,
    unregister,
)
from csulora.subspace import load_subspace

SRC = Path(__file__).resolve().parents[1] / "src" / "csulora"
LAB = SRC.parent / "csulora_lab"
TOY = "toy-blend"


@dataclass(frozen=True)
class BlendSettings(Settings):
    strength: float = setting(0.5, "share of the update kept outside F", minimum=0, finite=True)


@define_method(
    TOY,
    settings=BlendSettings,
    summary="F plus a fixed share of the rest",
    knob="strength",
)
def blend(lora: LoraFactors, inputs: ModuleInputs, settings: BlendSettings) -> Corrected:
    """``dW* = F + t (dW - F) = s [(1 - t) B_in A_in + t B A]``: rank 2r, exactly."""
    d = decompose(lora, *inputs.basis)
    t = settings.strength
    B = torch.cat([(1 - t) * d.B_in, t * lora.B], dim=1)
    A = torch.cat([d.A_in, lora.A], dim=0)
    return Corrected(LoraFactors(B, A, lora.scale), {"energy": d.energy, "rho_f": d.rho_f, "strength": t})


@pytest.fixture
def toy_method():
    register(blend)
    try:
        yield blend
    finally:
        unregister(TOY)


def run(*argv) -> int:
    return main([str(a) for a in argv])


def test_a_registered_method_gets_its_cli_flag_and_help(toy_method, capsys):
    with pytest.raises(SystemExit):
        run("correct", "--help")
    text = capsys.readouterr().out
    assert TOY in text and "--strength" in text and "share of the update kept outside F" in text


def test_an_unregistered_method_is_gone_again(capsys):
    assert TOY not in METHODS
    with pytest.raises(SystemExit):
        run("correct", "--help")
    assert "--strength" not in capsys.readouterr().out


def test_a_registered_method_runs_from_the_cli(toy_method, tmp_path, llama_adapter, subspace_file):
    out = tmp_path / "out"
    assert (
        run(
            "correct",
            llama_adapter,
            "-o",
            out,
            "--subspace",
            subspace_file,
            "--method",
            TOY,
            "--strength",
            "0.25",
            "-q",
        )
        == 0
    )
    report = json.loads((out / "csulora_report.json").read_text())
    assert report["method"] == TOY and report["params"] == {"strength": 0.25}
    sub = load_subspace(subspace_file)
    before, after = load_adapter(llama_adapter), load_adapter(out)
    for module in before.modules:
        row = report["modules"][module]
        assert row["strength"] == 0.25 and row["rank_out"] == 2 * row["rank_in"]
        dW = before.factors(module).dense().double()
        U, R = sub[module].U.double(), sub[module].R.double()
        F = U @ (U.T @ dW @ R) @ R.T
        expected = F + 0.25 * (dW - F)
        got = after.factors(module).dense().double()
        assert torch.linalg.matrix_norm(got - expected) <= 1e-5 * torch.linalg.matrix_norm(expected)


def test_a_registered_methods_settings_are_checked_like_the_others(toy_method, tmp_path, capsys):
    assert run("correct", tmp_path / "missing", "-o", tmp_path / "out", "--method", TOY, "--strength", "-1", "-q") == 2
    assert capsys.readouterr().err.strip() == "csulora: error: --strength must be a finite number >= 0, got -1.0"
    with pytest.raises(CsuloraError, match=r"strength=\.\.\. must be a finite number"):
        MethodParams(strength=float("inf"))


def test_a_registered_method_is_in_the_labs_sweep_report_and_plot(toy_method, tmp_path):
    pytest.importorskip("matplotlib")
    from dataclasses import replace

    from csulora_lab.sweep import lab_sweep, role, run_label
    from csulora_lab.synthetic import report
    from csulora_lab.synthetic.runner import lab_config, sweep

    config = lab_config("tiny")
    runs = sweep(replace(config, grids={**config.grids, "strength": (0.25, 0.75)}))
    assert [(m, p) for m, p in runs if m == TOY] == [(TOY, {"strength": 0.25}), (TOY, {"strength": 0.75})]
    with pytest.raises(CsuloraError, match="no 'strength' grid"):
        sweep(config)  # a knob the lab has no grid for is named, not skipped
    assert run_label(TOY, {"strength": 0.25}) == f"{TOY}-strength0.25"
    grids = {"lam": (1.0,), "threshold": (0.5,), "strength": (2.0,)}
    assert [(m, p) for m, p in lab_sweep(grids, seed=3) if m == TOY] == [(TOY, {"strength": 2.0})]
    assert ("random", {"lam": 1.0, "seed": 3}) in lab_sweep(grids, seed=3)
    assert ("scale", {"match_lam": 1.0}) in lab_sweep(grids, seed=3)  # scale's knob runs over the lam grid
    assert role(TOY) == "method" and role("csulora") == "subject" and role("scale") == role("random") == "control"
    with pytest.raises(CsuloraError, match="no 'lam' grid"):
        lab_sweep({}, seed=0)

    models = {
        "base": {"asr": 1.0, "utility": 0.0, "general": 0.8},
        "aligned": {"asr": 0.0, "utility": 0.0, "general": 0.8},
        "lora": {"asr": 1.0, "utility": 1.0, "general": 0.5},
    }

    def result(method, params, kept, asr):
        return {"method": method, "params": params, "asr": asr, "utility": kept, "general": 0.5}

    results = [
        result("csulora", {"lam": 1.0}, 0.8, 0.3),
        result("scale", {"match_lam": 1.0, "factor": None}, 0.8, 0.5),
        result("random", {"lam": 1.0}, 0.8, 0.6),
        result(TOY, {"strength": 0.25}, 0.7, 0.2),
        result("from-elsewhere", {}, 0.5, 0.4),  # not registered here: still reported and plotted
    ]
    for r in results:
        r |= {"utility_kept": r["utility"], "safety_recovered": 1 - r["asr"], "tradeoff": None}
    document = {
        "config": {"size": "tiny", "seed": 0, "shape": {"hidden": 64, "layers": 2}, "lora_rank": 8},
        "models": models,
        "runs": results,
        "verdict": report.verdict(models, results),
    }
    text = report.format_report(document)
    assert f"### {TOY}" in text and "| strength=0.25 |" in text and "F plus a fixed share of the rest" in text
    assert "### from-elsewhere" in text
    labels = report.plot_frontier(models, results, tmp_path / "frontier.png")
    assert {TOY, "from-elsewhere", "csulora", "scale", "random"} <= set(labels)


def test_settings_shared_by_name_must_be_declared_alike():
    @dataclass(frozen=True)
    class OtherLam(Settings):
        lam: float = setting(2.0, "another default for an existing flag", minimum=0)

    @define_method("other-lam", settings=OtherLam, summary="clashes")
    def clash(lora, inputs, settings):
        return Corrected(lora, {})

    with pytest.raises(ValueError, match="setting lam is declared otherwise"):
        register(clash)
    assert "other-lam" not in METHODS
    with pytest.raises(ValueError, match="already registered"):
        register(get_method("csulora"))
    with pytest.raises(TypeError, match="knob"):
        define_method("bad-knob", summary="", knob="missing")(clash.correct)


def test_method_params_keep_their_old_behaviour():
    params = MethodParams(lam=2.0)
    assert params.lam == 2.0 and params.threshold == 0.5 and params.factor is None and params.seed == 0
    assert get_method("csulora").settings_from(params).as_dict() == {"lam": 2.0, "rank_mode": "exact"}
    assert get_method("scale").settings_from(params).as_dict() == {"factor": None, "match_lam": None, "lam": 2.0}
    assert method_needs("scale", {"factor": 0.5}) is Needs.NOTHING and method_needs("scale") is Needs.BASIS
    assert method_needs("safelora") is Needs.DELTA
    with pytest.raises(CsuloraError, match=r"num_proj_layers=\.\.\. must be >= 0"):
        MethodParams(num_proj_layers=-2)
    with pytest.raises(CsuloraError, match=r"select=\.\.\. must be 'threshold' or 'number'"):
        MethodParams(select="all")
    with pytest.raises(TypeError, match="unknown setting"):
        MethodParams(lamda=1.0)


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_no_method_is_named_outside_its_own_file_and_the_registry():
    """A string naming a method (other than the package's own name) appears only under methods/ and, in
    the lab, in its table of roles (``csulora_lab/sweep.py``)."""
    names = set(METHODS) - {"csulora"}  # "csulora" is also the package, its metadata key and its prog name
    found = {
        str(path.relative_to(SRC)): _string_constants(path) & names
        for path in SRC.rglob("*.py")
        if "methods" not in path.relative_to(SRC).parts
    }
    found |= {
        str(path.relative_to(SRC.parent)): _string_constants(path) & names
        for path in LAB.rglob("*.py")
        if path.relative_to(LAB).parts != ("sweep.py",)
    }
    assert not {path: hits for path, hits in found.items() if hits}


def test_the_product_never_imports_the_lab():
    """No module of ``csulora`` names ``csulora_lab``: the lab's command comes through an entry point."""
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names] + [
            node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        ]
        assert not [name for name in imported if name.split(".")[0] == "csulora_lab" or ".lab" in name], path
