"""scale: the whole update times one factor, by default energy-matched to csulora (a control).

The common factor depends on every module, so each module records the energy csulora would keep and
``finalize`` sets the factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..correct import Corrected, LoraFactors, attenuation, corrected_energy, decompose, scale_update
from .base import ModuleInputs, Needs, Settings, define_method, lam_setting, setting


@dataclass(frozen=True)
class ScaleSettings(Settings):
    factor: float | None = setting(None, "a fixed factor c (then no subspace is needed)", minimum=0, finite=True)
    match_lam: float | None = setting(None, "match the energy csulora keeps at this lambda (default --lam)", minimum=0)
    lam: float = lam_setting()


def energy_matched_factor(results: dict[str, Corrected]) -> float:
    """``c`` with ``c^2 sum ||dW||^2 = sum ||dW*_csulora||^2`` over all modules."""
    total = sum(result.info["energy"] for result in results.values())
    matched = sum(result.info["matched_energy"] for result in results.values())
    return math.sqrt(matched / total) if total > 0 else 1.0


def finalize(
    original: Callable[[str], LoraFactors], results: dict[str, Corrected], settings: ScaleSettings
) -> dict[str, Corrected]:
    factor = settings.factor if settings.factor is not None else energy_matched_factor(results)
    final = {}
    for name, result in results.items():
        scaled = scale_update(original(name), factor)
        info = {key: value for key, value in result.info.items() if key != "matched_energy"}
        final[name] = Corrected(scaled.lora, info | scaled.info | {"kappa_h": factor, "kappa_o": factor})
    return final


def needs(settings: ScaleSettings) -> Needs:
    return Needs.NOTHING if settings.factor is not None else Needs.BASIS


@define_method(
    "scale",
    settings=ScaleSettings,
    summary="the whole update times one factor, energy-matched to csulora at --match-lam unless --factor (a control)",
    needs=needs,
    finalize=finalize,
    knob="match_lam",
)
def method(lora: LoraFactors, inputs: ModuleInputs, settings: ScaleSettings) -> Corrected:
    """Record the energy csulora would keep at ``match_lam``; the common factor is set in finalize."""
    if settings.factor is not None:
        return Corrected(lora, {})
    d = decompose(lora, *inputs.basis)
    lam = settings.match_lam if settings.match_lam is not None else settings.lam
    k_h, k_o = attenuation(lam, d.rho_h), attenuation(lam, d.rho_o)
    info = {"energy": d.energy, "rho_f": d.rho_f, "rho_h": d.rho_h, "rho_o": d.rho_o}
    return Corrected(lora, info | {"matched_energy": corrected_energy(d, k_h, k_o)})
