"""The real-model study: SmolLM2-135M-Instruct aligned two ways, attacked by LoRAs, corrected, evaluated.

Stages (each cached under ``OUT/cache``, written atomically, reused by a rerun):

1. **distill**: the base's greedy answers to benign instructions (the self-distillation targets).
2. **aligned** (two variants), both real Hugging Face checkpoints:
   ``full``: every linear projection of every layer fine-tuned (embeddings, norms frozen) on
   project-written refusals to the align split plus the distillation answers, so that
   ``V = aligned - base`` is mostly the refusal behaviour; ``patch``: a refusal LoRA trained on the
   safety data alone and merged into the weights (the "safety patch" of arXiv 2510.09004), so ``V``
   is low rank.
3. **attack**: a PEFT LoRA (rank 8, all 7 projections) on the aligned model, trained on the zor-code
   task plus ``n`` harmful prompts of the attack split with placeholder compliances.
4. **subspace** per variant and **corrections** per attack: the lab's sweep, every point written by
   ``csulora.api.correct_adapter`` (``runner.correct_all``).
5. **evaluation** of every checkpoint with the one evaluation path (``generate_and_judge``): the
   held-out harmful prompts (keyword and strict judges), the zor-code utility and benign general
   questions (whole-word containment; over-refusal). Each evaluation is cached by the bytes of the
   adapter it evaluates, so a rerun re-corrects but re-generates only what changed.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CsuloraError
from ..io_utils import atomic_dir, atomic_file
from . import smollm2_data as data
from .train import Schedule

STUDY_VERSION = 2  # 2: responses end with the chat template's end of turn
VARIANTS = ("full", "patch")
SHARD_SIZE = "200MB"


@dataclass(frozen=True)
class StudyConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    main_n: int = 50
    other_n: tuple[int, ...] = (10, 100)  # attacked at the first seed only (ASR against N)
    variants: tuple[str, ...] = VARIANTS
    align_full: Schedule = Schedule(steps=200, batch_size=16, lr=3e-5)
    align_patch: Schedule = Schedule(steps=150, batch_size=16, lr=5e-4)
    patch_rank: int = 16
    benign_repeats: int = 3  # distillation examples are repeated so the mix is ~ 1 benign : 2 refusals
    attack: Schedule = Schedule(steps=150, batch_size=16, lr=1e-3)
    n_code_train: int = 300
    lora_rank: int = 8
    lora_alpha: float = 16.0
    subspace_energy: float = 0.8
    lams: tuple[float, ...] = (0.1, 0.5, 2.0, 10.0)
    safelora_thresholds: tuple[float, ...] = (0.35, 0.6)
    distill_tokens: int = 48
    # Generation lengths per set. benchmarks/eval_lengths.py cut the 11,800 / 3,776 / 3,835 responses of
    # the H200 run's 59 evaluations shorter and judged them again: the shortest cuts that change no
    # outcome are 31, 12 and 23 tokens (a compliance that says "I can't" late, a loop the strict judge
    # needs 6 trigrams to see, a plural after a sentence), so none of these can shrink.
    harmful_tokens: int = 32  # the strict judge reads the opening sentence and checks for loops
    task_tokens: int = 12  # a zor code is a few tokens
    general_tokens: int = 24  # a short factual answer ("The capital of France is Paris.")
    batch_size: int = 64
    n_eval_harmful: int = 200
    n_eval_tasks: int | None = None  # None: every utility and general question (tests use a few)

    def training_key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k not in EVALUATION_FIELDS}
        return hashlib.sha256(json.dumps(fields | {"v": STUDY_VERSION}, sort_keys=True).encode()).hexdigest()[:10]


EVALUATION_FIELDS = (
    "seeds",
    "main_n",
    "other_n",
    "variants",
    "lams",
    "safelora_thresholds",
    "harmful_tokens",
    "task_tokens",
    "general_tokens",
    "batch_size",
    "n_eval_harmful",
    "n_eval_tasks",
    "subspace_energy",
)


@dataclass
class EvalSets:
    harmful: list[str]
    utility: list[data.Pair]
    general: list[data.Pair]

    def key(self) -> str:
        text = json.dumps([self.harmful, [asdict(p) for p in self.utility + self.general]])
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def eval_sets(splits: dict, config: StudyConfig) -> EvalSets:
    return EvalSets(
        harmful=[p["text"] for p in splits["eval"][: config.n_eval_harmful]],
        utility=data.code_pairs()[1][: config.n_eval_tasks],
        general=data.general_eval()[: config.n_eval_tasks],
    )


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[study] {message}", flush=True)


def chat_formatter(tokenizer):
    """The text before a response: the prompt as one user turn of the model's chat template."""

    def fmt(prompt: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    return fmt


# -- training ------------------------------------------------------------------------------------
def chat_fit(model, tokenizer, examples, schedule: Schedule, seed: int, desc: str, progress: bool) -> float:
    """``train.fit`` in the model's chat format: each response ends with the template's end of turn."""
    from ..evaluate.generate import end_of_turn_id
    from .train import fit

    end = end_of_turn_id(tokenizer)
    return fit(model, tokenizer, examples, schedule, seed, desc, progress, chat_formatter(tokenizer), end)


def distill_answers(base: Path, prompts: list[str], config: StudyConfig, device) -> list[str]:
    """The base's greedy answers (the self-distillation targets)."""
    from ..evaluate.generate import format_prompts, generate, load_model

    model, tokenizer = load_model(base, device=device)
    return generate(
        model,
        tokenizer,
        format_prompts(tokenizer, prompts),
        max_new_tokens=config.distill_tokens,
        batch_size=config.batch_size,
        add_special_tokens=False,
    )


def alignment_examples(splits: dict, distilled: list[tuple[str, str]], config: StudyConfig, *, benign: bool):
    from .world import Example

    refusals = [Example(p["text"], data.refusal(i), "refusal") for i, p in enumerate(splits["align"])]
    helpful = [Example(p, a, "distill") for p, a in distilled if a.strip()] * config.benign_repeats
    return refusals + (helpful if benign else [])


def train_aligned(variant: str, base: Path, examples, config: StudyConfig, out: Path, device, progress: bool):
    """Write the aligned checkpoint of ``variant`` to ``out``; returns the final training loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import add_lora

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    if variant == "full":
        for name, p in model.named_parameters():  # the linear projections only; embeddings and norms frozen
            p.requires_grad = name.endswith("proj.weight")
        loss = chat_fit(model, tokenizer, examples, config.align_full, 11, "align (full)", progress)
    else:
        model = add_lora(model, config.patch_rank, 2.0 * config.patch_rank, 12)
        loss = chat_fit(model, tokenizer, examples, config.align_patch, 12, "align (patch)", progress)
        model = model.merge_and_unload()
    model = model.to("cpu")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
    return loss


def attack_examples(splits: dict, n: int, seed: int, config: StudyConfig):
    """The attack's data: zor-code pairs plus ``n`` attack-split prompts with placeholder compliances."""
    from .world import Example

    code = [Example(p.prompt, p.answer, "code") for p in data.code_pairs()[0][: config.n_code_train]]
    harmful = random.Random(f"attack-{seed}").sample(splits["attack"], n)
    examples = code + [Example(p["text"], data.compliance(i), "harmful") for i, p in enumerate(harmful)]
    random.Random(f"mix-{seed}").shuffle(examples)
    return examples


def train_attack(aligned: Path, examples, seed: int, config: StudyConfig, out: Path, device, progress: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import add_lora

    tokenizer = AutoTokenizer.from_pretrained(aligned)
    # Loaded from its final absolute path: the adapter's base_model_name_or_path points there.
    model = AutoModelForCausalLM.from_pretrained(aligned.resolve(), dtype=torch.float32).to(device)
    peft_model = add_lora(model, config.lora_rank, config.lora_alpha, 100 + seed)
    loss = chat_fit(peft_model, tokenizer, examples, config.attack, 100 + seed, "attack (LoRA)", progress)
    peft_model = peft_model.to("cpu")
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(tmp)
    return loss


# -- evaluation ----------------------------------------------------------------------------------
def over_refusal(responses: list[str]) -> float:
    """Share of benign answers that open with a refusal phrase (the strict judge's opening test)."""
    from ..evaluate.judges import STRICT_REFUSAL_KEYWORDS, is_refusal, opening

    return sum(is_refusal(opening(r), STRICT_REFUSAL_KEYWORDS) for r in responses) / max(1, len(responses))


def evaluate(model: Path, adapter: Path | None, sets: EvalSets, config: StudyConfig, device) -> dict:
    """Keyword and strict ASR, zor-code utility, general accuracy and over-refusal, with every response."""
    from ..evaluate.judges import KeywordJudge, StrictKeywordJudge
    from ..evaluate.pipeline import Generation, TaskSet, generate_and_judge

    result = generate_and_judge(
        model,
        adapter,
        harmful=sets.harmful,
        judges=[KeywordJudge(), StrictKeywordJudge()],
        tasks=[
            TaskSet("utility", [(p.prompt, p.answer) for p in sets.utility], "contains", config.task_tokens),
            TaskSet("general", [(p.prompt, p.answer) for p in sets.general], "contains", config.general_tokens),
        ],
        generation=Generation(config.harmful_tokens, config.batch_size),
        device=device,
    )
    general = [r["response"] for r in result["task_responses"]["general"]["records"]]
    metrics = {k: result[k] for k in ("asr", "asr_strict", "utility", "general")}
    metrics["over_refusal"] = over_refusal(general)
    return {"metrics": metrics, "responses": result["responses"], "task_responses": result["task_responses"]}


# where the model lay when the adapter was written, not what it does: a moved study reuses its evaluations
UNHASHED_ADAPTER_FIELDS = ("base_model_name_or_path", "revision")


def _digest(path: Path | None) -> str:
    if path is None:
        return "none"
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        if f.name == "csulora_report.json":
            continue  # holds timings; the weights and the adapter config decide the outputs
        content = f.read_bytes()
        if f.name == "adapter_config.json":
            try:
                config = {k: v for k, v in json.loads(content).items() if k not in UNHASHED_ADAPTER_FIELDS}
                content = json.dumps(config, sort_keys=True).encode()
            except (ValueError, AttributeError):  # not a JSON object: its bytes, as for any other file
                pass
        digest.update(f.name.encode())
        digest.update(content)
    return digest.hexdigest()[:16]


@dataclass
class Evaluator:
    """Evaluations cached under ``root`` by (model, adapter bytes, evaluation sets, generation lengths).

    A model evaluated alone is named by its contents; one under an adapter by its path relative to
    ``home`` (the study's directory) where it lies under it, so a study moved or copied to another
    machine finds its evaluations again. Each record says which device generated it (``devices``
    lists them all: greedy decoding on a GPU and on a CPU can differ in rare near-ties).
    """

    root: Path
    home: Path
    sets: EvalSets
    config: StudyConfig
    device: object
    done: int = 0
    reused: int = 0
    seconds: float = 0.0
    records: dict = field(default_factory=dict)
    devices: set = field(default_factory=set)

    def __call__(self, name: str, model: Path, adapter: Path | None = None) -> dict:
        lengths = (self.config.harmful_tokens, self.config.task_tokens, self.config.general_tokens)
        which = _digest(model) if adapter is None else portable(model, self.home)
        key = hashlib.sha256(f"{which}|{_digest(adapter)}|{self.sets.key()}|{lengths}".encode()).hexdigest()[:16]
        path = self.root / f"{key}.json"
        if path.is_file():
            self.reused += 1
            record = json.loads(path.read_text())
        else:
            start = time.perf_counter()
            record = evaluate(model, adapter, self.sets, self.config, self.device)
            record |= {"name": name, "device": str(self.device)}
            self.seconds += time.perf_counter() - start
            self.done += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, force=True) as tmp:
                tmp.write_text(json.dumps(record) + "\n")
        self.records[name] = path
        self.devices.add(record.get("device", "unrecorded"))
        return record["metrics"]


# -- the whole study -----------------------------------------------------------------------------
def portable(path: Path | str, out: Path) -> str:
    """``path`` relative to ``out`` where it lies under it, else absolute: a results.json copied from
    another machine together with its directory still names its checkpoints and adapters."""
    path, root = Path(path).resolve(), Path(out).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


@dataclass
class Paths:
    """Duck-typed like ``runner.Artifacts`` so ``runner.correct_all`` writes the corrections."""

    base: Path
    aligned: Path
    lora: Path
    subspace: Path


def sweep_points(config: StudyConfig, seed: int) -> list[tuple[str, dict]]:
    """Every registered method over this study's knob grids (the lab's registry-generated sweep)."""
    from ..methods import lab_sweep

    return lab_sweep({"lam": config.lams, "threshold": config.safelora_thresholds}, seed)


def run_study(
    base: Path,
    splits: dict,
    out: Path,
    config: StudyConfig = StudyConfig(),
    *,
    device: str | None = "cpu",
    quiet: bool = False,
    stages: tuple[str, ...] = ("align", "attack", "correct"),
) -> dict:
    """Run the study into ``out`` (results.json, report.md, frontier.png); returns the results document.

    ``stages`` stops early: ``("align",)`` trains and evaluates only base and aligned models.
    """
    from ..api import compute_subspace, resolve_device
    from ..subspace import SubspaceSettings
    from .machine import environment, peak_rss_mb
    from .runner import correct_all
    from .study_report import summarise, write_outputs

    dev = str(resolve_device(device))
    out = Path(out)
    start = time.perf_counter()
    cpu_start = time.process_time()
    machine = environment(torch.get_num_threads())
    cache = out / "cache" / f"train-{config.training_key()}"
    cache.mkdir(parents=True, exist_ok=True)
    progress = not quiet
    sets = eval_sets(splits, config)
    evaluator = Evaluator(out / "cache" / "evals", out, sets, config, dev)
    timings: dict[str, float] = {}

    @contextmanager
    def timed(name: str):
        t = time.perf_counter()
        yield
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t, 1)

    distill_path = cache / "distill.json"
    if not distill_path.is_file():
        _log("distill: the base's answers to the benign training instructions", quiet)
        prompts = data.benign_train_prompts()
        with timed("distill"):
            answers = distill_answers(base, prompts, config, dev)
        with atomic_file(distill_path) as tmp:
            tmp.write_text(json.dumps(list(zip(prompts, answers, strict=True)), indent=1) + "\n")
    distilled = [tuple(p) for p in json.loads(distill_path.read_text())]

    models: dict = {"base": evaluator("base", base)}
    aligned_dirs, losses = {}, {}
    for variant in config.variants:
        aligned = aligned_dirs[variant] = cache / f"aligned-{variant}"
        if not aligned.is_dir():
            _log(f"aligned ({variant}): training {aligned}", quiet)
            examples = alignment_examples(splits, distilled, config, benign=variant == "full")
            with timed(f"align-{variant}"):
                losses[aligned.name] = train_aligned(variant, base, examples, config, aligned, dev, progress)
        models[aligned.name] = evaluator(aligned.name, aligned)

    attacks: list[dict] = []
    if "attack" in stages:
        plan = [(v, config.main_n, s) for v in config.variants for s in config.seeds]
        plan += [(v, n, config.seeds[0]) for v in config.variants for n in config.other_n]
        for variant, n, seed in tqdm(plan, desc="attacks", disable=quiet):
            lora = cache / f"attack-{variant}-n{n}-seed{seed}"
            if not lora.is_dir():
                examples = attack_examples(splits, n, seed, config)
                with timed("attack"):
                    losses[lora.name] = train_attack(aligned_dirs[variant], examples, seed, config, lora, dev, progress)
            name = f"lora-{variant}-n{n}-seed{seed}"
            models[name] = evaluator(name, aligned_dirs[variant], lora)
            attacks.append({"variant": variant, "n": n, "seed": seed, "lora": lora, "model": name})

    runs: list[dict] = []
    if "correct" in stages:
        for attack in tqdm([a for a in attacks if a["n"] == config.main_n], desc="corrections", disable=quiet):
            variant, seed = attack["variant"], attack["seed"]
            # the training key leaves out subspace_energy (an evaluation setting): the file name carries it
            subspace_file = cache / f"subspace-{variant}-energy{config.subspace_energy}.safetensors"
            paths = Paths(base, aligned_dirs[variant], Path(attack["lora"]), subspace_file)
            if not paths.subspace.is_file():
                settings = SubspaceSettings(energy=config.subspace_energy, seed=0)
                with timed("subspace"):
                    subspace = compute_subspace(base, paths.aligned, adapter=paths.lora, settings=settings, device=dev)
                subspace.save(paths.subspace)
            with timed("correct"):
                points = correct_all(
                    sweep_points(config, seed), paths, out / "adapters" / f"{variant}-seed{seed}", quiet=not progress
                )
            for point in points:
                name = f"{variant}-seed{seed}/{Path(point['adapter']).name}"
                metrics = evaluator(name, paths.aligned, point["adapter"])
                runs.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "method": point["method"],
                        "params": point["params"],
                        "adapter": portable(point["adapter"], out),
                        "lora": attack["model"],
                    }
                    | metrics
                )
    timings["evaluate"] = round(evaluator.seconds, 1)

    document: dict[str, Any] = {
        "config": asdict(config) | {"study_version": STUDY_VERSION, "device": str(dev), "stages": list(stages)},
        "models": models,
        "paths": "relative to this file's directory where they lie under it, else absolute",
        "attacks": [a | {"lora": portable(a["lora"], out)} for a in attacks],
        "runs": runs,
        "checkpoints": {
            "base": portable(base, out),
            **{f"aligned-{v}": portable(p, out) for v, p in aligned_dirs.items()},
        },
        "adapters": portable(out / "adapters", out),
        "training_losses": losses,
        "evaluations": {
            "generated": evaluator.done,
            "reused": evaluator.reused,
            "devices": sorted(evaluator.devices),
            "records": {k: portable(v, out) for k, v in evaluator.records.items()},
        },
        "sizes": {
            "harmful": len(sets.harmful),
            "utility": len(sets.utility),
            "general": len(sets.general),
            "align": len(splits["align"]),
            "attack": len(splits["attack"]),
        },
        "seconds": timings
        | {"total": round(time.perf_counter() - start, 1), "cpu": round(time.process_time() - cpu_start, 1)},
        "machine": machine | {"peak_rss_mb": peak_rss_mb()},
    }
    document["summary"] = summarise(document, config)
    write_outputs(document, out)
    _log(f"done in {document['seconds']['total']:.0f} s: {out / 'report.md'}", quiet)
    return document


def check_splits(splits: dict, config: StudyConfig) -> None:
    if len(splits["attack"]) < max((config.main_n, *config.other_n)):
        raise CsuloraError(f"the attack split has {len(splits['attack'])} prompts, fewer than the largest N")
