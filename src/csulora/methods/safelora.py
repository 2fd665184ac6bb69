"""safelora (Hsu et al., 2024): ``B' = C B`` with ``C = V V^T / ||V||_F`` for the modules it selects.

Selection looks across modules (a threshold on each module's cosine, or the lowest few), so it is
done in ``finalize`` once every module's candidate is known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..correct import Corrected, LoraFactors, safelora_candidate
from .base import ModuleInputs, Needs, Settings, define_method, setting


@dataclass(frozen=True)
class SafeLoraSettings(Settings):
    select: str = setting(
        "threshold",
        "which modules to project: cosine below --threshold, or the --num-proj-layers lowest",
        choices=("threshold", "number"),
    )
    threshold: float = setting(0.5, "cosine threshold of the 'threshold' selection", finite=True)
    num_proj_layers: int = setting(10, "how many modules the 'number' selection projects", minimum=0)


def finalize(
    original: Callable[[str], LoraFactors], results: dict[str, Corrected], settings: SafeLoraSettings
) -> dict[str, Corrected]:
    """Project the modules whose cosine is below the threshold, or the ``num_proj_layers`` lowest.

    Each selected module is projected once (``C B``); the rest keep the trained update.
    """
    cosines = {name: result.info["cosine"] for name, result in results.items()}
    if settings.select == "threshold":
        chosen = {name for name, cos in cosines.items() if cos < settings.threshold}
    else:
        chosen = set(sorted(cosines, key=lambda name: cosines[name])[: settings.num_proj_layers])
    final = {}
    for name, result in results.items():
        projected = name in chosen
        lora = result.lora if projected else original(name)
        final[name] = Corrected(lora, result.info | {"projected": projected})
    return final


@define_method(
    "safelora",
    settings=SafeLoraSettings,
    summary="Safe LoRA: project B onto V V^T / |V|_F where the cosine with the update is low (needs --base)",
    needs=Needs.DELTA,
    finalize=finalize,
    knob="threshold",
)
def method(lora: LoraFactors, inputs: ModuleInputs, settings: SafeLoraSettings) -> Corrected:
    return safelora_candidate(lora, inputs.delta)
