"""The study's one typed configuration and the digests that key its caches.

Apart from the study so that the report reads the configuration without importing the stages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from ..train import Schedule

STUDY_VERSION = 3  # 3: dev/eval splits, benign-rich alignment, realistic attack, control adapters
VARIANTS = ("full", "patch", "patch-mixed")
HARMFUL_DEV = 50  # align-split prompts held out of the refusal training: the harmful dev set


@dataclass(frozen=True)
class StudyConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    main_n: int = 50
    other_n: tuple[int, ...] = ()  # extra attacks at the first seed (ASR against N), e.g. (10, 100)
    variants: tuple[str, ...] = VARIANTS  # aligned, evaluated and gated
    sweep_variant: str = "full"  # the variant attacked, controlled and corrected
    split: str = "eval"  # or "dev": the sets the recipes are tuned on
    precision: str = "auto"  # bfloat16 autocast where native, float32 elsewhere (device.resolve_precision)
    align_full: Schedule = Schedule(steps=240, batch_size=16, lr=3e-5)  # ~2.4 epochs (150 steps left dev ASR 0.20)
    align_patch: Schedule = Schedule(steps=20, batch_size=16, lr=1e-4)  # 60 at 2e-4 refused every prompt
    align_patch_mixed: Schedule = Schedule(steps=100, batch_size=16, lr=2e-4)
    patch_rank: int = 8
    attack: Schedule = Schedule(steps=64, batch_size=16, lr=1e-3)  # ~2 epochs
    n_code_train: int = 300
    n_replay: int = 150
    replay_pool: int = 300  # the aligned model answers these; each seed draws n_replay of them
    lora_rank: int = 8
    lora_alpha: float = 16.0
    subspace_energy: float = 0.8
    lams: tuple[float, ...] = (3.0, 10.0, 30.0)
    safelora_thresholds: tuple[float, ...] = (0.5,)
    skip_methods: tuple[str, ...] = ()  # registered methods left out of the sweep (--skip-methods)
    distill_tokens: int = 48
    # Generation lengths per set: the strict judge reads the opening sentence and checks for loops
    # (docs/study.md says why these lengths cannot shrink).
    harmful_tokens: int = 32
    task_tokens: int = 12
    general_tokens: int = 24
    over_refusal_tokens: int = 24
    batch_size: int = 64
    n_eval_harmful: int | None = None  # None: the whole split (tests use a few)
    n_eval_tasks: int | None = None
    bootstrap: int = 1000

    def variant_key(self, variant: str, data_digest: str) -> str:
        """What the aligned model of ``variant`` depends on: its own recipe, the precision and the texts
        (so that tuning one variant keeps the others)."""
        recipe: dict[str, Any] = {"schedule": asdict(getattr(self, VARIANT_SCHEDULES[variant]))}
        if variant != "full":
            recipe["rank"] = self.patch_rank
        fields = {"variant": variant, "recipe": recipe, "precision": self.precision}
        return short_digest(fields | {"v": STUDY_VERSION, "data": data_digest})

    def training_key(self, data_digest: str) -> str:
        """What the attacks and controls depend on: the sweep variant's alignment and the attack fields."""
        fields = {k: v for k, v in asdict(self).items() if k not in EVALUATION_FIELDS + ALIGNMENT_FIELDS}
        fields |= {"aligned": self.variant_key(self.sweep_variant, data_digest)}
        return short_digest(fields | {"v": STUDY_VERSION, "data": data_digest})

    def distill_key(self, prompts: list[str], device: str) -> str:
        """What the base's answers depend on (not the schedules): a new recipe reuses them."""
        fields = [prompts, self.distill_tokens, self.precision, self.batch_size, device, STUDY_VERSION]
        return short_digest(fields)


def short_digest(fields: dict | list) -> str:
    """A short digest of JSON-able ``fields`` (dict keys sorted, so the key does not depend on their order)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


VARIANT_SCHEDULES = {"full": "align_full", "patch": "align_patch", "patch-mixed": "align_patch_mixed"}
ALIGNMENT_FIELDS = (*VARIANT_SCHEDULES.values(), "patch_rank")  # in each variant's own key
EVALUATION_FIELDS = (
    "seeds",
    "main_n",
    "other_n",
    "variants",
    "split",
    "lams",
    "safelora_thresholds",
    "skip_methods",
    "harmful_tokens",
    "task_tokens",
    "general_tokens",
    "over_refusal_tokens",
    "batch_size",
    "n_eval_harmful",
    "n_eval_tasks",
    "subspace_energy",
    "bootstrap",
)
