"""project: the hard two-sided projection onto the fully aligned part F (csulora at lam = inf)."""

from __future__ import annotations

from ..correct import Corrected, LoraFactors, project_update
from .base import ModuleInputs, NoSettings, define_method


@define_method("project", summary="the fully aligned part F alone (lam = inf), rank kept")
def method(lora: LoraFactors, inputs: ModuleInputs, settings: NoSettings) -> Corrected:
    return project_update(lora, *inputs.basis)
