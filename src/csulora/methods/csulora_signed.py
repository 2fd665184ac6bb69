"""csulora-signed: csulora, with the part of F that reverses the alignment shrunk as well (an experiment).

csulora keeps F whole, whatever its sign; an update that moves along -V lies in F too. Along each
singular direction ``u_i r_i^T`` of ``V_k`` where the update's coordinate has the opposite sign, that
part of F is shrunk by ``1 / (1 + lam * opposing_weight)``; the rest of F is kept, H and O are shrunk as
csulora shrinks them (docs/method.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..correct import Corrected, LoraFactors, csulora_signed_update
from .base import ModuleInputs, Settings, define_method, fit_rank, lam_setting, rank_mode_setting, setting


@dataclass(frozen=True)
class CsuloraSignedSettings(Settings):
    lam: float = lam_setting()
    rank_mode: str = rank_mode_setting()
    opposing_weight: float = setting(
        1.0,
        "penalty weight w on F's part that reverses V, shrunk by 1/(1 + lam w): 1 shrinks it at least as much as "
        "csulora shrinks H or O, 0 is csulora",
        minimum=0,
        finite=True,
    )


@define_method(
    "csulora-signed",
    settings=CsuloraSignedSettings,
    summary="csulora, with F's part along -V (per singular direction of V) shrunk by 1/(1 + lam w); "
    "rank up to 2r + its reversing directions",
    knob="lam",
)
def method(lora: LoraFactors, inputs: ModuleInputs, settings: CsuloraSignedSettings) -> Corrected:
    update = csulora_signed_update(lora, *inputs.spectrum, settings.lam, settings.opposing_weight)
    return fit_rank(lora, update, settings.rank_mode)
