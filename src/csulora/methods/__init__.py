"""The methods registry: CSULoRA, its per-direction variant, and the baselines and controls.

Each method is one function with the same signature, ``(lora, inputs, params) -> Corrected``, plus a
declaration of what it needs per module: the subspace basis, the full alignment matrix ``V``, or
nothing. Methods that decide across modules (Safe LoRA's layer selection, the energy-matched scale)
have a ``finalize`` step that sees every module's result.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .correct import (
    Corrected,
    LoraFactors,
    attenuation,
    corrected_energy,
    csulora_dir_update,
    csulora_update,
    decompose,
    project_update,
    safelora_candidate,
    scale_update,
)
from .errors import CsuloraError

DEFAULT_LAM = 1.0


@dataclass(frozen=True)
class MethodParams:
    lam: float = DEFAULT_LAM
    rank_mode: str = "exact"
    select: str = "threshold"
    threshold: float = 0.5
    num_proj_layers: int = 10
    factor: float | None = None
    match_lam: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.rank_mode not in ("exact", "keep"):
            raise CsuloraError(f"--rank-mode must be 'exact' or 'keep', got {self.rank_mode!r}")
        if self.select not in ("threshold", "number"):
            raise CsuloraError(f"--select must be 'threshold' or 'number', got {self.select!r}")
        if not self.lam >= 0:
            raise CsuloraError(f"--lam must be >= 0, got {self.lam}")
        if self.match_lam is not None and not self.match_lam >= 0:
            raise CsuloraError(f"--match-lam must be >= 0, got {self.match_lam}")
        if self.factor is not None and not (math.isfinite(self.factor) and self.factor >= 0):
            raise CsuloraError(f"--factor must be a finite number >= 0, got {self.factor}")
        if not math.isfinite(self.threshold):
            raise CsuloraError(f"--threshold must be finite, got {self.threshold}")
        if self.num_proj_layers < 0:
            raise CsuloraError(f"--num-proj-layers must be >= 0, got {self.num_proj_layers}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModuleInputs:
    """What a method may use for one module. ``U``/``R`` and ``V`` are in the update's orientation."""

    name: str
    U: torch.Tensor | None = None
    R: torch.Tensor | None = None
    V: torch.Tensor | None = None


@dataclass(frozen=True)
class Method:
    correct: Callable[[LoraFactors, ModuleInputs, MethodParams], Corrected]
    needs_basis: bool = True
    needs_delta: bool = False
    # (original factors by module, per-module results, params) -> final results
    finalize: Callable[[Callable[[str], LoraFactors], dict, MethodParams], dict] | None = None
    relevant_params: tuple = field(default=())


def _csulora(lora, inputs, params):
    return csulora_update(lora, inputs.U, inputs.R, params.lam)


def _csulora_dir(lora, inputs, params):
    return csulora_dir_update(lora, inputs.U, inputs.R, params.lam)


def _project(lora, inputs, params):
    return project_update(lora, inputs.U, inputs.R)


def random_basis(name: str, m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random orthonormal ``U: m x k``, ``R: n x k``; each module gets its own stream."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    R, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return U, R


def _random(lora, inputs, params):
    U, R = random_basis(inputs.name, inputs.U.shape[0], inputs.R.shape[0], inputs.U.shape[1], params.seed)
    return csulora_update(lora, U, R, params.lam)


def _safelora(lora, inputs, params):
    return safelora_candidate(lora, inputs.V)


def _safelora_finalize(original: Callable[[str], LoraFactors], results: dict, params: MethodParams) -> dict:
    """Project the modules whose cosine is below the threshold, or the ``num_proj_layers`` lowest.

    Each selected module is projected once (``C B``); the rest keep the trained update.
    """
    cosines = {name: result.info["cosine"] for name, result in results.items()}
    if params.select == "threshold":
        chosen = {name for name, cos in cosines.items() if cos < params.threshold}
    else:
        chosen = set(sorted(cosines, key=lambda name: cosines[name])[: params.num_proj_layers])
    final = {}
    for name, result in results.items():
        projected = name in chosen
        lora = result.lora if projected else original(name)
        final[name] = Corrected(lora, result.info | {"projected": projected})
    return final


def _scale(lora, inputs, params):
    """Record the energy csulora would keep at ``match_lam``; the common factor is set in finalize."""
    if params.factor is not None:
        return Corrected(lora, {})
    d = decompose(lora, inputs.U, inputs.R)
    lam = params.match_lam if params.match_lam is not None else params.lam
    k_h, k_o = attenuation(lam, d.rho_h), attenuation(lam, d.rho_o)
    info = {"energy": d.energy, "rho_f": d.rho_f, "rho_h": d.rho_h, "rho_o": d.rho_o}
    return Corrected(lora, info | {"matched_energy": corrected_energy(d, k_h, k_o)})


def energy_matched_factor(results: dict) -> float:
    """``c`` with ``c^2 sum ||dW||^2 = sum ||dW*_csulora||^2`` over all modules."""
    total = sum(result.info["energy"] for result in results.values())
    matched = sum(result.info["matched_energy"] for result in results.values())
    return math.sqrt(matched / total) if total > 0 else 1.0


def _scale_finalize(original: Callable[[str], LoraFactors], results: dict, params: MethodParams) -> dict:
    factor = params.factor if params.factor is not None else energy_matched_factor(results)
    final = {}
    for name, result in results.items():
        scaled = scale_update(original(name), factor)
        info = {key: value for key, value in result.info.items() if key != "matched_energy"}
        final[name] = Corrected(scaled.lora, info | scaled.info | {"kappa_h": factor, "kappa_o": factor})
    return final


METHODS: dict[str, Method] = {
    "csulora": Method(_csulora, relevant_params=("lam", "rank_mode")),
    "csulora-dir": Method(_csulora_dir, relevant_params=("lam",)),
    "safelora": Method(
        _safelora,
        needs_basis=False,
        needs_delta=True,
        finalize=_safelora_finalize,
        relevant_params=("select", "threshold", "num_proj_layers"),
    ),
    "project": Method(_project),
    "scale": Method(_scale, finalize=_scale_finalize, relevant_params=("factor", "match_lam", "lam")),
    "random": Method(_random, relevant_params=("lam", "rank_mode", "seed")),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CsuloraError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def method_needs_basis(name: str, params: MethodParams) -> bool:
    """``scale`` with an explicit ``--factor`` needs no subspace; every other csulora-family method does."""
    if name == "scale" and params.factor is not None:
        return False
    return get_method(name).needs_basis
