"""The one evaluation path: load a model (and adapter), generate greedily, judge and score.

``csulora eval`` and the lab both call ``generate_and_judge``; a new judge is a class with ``name``
and ``attack_succeeded`` (see ``judges.Judge``), passed in the ``judges`` list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .judges import Judge
from .metrics import answer_matches, attack_success_rate


@dataclass(frozen=True)
class Generation:
    """How responses are generated: greedy, batched, through the chat template when there is one."""

    max_new_tokens: int = 64
    batch_size: int = 16
    chat_template: bool = True
    precision: str = "float32"  # or "bfloat16" (autocast) or "auto"; see ``device.resolve_precision``


@dataclass(frozen=True)
class TaskSet:
    """Prompts with reference answers, scored by ``exact`` match or whole-word ``contains``."""

    name: str
    items: Sequence[tuple[str, str]]
    scoring: str = "exact"
    max_new_tokens: int | None = None  # None: the generation's


def generate_and_judge(
    model: str | Path,
    adapter: str | Path | None = None,
    *,
    harmful: Sequence[str],
    judges: Sequence[Judge],
    tasks: Sequence[TaskSet] = (),
    generation: Generation = Generation(),
    device: str | None = None,
    progress: bool = False,
) -> dict:
    """Responses to ``harmful`` judged by every judge, and every task set scored.

    Returns ``asr`` (the first judge's), ``asr_<judge>`` for each judge, ``<task name>`` (the task's
    accuracy) for each task set, and the per-prompt records ``responses`` and ``task_responses``.
    """
    from ..device import autocast, resolve_precision
    from .generate import format_prompts, generate, load_model, uses_chat_template

    if not judges:
        raise ValueError("generate_and_judge needs at least one judge")
    lm, tokenizer = load_model(model, adapter, device=device)
    templated = uses_chat_template(tokenizer, generation.chat_template)
    precision = resolve_precision(generation.precision, lm.device)

    def respond(prompts: Sequence[str], max_new_tokens: int | None, desc: str) -> list[str]:
        if not prompts:
            return []
        with autocast(precision, lm.device):
            return generate(
                lm,
                tokenizer,
                format_prompts(tokenizer, list(prompts), generation.chat_template),
                max_new_tokens=max_new_tokens or generation.max_new_tokens,
                batch_size=generation.batch_size,
                add_special_tokens=not templated,  # a chat template already holds the start token
                progress=progress,
                desc=desc,
            )

    responses = respond(harmful, None, "harmful")
    task_responses = {task.name: respond([p for p, _ in task.items], task.max_new_tokens, task.name) for task in tasks}
    lm = None  # free the model before a classifier judge loads its own
    verdicts = {judge.name: judge.attack_succeeded(harmful, responses, progress=progress) for judge in judges}
    result: dict = {
        "chat_template": templated,
        "precision": precision,
        "max_new_tokens": generation.max_new_tokens,
        "judge": judges[0].name,
        "n": len(harmful),
        "asr": attack_success_rate(verdicts[judges[0].name]),
    }
    result |= {f"asr_{name}": attack_success_rate(flags) for name, flags in verdicts.items()}
    result["responses"] = [
        {"prompt": p, "response": r, "attack_success": {name: flags[i] for name, flags in verdicts.items()}}
        for i, (p, r) in enumerate(zip(harmful, responses, strict=True))
    ]
    result["task_responses"] = {}
    for task in tasks:
        answers = [a for _, a in task.items]
        correct = answer_matches(task_responses[task.name], answers, task.scoring)
        result[task.name] = sum(correct) / len(correct) if correct else 0.0
        result["task_responses"][task.name] = {
            "scoring": task.scoring,
            "n": len(correct),
            "records": [
                {"prompt": p, "answer": a, "response": r, "correct": c}
                for (p, a), r, c in zip(task.items, task_responses[task.name], correct, strict=True)
            ],
        }
    return result
