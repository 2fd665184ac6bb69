"""The lab end to end: world -> tokenizer -> base -> aligned -> LoRA attack -> corrections -> report.

The checkpoints are real Hugging Face / PEFT directories and every correction goes through
``csulora.compute_subspace`` and ``csulora.correct_adapter``, as ``csulora correct`` does.
Trained artifacts are cached under ``OUT/cache/<size>-seed<seed>-<config hash>`` so a second run (or
a run with the same configuration elsewhere in ``OUT``) only re-corrects and re-evaluates.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from csulora import __version__
from csulora.errors import CsuloraError
from csulora.safe_output import atomic_dir, atomic_file

from ..machine import environment, peak_rss_mb
from ..sweep import CorrectionInputs, correct_all, lab_sweep
from ..train import Example, ModelShape, Schedule, format_prompt
from .world import World, WorldSizes, build_world

# Bump when the world or the training code changes in a way that changes the artifacts.
LAB_VERSION = 5


@dataclass(frozen=True)
class LabConfig:
    size: str
    seed: int
    shape: ModelShape
    world: WorldSizes
    base: Schedule
    align: Schedule
    attack: Schedule
    vocab_size: int = 600
    lora_rank: int = 8
    lora_alpha: float = 16.0
    shard_size: str = "200KB"
    subspace_energy: float = 0.8
    # the sweep's value grids by name (a method's knob runs over the grid it names, see csulora.methods)
    grids: Mapping[str, tuple[float, ...]] = field(
        default_factory=lambda: {"lam": (0.1, 0.3, 1.0, 3.0, 10.0, 30.0), "threshold": (0.3, 0.5, 0.7)}
    )
    max_new_tokens: int = 24
    eval_batch_size: int = 64

    def key(self) -> str:
        """Hash of everything that shapes the trained artifacts (not the sweep or the evaluation)."""
        fields = asdict(self)
        for name in ("grids", "max_new_tokens", "eval_batch_size"):
            fields.pop(name)
        text = json.dumps(fields | {"lab_version": LAB_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        shape=ModelShape(hidden=64, layers=2, heads=4, intermediate=128),
        world=WorldSizes(),
        base=Schedule(steps=800, batch_size=32, lr=3e-3),
        align=Schedule(steps=250, batch_size=32, lr=1e-3),
        attack=Schedule(steps=500, batch_size=32, lr=3e-3),
        grids={"lam": (0.1, 0.3, 1.0, 3.0, 10.0, 30.0), "threshold": (0.3, 0.5, 0.7)},
    ),
    "small": dict(
        shape=ModelShape(hidden=64, layers=2, heads=4, intermediate=128),
        world=WorldSizes(eval_per_family=12, eval_code=64),
        base=Schedule(steps=1200, batch_size=32, lr=3e-3),
        align=Schedule(steps=300, batch_size=32, lr=1e-3),
        attack=Schedule(steps=600, batch_size=32, lr=3e-3),
        grids={"lam": (0.05, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), "threshold": (0.2, 0.35, 0.5, 0.65, 0.8)},
    ),
    "default": dict(
        shape=ModelShape(hidden=96, layers=2, heads=4, intermediate=192),
        # The alignment mix is 82% benign, fresh instances seen ~7 times each: with 60 per family (47%
        # benign, each seen ~29 times) the fine-tune cost up to 5 of 96 held-out general prompts.
        world=WorldSizes(
            pretrain_per_family=400, pretrain_harmful=800, align_per_family=600, align_harmful=800,
            eval_per_family=16, eval_code=96,
        ),
        base=Schedule(steps=1800, batch_size=32, lr=3e-3),
        # With 9 harmful training wordings (LAB_VERSION 4), 700 and 1400 steps both left a held-out wording
        # unrefused on some seed; with 19 (and 6-7 per benign family), 1000 steps hold the gates (README).
        align=Schedule(steps=1000, batch_size=32, lr=1e-3),
        attack=Schedule(steps=800, batch_size=32, lr=3e-3),
        shard_size="400KB",
        grids={"lam": (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 100.0), "threshold": (0.2, 0.35, 0.5, 0.65, 0.8)},
    ),
}  # fmt: skip


def lab_config(size: str, seed: int = 0) -> LabConfig:
    if size not in SIZES:
        raise CsuloraError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    return LabConfig(size=size, seed=seed, **SIZES[size])


# -- the cached artifacts ------------------------------------------------------------------------
@dataclass
class Artifacts:
    root: Path
    reused: list[str] = field(default_factory=list)

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def aligned(self) -> Path:
        return self.root / "aligned"

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def subspace(self) -> Path:
        return self.root / "subspace.safetensors"


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[lab] {message}", flush=True)


def build_artifacts(config: LabConfig, world: World, cache: Path, *, quiet: bool = False) -> Artifacts:
    """Train (or reuse) tokenizer, base, aligned, LoRA and subspace; each is written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csulora.subspace_stream import compute_subspace
    from csulora.svd import SubspaceSettings

    from ..train import add_lora, fit, new_model, train_tokenizer

    art = Artifacts(cache)
    cache.mkdir(parents=True, exist_ok=True)
    progress = not quiet

    def stage(name: str, path: Path) -> bool:
        if path.exists():
            art.reused.append(name)
            _log(f"{name}: reusing {path}", quiet)
            return False
        _log(f"{name}: building {path}", quiet)
        return True

    if stage("tokenizer", art.tokenizer):
        texts = [format_prompt(ex.prompt) + ex.response for ex in world.pretrain + world.align + world.attack]
        tokenizer = train_tokenizer(texts, config.vocab_size)
        with atomic_dir(art.tokenizer) as tmp:
            tokenizer.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(art.tokenizer)

    if stage("base", art.base):
        model = new_model(tokenizer, config.shape, config.seed)
        fit(model, tokenizer, world.pretrain, config.base, config.seed + 1, "train base", progress)
        with atomic_dir(art.base) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    if stage("aligned", art.aligned):
        model = AutoModelForCausalLM.from_pretrained(art.base)
        fit(model, tokenizer, world.align, config.align, config.seed + 2, "align", progress)
        with atomic_dir(art.aligned) as tmp:
            model.save_pretrained(tmp, max_shard_size=config.shard_size)
            tokenizer.save_pretrained(tmp)

    if stage("lora", art.lora):
        # Loaded from its final absolute path: the adapter's base_model_name_or_path points there.
        model = AutoModelForCausalLM.from_pretrained(art.aligned.resolve())
        peft_model = add_lora(model, config.lora_rank, config.lora_alpha, config.seed + 3)
        fit(peft_model, tokenizer, world.attack, config.attack, config.seed + 3, "attack (LoRA)", progress)
        with atomic_dir(art.lora) as tmp:
            peft_model.save_pretrained(tmp)

    if stage("subspace", art.subspace):
        settings = SubspaceSettings(energy=config.subspace_energy, seed=config.seed)
        subspace = compute_subspace(art.base, art.aligned, adapter=art.lora, settings=settings, progress=progress)
        subspace.save(art.subspace)
    return art


