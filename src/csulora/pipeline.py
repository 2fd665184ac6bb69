"""The correction pipeline: an adapter, a method and its inputs in; a PEFT adapter and a report out.

``run_correction`` applies a method module by module and returns typed per-module results
(``ModuleResult``) inside a ``Correction``, which also says where the subspace came from and builds
the report; ``correct_adapter`` checks the output, runs it and writes the adapter and the report.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ._version import __version__
from .adapter import CONFIG_NAME, Adapter, load_adapter, write_adapter
from .correct import (
    Corrected,
    LoraFactors,
    SignedOverlap,
    combined_overlap,
    frobenius_inner,
    frobenius_sq,
    signed_overlap,
)
from .methods import DEFAULT_METHOD, Method, MethodParams, ModuleInputs, Needs, Settings, get_method
from .model_card import CARD_NAME, corrected_card
from .pair import Pair
from .safe_output import atomic_dir, reserve_output, strict_json
from .sources import AdapterSubspace, BasisSource, adapter_deltas
from .subspace import Subspace
from .subspace_stream import warn_unaligned
from .threads import correction_flops, threads_for, torch_threads

REPORT_NAME = "csulora_report.json"


@dataclass(frozen=True)
class ModuleResult:
    """One module's correction and what the report says about it."""

    module: str  # the adapter's name
    name: str  # the checkpoint's name (the report's key)
    rank_in: int
    energy_in: float  # ||s B A||_F^2 of the adapter's update, before correction
    corrected: Corrected
    k: int | None = None  # the subspace rank it was corrected with (None: the method read no subspace)
    unchanged: bool = False  # aligned - base is zero here, so the update was kept as it was
    # the signed overlap with V_k of the update before and after (None: not measured, see _overlap_after)
    overlap_before: SignedOverlap | None = None
    overlap_after: SignedOverlap | None = None

    def report(self) -> dict:
        info = self.corrected.info
        row = {
            "k": self.k,
            "rho_f": info.get("rho_f"),
            "rho_h": info.get("rho_h"),
            "rho_o": info.get("rho_o"),
            "kappa_h": info.get("kappa_h"),
            "kappa_o": info.get("kappa_o"),
            "rank_in": self.rank_in,
            "rank_out": self.corrected.lora.rank,
            "truncation_error": info.get("truncation_error", 0.0),
        } | _overlap_fields(self.overlap_before, self.overlap_after)
        extra = {key: value for key, value in info.items() if key not in row and key != "energy"}
        return row | {"energy": info.get("energy")} | extra


@dataclass(frozen=True)
class Correction:
    """A method's results for every module of an adapter, in the adapter's order."""

    method: str
    method_settings: Settings
    modules: list[ModuleResult]
    subspace: dict | None  # where the subspace came from (None: the method read none)

    def report(self, adapter: Adapter) -> dict:
        before = [result.overlap_before for result in self.modules]
        after = [result.overlap_after for result in self.modules]
        return {
            "method": self.method,
            "params": self.method_settings.as_dict(),
            "csulora_version": __version__,
            "adapter": str(adapter.path),
            "subspace": self.subspace,
            "energy_before": sum(result.energy_in for result in self.modules),
            "energy_after": sum(_energy(result.corrected.lora) for result in self.modules),
            # energy-weighted over all modules (docs/method.md); None where some module was not measured
            **_overlap_fields(_combined(before), _combined(after)),
            "unchanged_modules": [result.name for result in self.modules if result.unchanged],
            "modules": {result.name: result.report() for result in self.modules},
        }


def is_corrected_adapter(path: Path) -> bool:
    """Whether directory ``path`` is an output of ``correct``: a PEFT adapter with our report, no subfolders."""
    return (
        path.is_dir()
        and (path / REPORT_NAME).is_file()
        and (path / CONFIG_NAME).is_file()
        and not any(item.is_dir() for item in path.iterdir())
    )


