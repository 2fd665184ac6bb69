"""What a correction method is: its typed settings, what it needs per module, how it finalizes.

A method is one decorated function, ``(lora, inputs, settings) -> Corrected``, in a file of its own
(see ``csulora.methods.csulora`` for the pattern). Its settings are a frozen dataclass whose fields
carry a default, bounds and help text (``setting``): the CLI flags and the report's ``params`` are
generated from these declarations by the registry in ``csulora.methods``. A method may name one of its
settings as its ``knob``: the one that says how strongly it corrects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from ..correct import Corrected, LoraFactors, truncate_to_rank
from ..errors import CsuloraError
from ..settings import NoSettings, Settings, SettingSpec, setting, setting_specs

__all__ = [
    "DEFAULT_LAM",
    "Finalize",
    "Method",
    "ModuleInputs",
    "Needs",
    "NoSettings",
    "SettingSpec",
    "Settings",
    "define_method",
    "fit_rank",
    "lam_setting",
    "rank_mode_setting",
    "setting",
    "setting_specs",
]


class Needs(Enum):
    """What a method reads per module besides the adapter."""

    BASIS = "the subspace basis U, R"
    DELTA = "the full alignment matrix V = W_aligned - W_base"
    NOTHING = "nothing"


@dataclass(frozen=True)
class ModuleInputs:
    """What a method may use for one module. ``U``/``R`` and ``V`` are in the update's orientation.

    ``sigma``: the singular values that go with ``U``, ``R`` (``V_k = U diag(sigma) R^T``).
    """

    name: str
    U: torch.Tensor | None = None
    R: torch.Tensor | None = None
    V: torch.Tensor | None = None
    sigma: torch.Tensor | None = None

    @property
    def basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.U is None or self.R is None:
            raise CsuloraError(f"module {self.name}: this method needs the subspace basis, which was not given")
        return self.U, self.R

    @property
    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U``, ``R`` and ``sigma``, for a method that reads V's singular values too."""
        if self.sigma is None:
            raise CsuloraError(f"module {self.name}: this method needs the subspace's singular values, not given")
        return (*self.basis, self.sigma)

    @property
    def delta(self) -> torch.Tensor:
        if self.V is None:
            raise CsuloraError(f"module {self.name}: this method needs the alignment matrix V, which was not given")
        return self.V


# Settings several methods share (one flag each on the CLI): declared once, here.
DEFAULT_LAM = 1.0


def lam_setting() -> Any:
    return setting(
        DEFAULT_LAM, "lambda: 0 returns the adapter, larger shrinks more outside the subspace, inf projects", minimum=0
    )


def rank_mode_setting() -> Any:
    return setting("exact", "exact: rank up to 2r; keep: best rank-r approximation", choices=("exact", "keep"))


def fit_rank(original: LoraFactors, result: Corrected, rank_mode: str) -> Corrected:
    """``rank_mode = keep``: a result wider than the adapter becomes its best rank-r approximation."""
    if rank_mode != "keep" or result.lora.rank <= original.rank:
        return result
    lora, error = truncate_to_rank(result.lora, original.rank)
    return Corrected(lora, result.info | {"truncation_error": error})


# -- the method ----------------------------------------------------------------------------------
Finalize = Callable[[Callable[[str], LoraFactors], dict[str, Corrected], Any], dict[str, Corrected]]


@dataclass(frozen=True)
class Method:
    """A registered correction method (build one with ``define_method``)."""

    name: str
    correct: Callable[[LoraFactors, ModuleInputs, Any], Corrected]
    settings: type[Settings] = NoSettings
    summary: str = ""
    # Needs, or a function of the settings (e.g. a fixed scale factor needs no subspace)
    needs: Needs | Callable[[Any], Needs] = Needs.BASIS
    # (original factors by module, per-module results, settings) -> final results, for decisions across modules;
    # the report's after-figures of the signed overlap survive it only where it scales an update by c >= 0
    finalize: Finalize | None = None
    # the setting that says how strongly the method corrects (lam for csulora), if it has one
    knob: str | None = None

    def setting_specs(self) -> tuple[SettingSpec, ...]:
        return setting_specs(self.settings)

    def settings_from(self, values: Mapping[str, Any] | Settings | None) -> Settings:
        """This method's settings from a mapping of values by name (names of other methods ignored)."""
        if isinstance(values, Settings):
            if not isinstance(values, self.settings):
                raise CsuloraError(f"method {self.name} takes {self.settings.__name__}, not {type(values).__name__}")
            return values
        values = values or {}
        return self.settings(**{spec.name: values[spec.name] for spec in self.setting_specs() if spec.name in values})

    def needs_for(self, settings: Settings) -> Needs:
        return self.needs(settings) if callable(self.needs) else self.needs


def define_method(
    name: str,
    *,
    settings: type[Settings] = NoSettings,
    summary: str,
    needs: Needs | Callable[[Any], Needs] = Needs.BASIS,
    finalize: Finalize | None = None,
    knob: str | None = None,
) -> Callable[[Callable[[LoraFactors, ModuleInputs, Any], Corrected]], Method]:
    """Decorate a ``(lora, inputs, settings) -> Corrected`` function to make it a ``Method``.

    ``knob``: the setting that says how strongly the method corrects (e.g. ``lam``), if it has one.
    """

    def wrap(correct: Callable[[LoraFactors, ModuleInputs, Any], Corrected]) -> Method:
        method = Method(name, correct, settings, summary, needs, finalize, knob)
        if knob is not None and knob not in {spec.name for spec in method.setting_specs()}:
            raise TypeError(f"method {name}: its knob {knob!r} is not one of its settings")
        return method

    return wrap