# -- the sweep -----------------------------------------------------------------------------------
def sweep(config: LabConfig) -> list[tuple[str, dict]]:
    """``(method, settings)`` for every correction the lab runs: every registered method over its knob."""
    return lab_sweep(config.grids, config.seed)


def attack_diagnostic(art: CorrectionInputs) -> dict:
    """Where the attack's update lies against the subspace the corrections use (``csulora inspect --json``)."""
    from csulora.inspection import alignment_diagnostic
    from csulora.sources import BasisSource

    return alignment_diagnostic(art.lora, BasisSource(art.subspace))


# -- evaluation ----------------------------------------------------------------------------------
def evaluate_checkpoint(model_dir: Path, adapter: Path | None, world: World, config: LabConfig) -> dict:
    """``asr`` (keyword judge), ``asr_strict``, ``utility`` and ``general`` on the world's held-out prompts.

    The same generate-then-judge path as ``csulora eval``; the world's answers are checked exactly.
    """
    from csulora.evaluate.judges import KeywordJudge, StrictKeywordJudge
    from csulora.evaluate.pipeline import Generation, TaskSet, generate_and_judge

    def task(name: str, examples: list[Example]) -> TaskSet:
        return TaskSet(name, [(ex.prompt, ex.response) for ex in examples], scoring="exact")

    result = generate_and_judge(
        model_dir,
        adapter,
        harmful=[ex.prompt for ex in world.eval_harmful],
        judges=[KeywordJudge(), StrictKeywordJudge()],
        tasks=[task("utility", world.eval_utility), task("general", world.eval_general)],
        generation=Generation(config.max_new_tokens, config.eval_batch_size),
    )
    return {name: result[name] for name in ("asr", "asr_strict", "utility", "general")}


