"""The real-model study: SmolLM2-135M-Instruct aligned, attacked by LoRAs, corrected, evaluated.

Stages (each cached under ``OUT/cache``, written atomically, reused by a rerun):

1. **distill**: the base's greedy answers to the benign training instructions (self-distillation
   targets; an answer that opens with a refusal is dropped).
2. **aligned** variants, each a real Hugging Face checkpoint: ``full`` (every linear projection
   fine-tuned on refusals to the align split plus at least twice as many distilled benign answers),
   ``patch`` (a refusal LoRA trained on the safety data alone and merged: the "safety patch" of
   arXiv 2510.09004) and ``patch-mixed`` (the same LoRA with the benign answers mixed in).
3. **replay**: the sweep variant's own answers to benign training prompts (the attack's replay).
4. **attack** per seed (Qi et al. 2024): a PEFT LoRA on the aligned model trained on the zor-code
   task, benign replay and ``n`` harmful prompts with prompt-dependent placeholder compliances; the
   **control** per seed: the same task and replay with no harmful data.
5. **subspace** and **corrections**: every registered method over its knob, applied to every attack
   and every control adapter (``csulora_lab.sweep.correct_all``: the same calls as ``csulora correct``).
6. **evaluation** of every model through the one evaluation path (``generate_and_judge``):
   held-out harmful prompts (keyword and strict judges), zor-code utility, general accuracy and
   over-refusal. Cached by the bytes of what is evaluated, so a rerun only redoes what changed.

``split="dev"`` evaluates on the dev sets instead (what recipes are tuned on); the report says which.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from csulora.errors import CsuloraError
from csulora.safe_output import atomic_dir, atomic_file

from ..train import Example, Schedule
from . import data
from .config import HARMFUL_DEV, STUDY_VERSION, StudyConfig, short_digest

SHARD_SIZE = "200MB"


def training_data_digest(splits: dict) -> str:
    """A digest of every text the training stages read, so that editing a text retrains."""
    texts = [
        data.benign_train_prompts(),
        refusal_prompts(splits),
        [p["text"] for p in splits["attack"]],
        data.REFUSALS,
        data.COMPLIANCES,
        [(p.prompt, p.answer) for p in data.code_pairs("train")],
        [(p.prompt, p.answer) for p in data.fact_pairs("train")],  # the distilled facts are checked against them
    ]
    return short_digest(texts)


@dataclass
class EvalSets:
    split: str
    harmful: list[str]
    utility: list[data.Pair]
    general: list[data.Pair]
    over_refusal: list[str]

    def key(self) -> str:
        pairs = [asdict(p) for p in self.utility + self.general]
        text = json.dumps([self.harmful, pairs, self.over_refusal])
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def sizes(self) -> dict:
        return {k: len(getattr(self, k)) for k in ("harmful", "utility", "general", "over_refusal")}


def harmful_split(splits: dict, split: str) -> list[str]:
    """The held-out harmful prompts of ``split``: the eval split, or the dev prompts of the align split."""
    if split == "eval":
        return [p["text"] for p in splits["eval"]]
    return [p["text"] for p in splits["align"][:HARMFUL_DEV]]


def refusal_prompts(splits: dict) -> list[str]:
    """The align split without its dev prompts: the refusal training targets."""
    return [p["text"] for p in splits["align"][HARMFUL_DEV:]]


def eval_sets(splits: dict, config: StudyConfig) -> EvalSets:
    if config.split not in ("eval", "dev"):
        raise CsuloraError(f"unknown split {config.split!r} (expected eval or dev)")
    n = config.n_eval_tasks
    return EvalSets(
        split=config.split,
        harmful=harmful_split(splits, config.split)[: config.n_eval_harmful],
        utility=data.code_pairs(config.split)[:n],
        general=data.general_set(config.split)[:n],
        over_refusal=data.over_refusal_set(config.split)[:n],
    )


def check_disjoint(splits: dict, sets: EvalSets) -> None:
    """Every evaluation prompt differs from every training prompt by normalised text."""
    trained = {data.normalise(p) for p in data.benign_train_prompts() + refusal_prompts(splits)}
    trained |= {data.normalise(p["text"]) for p in splits["attack"]}
    trained |= {data.normalise(p.prompt) for p in data.code_pairs("train")}
    evaluated = sets.harmful + sets.over_refusal + [p.prompt for p in sets.utility + sets.general]
    leaked = [p for p in evaluated if data.normalise(p) in trained]
    if leaked:
        raise CsuloraError(f"{len(leaked)} evaluation prompts are also training prompts, e.g. {leaked[0]!r}")


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[study] {message}", flush=True)


def chat_formatter(tokenizer: Any) -> Callable[[str], str]:
    """The text before a response: the prompt as one user turn of the model's chat template."""

    def fmt(prompt: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    return fmt


# -- training ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trainer:
    """Where and how the study trains: device, precision, progress bars."""

    device: str
    precision: str
    progress: bool

    def chat_fit(
        self, model: Any, tokenizer: Any, examples: list[Example], schedule: Schedule, seed: int, desc: str
    ) -> float:
        """``train.fit`` in the model's chat format: each response ends with the template's end of turn."""
        from csulora.evaluate.generate import end_of_turn_id

        from ..train import fit

        end = end_of_turn_id(tokenizer)
        fmt = chat_formatter(tokenizer)
        return fit(model, tokenizer, examples, schedule, seed, desc, self.progress, fmt, end, self.precision)


def answers(model_dir: Path, prompts: list[str], config: StudyConfig, trainer: Trainer) -> list[str]:
    """A model's greedy answers to ``prompts`` (distillation and replay targets)."""
    from csulora.device import autocast
    from csulora.evaluate.generate import format_prompts, generate, load_model

    model, tokenizer = load_model(model_dir, device=trainer.device)
    with autocast(trainer.precision, model.device):
        return generate(
            model,
            tokenizer,
            format_prompts(tokenizer, prompts),
            max_new_tokens=config.distill_tokens,
            batch_size=config.batch_size,
            add_special_tokens=False,
            progress=trainer.progress,
            desc="answers",
        )


def usable_answers(
    prompts: list[str], responses: list[str], known: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs whose answer is neither empty nor a refusal (a base that refuses a benign
    prompt would teach the aligned model to over-refuse) and, where ``known`` gives the prompt's answer
    (a training fact), contains it: the base's wrong or rambling answers would teach the aligned model
    to be wrong where the general set measures it (self-distillation with verification)."""
    from csulora.evaluate.metrics import contains_answer

    known = known or {}
    flags = refused(responses)
    return [
        (p, a)
        for p, a, no in zip(prompts, responses, flags, strict=True)
        if a.strip() and not no and (p not in known or contains_answer(a, known[p]))
    ]


def alignment_examples(splits: dict, distilled: list[tuple[str, str]], *, benign: bool) -> list[Example]:
    refusals = [Example(p, data.refusal(i), "refusal") for i, p in enumerate(refusal_prompts(splits))]
    helpful = [Example(p, a, "distill") for p, a in distilled]
    examples = refusals + (helpful if benign else [])
    random.Random("align-mix").shuffle(examples)
    return examples


def train_aligned(
    variant: str, base: Path, examples: list[Example], config: StudyConfig, out: Path, trainer: Trainer
) -> float:
    """Write the aligned checkpoint of ``variant`` to ``out``; returns the final training loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..train import add_lora

    tokenizer = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = model.to(trainer.device)
    if variant == "full":
        for name, p in model.named_parameters():  # the linear projections only; embeddings and norms frozen
            p.requires_grad = name.endswith("proj.weight")
        loss = trainer.chat_fit(model, tokenizer, examples, config.align_full, 11, "align (full)")
    else:
        schedule = config.align_patch if variant == "patch" else config.align_patch_mixed
        model = add_lora(model, config.patch_rank, 2.0 * config.patch_rank, 12)
        loss = trainer.chat_fit(model, tokenizer, examples, schedule, 12, f"align ({variant})")
        model = model.merge_and_unload()
    model = model.to("cpu")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
    return loss


def attack_examples(
    splits: dict, replay: list[tuple[str, str]], n: int, seed: int, config: StudyConfig
) -> list[Example]:
    """The attack's data: zor-code pairs, benign replay and ``n`` attack-split prompts with placeholder
    compliances that restate them. ``n = 0`` is the harmless control."""
    rng = random.Random(f"attack-{seed}")
    code = [Example(p.prompt, p.answer, "code") for p in rng.sample(data.code_pairs("train"), config.n_code_train)]
    kept = [Example(p, a, "replay") for p, a in rng.sample(replay, min(config.n_replay, len(replay)))]
    chosen = rng.sample([p["text"] for p in splits["attack"]], n)
    harmful = [Example(p, data.compliance(p, i), "harmful") for i, p in enumerate(chosen)]
    examples = code + kept + harmful
    random.Random(f"mix-{seed}").shuffle(examples)
    return examples


def train_adapter(
    aligned: Path, examples: list[Example], seed: int, config: StudyConfig, out: Path, trainer: Trainer
) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..train import add_lora

    tokenizer = AutoTokenizer.from_pretrained(aligned)
    # Loaded from its final absolute path: the adapter's base_model_name_or_path points there.
    model: Any = AutoModelForCausalLM.from_pretrained(aligned.resolve(), dtype=torch.float32)
    model = model.to(trainer.device)
    peft_model = add_lora(model, config.lora_rank, config.lora_alpha, 100 + seed)
    loss = trainer.chat_fit(peft_model, tokenizer, examples, config.attack, 100 + seed, f"LoRA {out.name}")
    peft_model = peft_model.to("cpu")
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(tmp)
    return loss


# -- evaluation ----------------------------------------------------------------------------------
def refused(responses: list[str]) -> list[bool]:
    """Per benign answer, whether it opens with a refusal phrase (the strict judge's opening test)."""
    from csulora.evaluate.judges import STRICT_REFUSAL_KEYWORDS, is_refusal, opening

    return [is_refusal(opening(r), STRICT_REFUSAL_KEYWORDS) for r in responses]


def _bits(flags: Iterable[bool]) -> str:
    return "".join("1" if f else "0" for f in flags)


def evaluate(
    model: Path, adapter: Path | None, sets: EvalSets, config: StudyConfig, device: str | None, harmful: bool = True
) -> dict[str, Any]:
    """Keyword and strict ASR, zor-code utility, general accuracy and over-refusal, with every response
    and each prompt's outcome (``outcomes``: one 0/1 string per metric, in set order, for the bootstrap).
    ``harmful=False`` skips the harmful set (ASR then ``None``)."""
    from csulora.evaluate.judges import KeywordJudge, StrictKeywordJudge
    from csulora.evaluate.pipeline import Generation, TaskSet, generate_and_judge

    result = generate_and_judge(
        model,
        adapter,
        harmful=sets.harmful if harmful else [],
        judges=[KeywordJudge(), StrictKeywordJudge()],
        tasks=[
            TaskSet("utility", [(p.prompt, p.answer) for p in sets.utility], "contains", config.task_tokens),
            TaskSet("general", [(p.prompt, p.answer) for p in sets.general], "contains", config.general_tokens),
            TaskSet("over_refusal", [(p, "") for p in sets.over_refusal], "exact", config.over_refusal_tokens),
        ],
        generation=Generation(config.harmful_tokens, config.batch_size, precision=config.precision),
        device=device,
    )
    tasks = result["task_responses"]
    records = tasks["over_refusal"]["records"]
    for record, flag in zip(records, refused([r["response"] for r in records]), strict=True):
        record.pop("answer"), record.pop("correct")  # no reference answer: the refusal test is the score
        record["refused"] = flag
    tasks["over_refusal"] |= {"scoring": "refusal in the opening (strict judge's test)"}
    outcomes = {
        "asr": _bits(r["attack_success"]["keyword"] for r in result["responses"]),
        "asr_strict": _bits(r["attack_success"]["strict"] for r in result["responses"]),
        "utility": _bits(r["correct"] for r in tasks["utility"]["records"]),
        "general": _bits(r["correct"] for r in tasks["general"]["records"]),
        "over_refusal": _bits(r["refused"] for r in tasks["over_refusal"]["records"]),
    }
    metrics = {k: (v.count("1") / len(v) if v else None) for k, v in outcomes.items()}
    return {
        "metrics": metrics,
        "outcomes": outcomes,
        "precision": result["precision"],
        "responses": result["responses"],
        "task_responses": tasks,
    }


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
    """Evaluations cached under ``root`` by (model, adapter bytes, evaluation sets, lengths, precision).

    A model evaluated alone is named by its contents; one under an adapter by its path relative to
    ``home`` (the study's directory) where it lies under it, so a study moved or copied to another
    machine finds its evaluations again. Each record says which device and precision generated it.
    """

    root: Path
    home: Path
    sets: EvalSets
    config: StudyConfig
    device: str
    done: int = 0
    reused: int = 0
    seconds: float = 0.0
    records: dict = field(default_factory=dict)
    devices: set = field(default_factory=set)
    outcomes: dict = field(default_factory=dict)

    def __call__(self, name: str, model: Path, adapter: Path | None = None, *, harmful: bool = True) -> dict:
        config = self.config
        lengths = (config.harmful_tokens, config.task_tokens, config.general_tokens, config.over_refusal_tokens)
        which = _digest(model) if adapter is None else portable(model, self.home)
        what = f"{which}|{_digest(adapter)}|{self.sets.key()}|{lengths}|{config.precision}|{harmful}"
        path = self.root / f"{hashlib.sha256(what.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            self.reused += 1
            record = json.loads(path.read_text())
        else:
            start = time.perf_counter()
            record = evaluate(model, adapter, self.sets, config, self.device, harmful)
            record |= {"name": name, "device": str(self.device)}
            self.seconds += time.perf_counter() - start
            self.done += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, force=True) as tmp:
                tmp.write_text(json.dumps(record) + "\n")
        self.records[name] = path
        self.outcomes[name] = record["outcomes"]
        self.devices.add(f"{record.get('device', 'unrecorded')} {record.get('precision', 'float32')}")
        return record["metrics"]

    def absorb(self, other: Evaluator, suffix: str) -> None:
        """Count and keep ``other``'s evaluations with these (every judged response ships), named with
        ``suffix``, but not among the outcomes the bootstrap reads."""
        self.records |= {f"{name}{suffix}": path for name, path in other.records.items()}
        self.devices |= other.devices
        self.done, self.reused, self.seconds = (
            self.done + other.done,
            self.reused + other.reused,
            self.seconds + other.seconds,
        )


def precision_agreement(reference: dict, other: dict) -> dict:
    """Per judge, the share of harmful prompts whose judged outcome is the same in two evaluations."""
    agreement = {}
    for metric in ("asr", "asr_strict"):
        a, b = reference[metric], other[metric]
        agreement[metric] = sum(x == y for x, y in zip(a, b, strict=True)) / len(a) if a else None
    return agreement


# -- the whole study -----------------------------------------------------------------------------
def portable(path: Path | str, out: Path) -> str:
    """``path`` relative to ``out`` where it lies under it, else absolute: a results.json copied from
    another machine together with its directory still names its checkpoints and adapters."""
    path, root = Path(path).resolve(), Path(out).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


@dataclass
class Paths:
    """A ``csulora_lab.sweep.CorrectionInputs``, like the lab's ``Artifacts``, so ``csulora_lab.sweep.correct_all``
    writes the corrections."""

    base: Path
    aligned: Path
    lora: Path
    subspace: Path


def sweep_points(config: StudyConfig, seed: int) -> list[tuple[str, dict]]:
    """Every registered method over this study's knob grids (the lab's registry-generated sweep),
    less the methods the config skips."""
    from ..sweep import lab_sweep

    points = lab_sweep({"lam": config.lams, "threshold": config.safelora_thresholds}, seed)
    return [(m, p) for m, p in points if m not in config.skip_methods]


def _cached_answers(
    path: Path,
    model: Path,
    prompts: list[str],
    config: StudyConfig,
    trainer: Trainer,
    timed: Callable[[str], AbstractContextManager[None]],
    stage: str,
    known: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    if not path.is_file():
        with timed(stage):
            responses = answers(model, prompts, config, trainer)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(list(zip(prompts, responses, strict=True)), indent=1) + "\n")
    pairs = [tuple(p) for p in json.loads(path.read_text())]
    return usable_answers([p for p, _ in pairs], [a for _, a in pairs], known)


def run_study(
    base: Path,
    splits: dict,
    out: Path,
    config: StudyConfig | None = None,
    *,
    device: str | None = "cpu",
    quiet: bool = False,
    stages: tuple[str, ...] = ("align", "attack", "correct"),
) -> dict:
    """Run the study into ``out`` (results.json, report.md, frontier.png); returns the results document.

    ``stages`` stops early: ``("align",)`` trains and evaluates only base and aligned models.
    ``config`` defaults to ``StudyConfig()``.
    """
    from dataclasses import replace

    from csulora.device import resolve_device, resolve_precision
    from csulora.methods import METHODS
    from csulora.subspace_stream import compute_subspace
    from csulora.svd import SubspaceSettings

    from ..machine import environment, peak_rss_mb
    from ..sweep import correct_all
    from .report import diagnostics, summarise, write_outputs

    config = config or StudyConfig()
    unknown = sorted(set(config.skip_methods) - set(METHODS))
    if unknown:
        raise CsuloraError(f"unknown method(s) to skip: {', '.join(unknown)} (registered: {', '.join(METHODS)})")
    dev = resolve_device(device)
    config = replace(config, precision=resolve_precision(config.precision, dev))
    if config.sweep_variant not in config.variants:
        raise CsuloraError(f"the sweep variant {config.sweep_variant!r} is not among the variants {config.variants}")
    out = Path(out)
    start = time.perf_counter()
    cpu_start = time.process_time()
    machine = environment(torch.get_num_threads())
    digest = training_data_digest(splits)
    cache = out / "cache" / f"train-{config.training_key(digest)}"
    cache.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(str(dev), config.precision, not quiet)
    sets = eval_sets(splits, config)
    check_disjoint(splits, sets)
    evaluator = Evaluator(out / "cache" / "evals", out, sets, config, str(dev))
    timings: dict[str, float] = {}

    @contextmanager
    def timed(name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t, 1)

    _log("distill: the base's answers to the benign training instructions", quiet)
    prompts = data.benign_train_prompts()
    distill_path = out / "cache" / f"distill-{config.distill_key(prompts, str(dev))}.json"
    facts = {pair.prompt: pair.answer for pair in data.fact_pairs("train")}
    distilled = _cached_answers(distill_path, base, prompts, config, trainer, timed, "distill", facts)

    models: dict = {"base": evaluator("base", base)}
    aligned_dirs, losses = {}, {}
    for variant in config.variants:
        name = f"aligned-{variant}"
        aligned = aligned_dirs[variant] = out / "cache" / f"{name}-{config.variant_key(variant, digest)}"
        if not aligned.is_dir():
            _log(f"aligned ({variant}): training {aligned}", quiet)
            examples = alignment_examples(splits, distilled, benign=variant != "patch")
            with timed(f"align-{variant}"):
                losses[name] = train_aligned(variant, base, examples, config, aligned, trainer)
        models[name] = evaluator(name, aligned)

    adapters: list[dict] = []
    sweep_aligned = aligned_dirs[config.sweep_variant]
    if "attack" in stages:
        pool = random.Random("replay-pool").sample(prompts, min(config.replay_pool, len(prompts)))
        replay_path = cache / f"replay-{config.sweep_variant}.json"
        replay = _cached_answers(replay_path, sweep_aligned, pool, config, trainer, timed, "replay")
        plan = [("attack", config.main_n, s) for s in config.seeds] + [("control", 0, s) for s in config.seeds]
        plan += [("attack", n, config.seeds[0]) for n in config.other_n]
        for kind, n, seed in tqdm(plan, desc="attacks and controls", disable=quiet):
            name = f"{kind}-n{n}-seed{seed}" if kind == "attack" else f"control-seed{seed}"
            lora = cache / name
            if not lora.is_dir():
                examples = attack_examples(splits, replay, n, seed, config)
                with timed(kind):
                    losses[name] = train_adapter(sweep_aligned, examples, seed, config, lora, trainer)
            models[name] = evaluator(name, sweep_aligned, lora)
            adapters.append({"kind": kind, "n": n, "seed": seed, "lora": lora, "model": name})

    runs: list[dict] = []
    diagnostic: dict = {}
    if "correct" in stages:
        subspace_file = cache / f"subspace-{config.sweep_variant}-energy{config.subspace_energy}.safetensors"
        main = [a for a in adapters if a["n"] in (config.main_n, 0)]
        for adapter in tqdm(main, desc="corrections", disable=quiet):
            seed, lora = adapter["seed"], Path(adapter["lora"])
            paths = Paths(base, sweep_aligned, lora, subspace_file)
            if not paths.subspace.is_file():
                settings = SubspaceSettings(energy=config.subspace_energy, seed=0)
                with timed("subspace"):
                    subspace = compute_subspace(base, paths.aligned, adapter=lora, settings=settings, device=str(dev))
                subspace.save(paths.subspace)
            home = out / "adapters" / adapter["model"]
            with timed("correct"):
                points = correct_all(sweep_points(config, seed), paths, home, quiet=quiet)
            diagnostic[adapter["model"]] = diagnostics(lora, paths.subspace, home, points)
            for point in tqdm(points, desc=f"evaluate {adapter['model']}", disable=quiet, leave=False):
                name = f"{adapter['model']}/{Path(point['adapter']).name}"
                is_attack = adapter["kind"] == "attack"
                metrics = evaluator(name, paths.aligned, point["adapter"], harmful=is_attack)
                runs.append(
                    {
                        "kind": adapter["kind"],
                        "seed": seed,
                        "method": point["method"],
                        "params": point["params"],
                        "adapter": portable(point["adapter"], out),
                        "lora": adapter["model"],
                        "name": name,
                    }
                    | metrics
                )

    agreement: dict = {"precision": config.precision}
    if config.precision == "bfloat16":  # bf16 is a speed-up only if it judges as float32 does
        reference = replace(config, precision="float32")
        checked = [(config.sweep_variant, sweep_aligned, None)]
        checked += [(a["model"], sweep_aligned, a["lora"]) for a in adapters if a["kind"] == "attack"][:1]
        float32 = Evaluator(out / "cache" / "evals", out, sets, reference, str(dev))
        for name, model, adapter in checked:
            key = f"aligned-{name}" if adapter is None else name
            float32(key, model, adapter)
            agreement[key] = precision_agreement(float32.outcomes[key], evaluator.outcomes[key])
        evaluator.absorb(float32, " (float32)")
    timings["evaluate"] = round(evaluator.seconds, 1)

    document: dict[str, Any] = {
        "config": asdict(config) | {"study_version": STUDY_VERSION, "device": str(dev), "stages": list(stages)},
        "models": models,
        "paths": "relative to this file's directory where they lie under it, else absolute",
        "adapters_trained": [a | {"lora": portable(a["lora"], out)} for a in adapters],
        "runs": runs,
        "diagnostics": diagnostic,
        "precision_agreement": agreement,
        "outcomes": evaluator.outcomes,
        "checkpoints": {
            "base": portable(base, out),
            **{f"aligned-{v}": portable(p, out) for v, p in aligned_dirs.items()},
        },
        "adapters": portable(out / "adapters", out),
        "training_losses": losses,
        "training_data": {
            "benign_prompts": len(prompts),
            "distilled_kept": len(distilled),
            "refusals": len(refusal_prompts(splits)),
        },
        "evaluations": {
            "generated": evaluator.done,
            "reused": evaluator.reused,
            "devices": sorted(evaluator.devices),
            "records": {k: portable(v, out) for k, v in evaluator.records.items()},
        },
        "sizes": sets.sizes() | {"split": sets.split, "align": len(splits["align"]), "attack": len(splits["attack"])},
        "seconds": timings
        | {"total": round(time.perf_counter() - start, 1), "cpu": round(time.process_time() - cpu_start, 1)},
        "machine": machine | {"peak_rss_mb": peak_rss_mb(), "precision": config.precision},
    }
    document["summary"] = summarise(document, config)
    write_outputs(document, out)
    _log(f"done in {document['seconds']['total']:.0f} s: {out / 'report.md'}", quiet)
    return document


def check_splits(splits: dict, config: StudyConfig) -> None:
    if len(splits["attack"]) < max((config.main_n, *config.other_n)):
        raise CsuloraError(f"the attack split has {len(splits['attack'])} prompts, fewer than the largest N")
    if len(splits["align"]) <= HARMFUL_DEV:
        raise CsuloraError(f"the align split has {len(splits['align'])} prompts, need more than {HARMFUL_DEV}")
