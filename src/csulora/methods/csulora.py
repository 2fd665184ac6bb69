"""CSULoRA: keep the update's fully aligned part, shrink the rest by its relative energy (docs/method.md).

This file is the pattern for a method: a settings dataclass and one decorated function; the registry
(``csulora.methods``) lists it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..correct import Corrected, LoraFactors, csulora_update
from .base import ModuleInputs, Settings, define_method, fit_rank, lam_setting, rank_mode_setting


@dataclass(frozen=True)
class CsuloraSettings(Settings):
    lam: float = lam_setting()
    rank_mode: str = rank_mode_setting()


@define_method(
    "csulora",
    settings=CsuloraSettings,
    summary="the closest safe update F + H/(1 + lam rho_H) + O/(1 + lam rho_O), rank up to 2r",
    knob="lam",
)
def method(lora: LoraFactors, inputs: ModuleInputs, settings: CsuloraSettings) -> Corrected:
    return fit_rank(lora, csulora_update(lora, *inputs.basis, settings.lam), settings.rank_mode)
