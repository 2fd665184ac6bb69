"""random: csulora with a seeded random subspace of the same k per module.

The control that says whether the alignment subspace carries information.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..correct import Corrected, LoraFactors, csulora_update
from .base import ModuleInputs, Settings, define_method, fit_rank, lam_setting, rank_mode_setting, setting


def random_basis(name: str, m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random orthonormal ``U: m x k``, ``R: n x k``; each module gets its own stream."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    R, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return U, R


@dataclass(frozen=True)
class RandomSettings(Settings):
    lam: float = lam_setting()
    rank_mode: str = rank_mode_setting()
    seed: int = setting(0, "seed of the random subspace")


@define_method(
    "random",
    settings=RandomSettings,
    summary="csulora with a seeded random subspace of the same k per module (a control)",
    knob="lam",
)
def method(lora: LoraFactors, inputs: ModuleInputs, settings: RandomSettings) -> Corrected:
    U, R = inputs.basis
    U_r, R_r = random_basis(inputs.name, U.shape[0], R.shape[0], U.shape[1], settings.seed)
    return fit_rank(lora, csulora_update(lora, U_r, R_r, settings.lam), settings.rank_mode)
