"""csulora-dir: per singular direction of the update, keep its in-subspace part and shrink the rest."""

from __future__ import annotations

from dataclasses import dataclass

from ..correct import Corrected, LoraFactors, csulora_dir_update
from .base import ModuleInputs, Settings, define_method, lam_setting


@dataclass(frozen=True)
class CsuloraDirSettings(Settings):
    lam: float = lam_setting()


@define_method(
    "csulora-dir",
    settings=CsuloraDirSettings,
    summary="per singular direction u_i, shrink the part outside the subspace by 1/(1 + lam (1 - |U^T u_i|^2))",
    knob="lam",
)
def method(lora: LoraFactors, inputs: ModuleInputs, settings: CsuloraDirSettings) -> Corrected:
    return csulora_dir_update(lora, *inputs.basis, settings.lam)
