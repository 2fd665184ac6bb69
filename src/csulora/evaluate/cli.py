"""``csulora eval``: attack success rate of a causal LM (optionally with an adapter) on harmful prompts."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from ..safe_output import ReservedOutput, atomic_file, reserve_output
from .judges import JUDGES, build_judge, load_keywords
from .metrics import SCORINGS


def is_eval_result(path: Path) -> bool:
    """Whether ``path`` holds a ``csulora eval --out`` result (the only file ``--force`` replaces)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(result, dict) and "asr" in result and "responses" in result


def quiet_libraries() -> None:
    """``-q``: no progress bars from transformers ("Loading weights") or the Hub either."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def cmd_eval(args: argparse.Namespace) -> int:
    from ..errors import CsuloraError
    from ..extras import require_extra
    from .prompts import load_prompts, load_tasks

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise CsuloraError("--max-new-tokens and --batch-size must be >= 1")
    require_extra("eval", "transformers", "peft", feature="csulora eval")
    # every input file is read and checked before a model loads
    prompts = load_prompts(args.prompts)
    tasks = load_tasks(args.tasks) if args.tasks else None
    extra = load_keywords(args.refusal_keywords) if args.refusal_keywords else []
    if args.quiet:
        quiet_libraries()
    inputs = [args.model, args.adapter, args.prompts, args.tasks, args.refusal_keywords, args.classifier]
    with (
        reserve_output(args.out, force=args.force, owned=is_eval_result, inputs=inputs)
        if args.out is not None
        else contextlib.nullcontext()
    ) as reserved:
        return _run_eval(args, prompts, tasks, extra, reserved)


def _run_eval(
    args: argparse.Namespace,
    prompts: list[str],
    task_items: list[tuple[str, str]] | None,
    extra: list[str],
    reserved: ReservedOutput | None,
) -> int:
    """Generate, judge, print; the results go to ``reserved`` (``--out``, checked once before any work)."""
    from .pipeline import Generation, TaskSet, generate_and_judge

    headline = args.judge or ("classifier" if args.classifier else "keyword")
    names = [headline] + [n for n in JUDGES if n != headline and (n != "classifier" or args.classifier)]
    judges = [build_judge(n, extra_keywords=extra, classifier=args.classifier, device=args.device) for n in names]
    tasks = [TaskSet("utility", task_items, scoring=args.scoring)] if task_items is not None else []
    result = {"model": str(args.model), "adapter": None if args.adapter is None else str(args.adapter)}
    result |= generate_and_judge(
        args.model,
        args.adapter,
        harmful=prompts,
        judges=judges,
        tasks=tasks,
        generation=Generation(
            args.max_new_tokens, args.batch_size, chat_template=not args.no_chat_template, precision=args.dtype
        ),
        device=args.device,
        progress=not args.quiet,
    )
    result["prompts"] = str(args.prompts)
    if args.classifier:
        result["classifier"] = str(args.classifier)
    if reserved is not None:
        with atomic_file(reserved) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    others = ", ".join(f"{n} {result[f'asr_{n}']:.3f}" for n in names[1:])
    print(f"ASR {result['asr']:.3f} on {result['n']} prompts ({headline} judge; {others}; {result['precision']})")
    if tasks:
        print(f"utility {result['utility']:.3f} on {len(tasks[0].items)} tasks ({args.scoring})")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="attack success rate of a model (optionally with an adapter) on harmful prompts")
    p.add_argument("model", help="causal LM: local directory or Hub id")
    p.add_argument("--adapter", help="PEFT adapter directory to load on the model")
    p.add_argument("--prompts", required=True, type=Path, help="harmful prompts: .jsonl (field prompt) or .csv")
    p.add_argument("--tasks", type=Path, help="utility: .jsonl/.csv of prompt + answer")
    p.add_argument(
        "--scoring",
        choices=list(SCORINGS),
        default="contains",
        help="how --tasks answers are scored: contains (default; the answer as whole words in the response, "
        "case and punctuation ignored) or exact (the whole response)",
    )
    p.add_argument("--out", type=Path, help="write the per-prompt responses and the ASR as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy generation length (64)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (16)")
    p.add_argument(
        "--judge",
        choices=JUDGES,
        help="the judge whose ASR is the headline: keyword (default), strict, or classifier (the default "
        "with --classifier); the ASR of every other available judge is reported too",
    )
    p.add_argument(
        "--classifier", help="Llama-Guard-style classifier LM (directory or Hub id): harmful if it says 'unsafe'"
    )
    p.add_argument("--refusal-keywords", type=Path, help="extra refusal keywords for both keyword judges, one a line")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw even if a template exists")
    p.add_argument("--device", default="auto", help="where the models run: auto (CUDA if present), cpu, cuda:N")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),  # device.PRECISIONS, without importing torch here
        default="auto",
        help="generation precision: auto (default: bfloat16 autocast where the CPU or GPU computes it natively, "
        "float32 elsewhere), float32, or bfloat16; the result records which ran",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