def evaluate_all(
    config: LabConfig, world: World, art: Artifacts, runs: list[dict], *, quiet: bool = False
) -> tuple[dict, list[dict]]:
    """Metrics of the three reference models and of every corrected adapter."""
    from csulora.evaluate.metrics import relative_metrics

    references = {"base": (art.base, None), "aligned": (art.aligned, None), "lora": (art.aligned, art.lora)}
    todo = [(name, *where) for name, where in references.items()] + [
        (i, art.aligned, run["adapter"]) for i, run in enumerate(runs)
    ]
    measured = {}
    for name, model_dir, adapter in tqdm(todo, desc="evaluate", disable=quiet, leave=False):
        measured[name] = evaluate_checkpoint(model_dir, adapter, world, config)
    models = {name: measured[name] for name in references}
    results = []
    for i, run in enumerate(runs):
        metrics = measured[i]
        results.append(
            {"method": run["method"], "params": run["params"]}
            | metrics
            | relative_metrics(metrics, models["aligned"], models["lora"])
        )
    return models, results


# -- the whole lab -------------------------------------------------------------------------------
def run_lab(
    out: str | Path = "csulora-lab",
    size: str = "default",
    seed: int = 0,
    *,
    quiet: bool = False,
    config: LabConfig | None = None,
    threads: int | None = 1,
) -> dict:
    """Run the lab into ``out`` and return the results document (also written as ``results.json``).

    ``config`` overrides the preset of ``size`` (e.g. ``dataclasses.replace(lab_config("tiny"), ...)``).
    ``threads``: torch threads while the lab runs (restored after). One by default: these models are
    too small to gain from more, and spinning threads on a shared CPU make training many times slower.
    """
    from transformers.utils import logging as hf_logging

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    # transformers' per-checkpoint "Loading weights" bars would drown the lab's own progress bars.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run_lab(out, size, seed, quiet=quiet, config=config)
    finally:
        torch.set_num_threads(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _run_lab(out: str | Path, size: str, seed: int, *, quiet: bool, config: LabConfig | None) -> dict:
    from .report import plot_frontier, verdict, write_report

    config = config or lab_config(size, seed)
    size, seed = config.size, config.seed
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CsuloraError(f"{out}: exists and is not a directory")
    torch.manual_seed(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    machine = environment(torch.get_num_threads())  # the load before the lab adds its own
    world = build_world(seed, config.world)
    cache = out / "cache" / f"{size}-seed{seed}-{config.key()}"
    art = build_artifacts(config, world, cache, quiet=quiet)
    trained = time.perf_counter()
    diagnostic = attack_diagnostic(art)
    runs = correct_all(sweep(config), art, out / "adapters", quiet=quiet)
    models, results = evaluate_all(config, world, art, runs, quiet=quiet)
    document: dict[str, Any] = {
        "config": asdict(config) | {"csulora_version": __version__, "lab_version": LAB_VERSION},
        "models": models,
        "runs": results,
        "verdict": verdict(models, results, n_harmful=len(world.eval_harmful)),
        "diagnostic": diagnostic,
        "artifacts": {
            "cache": str(cache),
            "reused": art.reused,
            "base": str(art.base),
            "aligned": str(art.aligned),
            "lora": str(art.lora),
            "subspace": str(art.subspace),
            "adapters": str(out / "adapters"),
        },
        "seconds": {"train": round(trained - start, 1), "total": None, "cpu": None},
        "machine": machine,
    }
    methods = plot_frontier(models, results, out / "frontier.png")
    document["plotted_methods"] = methods
    document["seconds"]["total"] = round(time.perf_counter() - start, 1)
    # CPU seconds (user + system, all threads): unlike the wall time, they do not grow with the load.
    document["seconds"]["cpu"] = round(time.process_time() - cpu_start, 1)
    document["machine"]["peak_rss_mb"] = peak_rss_mb()
    with atomic_file(out / "results.json", force=True) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    write_report(document, out / "report.md")
    _log(f"done in {document['seconds']['total']:.0f} s: {out / 'report.md'}", quiet)
    return document