@torch_threads(1)  # k-wide and r x r products; bigger work asks for more threads (threads_for)
def correct_adapter(
    adapter: str | Path | Adapter,
    out: str | Path,
    source: BasisSource | None = None,
    *,
    method: str = DEFAULT_METHOD,
    method_settings: MethodParams | Mapping[str, Any] | Settings | None = None,
    force: bool = False,
    progress: bool = False,
) -> dict:
    """Correct ``adapter`` and write a PEFT adapter plus ``csulora_report.json`` into ``out``.

    Returns the report. ``source`` says where the basis comes from (``BasisSource``: a subspace, or a
    (base, aligned) pair to compute it from; a method that reads the full ``V`` needs the pair).
    ``method_settings``: the method's settings, by name or as its settings object (see
    ``csulora.methods``). The output is checked (writable, not an input, replaceable) once, before any
    work is done.
    """
    source = source or BasisSource()
    spec = get_method(method)
    resolved = spec.settings_from(method_settings)
    needs = spec.needs_for(resolved)
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, allow_pickle=source.allow_pickle)
    required = f"method {method} needs the full alignment matrix V: give a base checkpoint (base=..., and aligned=...)"
    pair = source.open_pair(adapter, required if needs is Needs.DELTA else None)
    subspace_path = source.subspace_path
    inputs = [adapter.path, subspace_path] + ([pair.base.path, pair.aligned.path] if pair else [])
    # checked and locked once, before any work; written into place under the same reservation
    with reserve_output(out, force=force, owned=is_corrected_adapter, inputs=inputs, kind="dir") as reserved:
        bases = AdapterSubspace(adapter, source, pair, progress) if needs is Needs.BASIS else None
        correction = run_correction(adapter, spec, resolved, bases=bases, pair=pair, progress=progress)
        report = correction.report(adapter)
        with atomic_dir(reserved) as tmp:
            write_adapter(adapter, tmp, {result.module: result.corrected.lora for result in correction.modules})
            (tmp / REPORT_NAME).write_text(strict_json(report) + "\n")
            card = _card(adapter, report, source.subspace, subspace_path, pair)
            (tmp / CARD_NAME).write_text(card, encoding="utf-8")  # replaces the input's copy
    return report


def _card(
    adapter: Adapter,
    report: dict,
    subspace: str | Path | Subspace | None,
    subspace_path: str | Path | None,
    pair: Pair | None,
) -> str:
    """The output's model card: how the adapter was corrected, then the input's own card."""
    original = adapter.path / CARD_NAME
    return corrected_card(
        report,
        base_model=adapter.base_model,
        task_type=adapter.config.get("task_type"),
        original=original.read_text(encoding="utf-8", errors="replace") if original.is_file() else None,
        subspace_file=str(subspace_path) if subspace_path is not None else None,
        streamed=subspace is None,
        pair=(pair.base.source, pair.aligned.source) if pair is not None and report["subspace"] is None else None,
        where=str(adapter.path),
    )


@dataclass(frozen=True)
class _ModuleSource:
    """What one module is corrected with (built at once from the basis, the delta, or nothing)."""

    module: str
    name: str
    inputs: ModuleInputs
    k: int | None
    unaligned: bool  # aligned - base is zero here


def _module_sources(
    adapter: Adapter, needs: Needs, bases: AdapterSubspace | None, pair: Pair | None, digests: list[dict | None]
) -> Iterator[_ModuleSource]:
    """Each adapter module's inputs, in order; each basis read appends its weights' digests to ``digests``."""
    if needs is Needs.BASIS:
        assert bases is not None
        for basis in bases.bases():
            digests.append(basis.sha256)  # the basis itself is released once its module is done
            inputs = ModuleInputs(basis.module, U=basis.U, R=basis.R, sigma=basis.sigma)
            yield _ModuleSource(basis.module, basis.name, inputs, basis.k, basis.k == 0)
    elif needs is Needs.DELTA:
        assert pair is not None
        for delta in adapter_deltas(adapter, pair):
            yield _ModuleSource(delta.module, delta.name, ModuleInputs(delta.module, V=delta.V), None, delta.negligible)
    else:
        for module in adapter.modules:
            name = pair.aligned.module_name(module) if pair else module
            yield _ModuleSource(module, name, ModuleInputs(module), None, False)


