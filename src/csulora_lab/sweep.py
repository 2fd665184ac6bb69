"""How the lab runs the registry's methods: each one's role in the verdict, the grid its knob runs
over, the sweep, and the corrected adapters (the same calls as ``csulora correct``).

The product's registry knows nothing of the lab. A method declares its strength knob (``Method.knob``,
one of its settings); this module says which method the lab's question is about and which are its
controls (``ROLES``), and which grid of the lab each knob runs over (``KNOB_GRIDS``). A method the
tables do not name is one more method, compared with the controls and reported, over its knob's grid.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from csulora.errors import CsuloraError
from csulora.methods import METHODS

# The verdict's roles: "subject" (the method the question is about, exactly one) and "control"; any
# other registered method has the role "method".
ROLES = {"csulora": "subject", "scale": "control", "random": "control"}
ROLE_NAMES = ("subject", "control", "method")
# A knob that runs over the lab's grid of another name (any other knob: the grid of its own name).
KNOB_GRIDS = {"match_lam": "lam"}

if list(ROLES.values()).count("subject") != 1:
    raise TypeError("the lab's verdict has exactly one subject")


def role(method: str) -> str:
    """The lab role of a registered method: "subject", "control" or "method"."""
    return ROLES.get(method, "method")


def methods_with_role(role_name: str) -> list[str]:
    """The registered methods with a lab role ("subject", "control", "method"), in registry order."""
    if role_name not in ROLE_NAMES:
        raise ValueError(f"a lab role is 'subject', 'control' or 'method', got {role_name!r}")
    return [name for name in METHODS if role(name) == role_name]


def subject() -> str:
    """The method the lab's question is about (its lab role is "subject")."""
    return methods_with_role("subject")[0]


def method_order(results: list[dict]) -> list[str]:
    """The methods that have runs: registered ones in registry order, then any other as it first appears."""
    present = dict.fromkeys(r["method"] for r in results)
    return [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]


def knob_label(run: dict) -> str:
    """``lam=1`` for a run: its method's knob and the value it ran at ("—" for none)."""
    name = METHODS[run["method"]].knob if run["method"] in METHODS else None
    return f"{name}={run['params'].get(name):g}" if name and run["params"].get(name) is not None else "—"


# -- the sweep -----------------------------------------------------------------------------------
def lab_sweep(grids: Mapping[str, Sequence[float]], seed: int) -> list[tuple[str, dict[str, Any]]]:
    """``(method, settings)`` for every correction the lab runs, method by method in registry order.

    Each method's knob runs over the lab's grid for it (``grids``, by ``KNOB_GRIDS`` or the knob's own
    name); a method with no knob runs once at its defaults; a ``seed`` setting takes the lab's seed.
    """
    runs: list[tuple[str, dict[str, Any]]] = []
    for name, method in METHODS.items():
        seeded: dict[str, Any] = {"seed": seed} if any(spec.name == "seed" for spec in method.setting_specs()) else {}
        knob = method.knob
        if knob is None:
            runs.append((name, dict(seeded)))
            continue
        grid = KNOB_GRIDS.get(knob, knob)
        values = grids.get(grid, ())
        if not values:
            raise CsuloraError(f"method {name}: the lab has no {grid!r} grid for its knob {knob}")
        runs.extend((name, {knob: value} | seeded) for value in values)
    return runs


def run_label(method: str, params: dict) -> str:
    """Directory name of a sweep point: the method and its numeric knobs (the seed is the lab's own)."""
    knobs = "-".join(
        f"{k}{float(v):g}"
        for k, v in params.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "seed"
    )
    return f"{method}-{knobs}" if knobs else method


class CorrectionInputs(Protocol):
    """What ``correct_all`` reads: the lab's ``Artifacts`` or the smollm2 study's paths."""

    @property
    def base(self) -> Path: ...

    @property
    def aligned(self) -> Path: ...

    @property
    def lora(self) -> Path: ...

    @property
    def subspace(self) -> Path: ...


def correct_all(
    points: list[tuple[str, dict]], art: CorrectionInputs, adapters_dir: Path, *, quiet: bool = False
) -> list[dict]:
    """Write one corrected adapter per sweep point ``(method, settings)`` (same calls as ``csulora correct``)."""
    from csulora.methods import Needs, method_needs
    from csulora.pipeline import REPORT_NAME, correct_adapter
    from csulora.sources import BasisSource

    labels = {run_label(method, params) for method, params in points}
    if len(labels) != len(points):
        raise CsuloraError("two sweep points share an output directory; make the sweep's knobs distinct")
    if adapters_dir.is_dir():  # drop corrections left by an earlier run with another sweep
        for stale in adapters_dir.iterdir():
            if stale.name not in labels and (stale / REPORT_NAME).is_file():
                shutil.rmtree(stale)
    runs = []
    for method, params in tqdm(points, desc="correct", disable=quiet, leave=False):
        out = adapters_dir / run_label(method, params)
        needs_delta = method_needs(method, params) is Needs.DELTA  # the full V, not the subspace
        source = BasisSource(base=art.base, aligned=art.aligned) if needs_delta else BasisSource(art.subspace)
        report = correct_adapter(art.lora, out, source, method=method, method_settings=params, force=True)
        runs.append({"method": method, "params": report["params"], "adapter": out})
    return runs
