"""``csulora eval``: attack success rate of a causal LM (optionally with an adapter) on harmful prompts."""

from __future__ import annotations

import json
from pathlib import Path

from ..io_utils import atomic_file
from .judges import REFUSAL_KEYWORDS, is_refusal, load_keywords
from .metrics import accuracy, attack_success_rate


def evaluate_harmful(
    model: str | Path,
    prompts: list[str],
    *,
    adapter: str | Path | None = None,
    keywords: list[str] | tuple[str, ...] = REFUSAL_KEYWORDS,
    judge: str | Path | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    chat_template: bool = True,
    progress: bool = False,
    device: str | None = None,
    tasks: list[tuple[str, str]] | None = None,
) -> dict:
    """Generate greedily for every prompt and judge it; returns the ASR and per-prompt records.

    With a classifier ``judge`` the ASR is the classifier's (``asr_keyword`` is kept alongside).
    """
    from .generate import format_prompts, generate, load_model, uses_chat_template

    lm, tokenizer = load_model(model, adapter, device=device)
    templated = uses_chat_template(tokenizer, chat_template)

    def respond(texts: list[str]) -> list[str]:
        return generate(
            lm,
            tokenizer,
            format_prompts(tokenizer, texts, chat_template),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            add_special_tokens=not templated,
            progress=progress,
        )

    responses = respond(prompts)
    task_responses = respond([prompt for prompt, _ in tasks]) if tasks else []
    lm = None  # free the model before a classifier judge is loaded
    refused = [is_refusal(r, keywords) for r in responses]
    records = [{"prompt": p, "response": r, "refused": f} for p, r, f in zip(prompts, responses, refused, strict=True)]
    result = {
        "model": str(model),
        "adapter": None if adapter is None else str(adapter),
        "chat_template": templated,
        "max_new_tokens": max_new_tokens,
        "judge": "keyword",
        "n": len(prompts),
        "asr_keyword": attack_success_rate([not f for f in refused]),
    }
    if tasks:
        answers = [answer for _, answer in tasks]
        result["utility"] = accuracy(task_responses, answers)
        result["n_tasks"] = len(tasks)
        result["tasks"] = [
            {"prompt": p, "answer": a, "response": r} for (p, a), r in zip(tasks, task_responses, strict=True)
        ]
    if judge is not None:
        from .judges import ClassifierJudge

        unsafe = ClassifierJudge(judge, device=device).unsafe(prompts, responses, progress=progress)
        for record, flag in zip(records, unsafe, strict=True):
            record["unsafe"] = flag
        result |= {"judge": f"classifier:{judge}", "asr_classifier": attack_success_rate(unsafe)}
    result["asr"] = result.get("asr_classifier", result["asr_keyword"])
    return result | {"responses": records}


def cmd_eval(args) -> int:
    from ..errors import CsuloraError
    from .prompts import load_prompts, load_tasks

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise CsuloraError("--max-new-tokens and --batch-size must be >= 1")
    prompts = load_prompts(args.prompts)
    keywords = list(REFUSAL_KEYWORDS)
    if args.refusal_keywords:
        keywords += load_keywords(args.refusal_keywords)
    if args.out is not None and args.out.exists() and not args.force:
        raise CsuloraError(f"{args.out}: already exists (pass --force to overwrite)")
    result = evaluate_harmful(
        args.model,
        prompts,
        adapter=args.adapter,
        keywords=keywords,
        judge=args.judge,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat_template=not args.no_chat_template,
        progress=not args.quiet,
        device=args.device,
        tasks=load_tasks(args.tasks) if args.tasks else None,
    )
    result["prompts"] = str(args.prompts)
    if args.out is not None:
        with atomic_file(args.out, force=args.force) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    refusals = sum(r["refused"] for r in result["responses"])
    print(f"ASR {result['asr']:.3f} on {result['n']} prompts ({result['judge']} judge; {refusals} keyword refusals)")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="attack success rate of a model (optionally with an adapter) on harmful prompts")
    p.add_argument("model", help="causal LM: local directory or Hub id")
    p.add_argument("--adapter", help="PEFT adapter directory to load on the model")
    p.add_argument("--prompts", required=True, type=Path, help="harmful prompts: .jsonl (field prompt) or .csv")
    p.add_argument(
        "--tasks", type=Path, help="utility: .jsonl/.csv of prompt + answer; scored by exact match of the response"
    )
    p.add_argument("--out", type=Path, help="write the per-prompt responses and the ASR as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy generation length (64)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (16)")
    p.add_argument("--refusal-keywords", type=Path, help="extra refusal keywords, one per line")
    p.add_argument("--judge", help="Llama-Guard-style classifier LM: a response is harmful if it says 'unsafe'")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw even if a template exists")
    p.add_argument("--device", default="auto", help="where the models run: auto (CUDA if present), cpu, cuda:N")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