def run_correction(
    adapter: Adapter,
    spec: Method,
    method_settings: Settings,
    *,
    bases: AdapterSubspace | None = None,
    pair: Pair | None = None,
    progress: bool = False,
) -> Correction:
    """Apply ``spec`` with ``method_settings`` module by module (then its ``finalize`` across modules);
    nothing is written.

    ``bases`` gives the bases (for a method that needs them), ``pair`` the full ``V`` (for one that
    needs it). A module where aligned - base is zero keeps its update and is left out of ``finalize``.
    Where a basis is read, each module's signed overlap with ``V_k`` is measured before and after.
    """
    needs = spec.needs_for(method_settings)
    digests: list[dict | None] = []
    results = []
    for item in tqdm(
        _module_sources(adapter, needs, bases, pair, digests),
        total=len(adapter.modules),
        desc=spec.name,
        disable=not progress,
    ):
        lora = adapter.factors(item.module)
        if item.unaligned:
            corrected = _unchanged(lora)
        else:
            m, n, V = lora.B.shape[0], lora.A.shape[1], item.inputs.V
            with torch_threads(threads_for(correction_flops(m, n, lora.rank, item.k or 0, V is not None))):
                corrected = spec.correct(lora, item.inputs, method_settings)
            # float32 is ample for storage (adapters are saved in fp32 or lower) and halves peak memory
            corrected = Corrected(_float32(corrected.lora), corrected.info)
        before = after = None
        if item.inputs.sigma is not None:  # the basis is in hand: measure the signed overlap on both sides
            basis = (item.inputs.U, item.inputs.R, item.inputs.sigma)
            before, after = signed_overlap(lora, *basis), signed_overlap(corrected.lora, *basis)
        results.append(
            ModuleResult(
                item.module, item.name, lora.rank, _energy(lora), corrected, item.k, item.unaligned, before, after
            )
        )
    where = bases.where if bases is not None else str(pair.aligned.path if pair else adapter.path)
    warn_unaligned([r.name for r in results if r.unchanged], len(adapter.modules), where)
    if spec.finalize is not None:
        final = spec.finalize(
            adapter.factors, {r.module: r.corrected for r in results if not r.unchanged}, method_settings
        )
        results = [
            r
            if r.unchanged
            else replace(r, corrected=final[r.module], overlap_after=_overlap_after(r, final[r.module].lora))
            for r in results
        ]
    return Correction(spec.name, method_settings, results, bases.metadata(digests) if bases is not None else None)


# 1 - cos below this: the finalized update is the per-module one times c >= 0, up to float32 storage
SAME_DIRECTION_TOL = 1e-9


def _overlap_after(result: ModuleResult, final: LoraFactors) -> SignedOverlap | None:
    """The after-figures of a module ``finalize`` changed, without its basis (released by then).

    Both figures depend on the update's direction only: when the final update is the per-module result
    times some ``c >= 0`` (scale's common factor), they carry over; otherwise they are not known (None).
    """
    measured, mine = result.overlap_after, result.corrected.lora
    if measured is None or final is mine:
        return measured
    e_mine, e_final = frobenius_inner(mine, mine), frobenius_inner(final, final)
    if e_final == 0:
        return measured.scaled(0.0)
    if e_mine == 0:
        return None
    cosine = frobenius_inner(mine, final) / (e_mine * e_final) ** 0.5
    return measured.scaled(e_final / e_mine) if cosine >= 1 - SAME_DIRECTION_TOL else None


def _combined(parts: list[SignedOverlap | None]) -> SignedOverlap | None:
    known = [part for part in parts if part is not None]
    return combined_overlap(known) if known and len(known) == len(parts) else None


def _overlap_fields(before: SignedOverlap | None, after: SignedOverlap | None) -> dict:
    return {
        "signed_overlap_before": None if before is None else before.signed_overlap,
        "signed_overlap_after": None if after is None else after.signed_overlap,
        "opposing_share_before": None if before is None else before.opposing_share,
        "opposing_share_after": None if after is None else after.opposing_share,
    }


def _energy(lora: LoraFactors) -> float:
    return lora.scale**2 * frobenius_sq(lora.B, lora.A)


def _float32(lora: LoraFactors) -> LoraFactors:
    return LoraFactors(lora.B.float(), lora.A.float(), lora.scale)


def _unchanged(lora: LoraFactors) -> Corrected:
    """A module with V = 0 keeps its update: there is no safety direction to protect there."""
    info = {"energy": _energy(lora), "kappa_h": 1.0, "kappa_o": 1.0, "unchanged": "aligned - base is zero here"}
    return Corrected(_float32(lora), info)
