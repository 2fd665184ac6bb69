"""How many new tokens each evaluation set of the smollm2 study needs (run by hand, not in CI).

Reads the study's cached evaluations (``OUT/cache/evals/*.json``: every response, per prompt), and
per set (harmful, utility, general, over_refusal) finds the shortest generation that changes no
judged outcome: each response is re-encoded with the model's tokenizer, cut to its first ``L``
tokens and judged again (harmful: keyword and strict judges; utility and general: whole-word
containment; over_refusal: the strict judge's refusal test, as the study scores it). A response's
*stable length* is the smallest ``L`` from which every longer cut up to the whole response is judged
as the whole response is; a set's is the largest over all its responses in all evaluations. Greedy
decoding makes a shorter generation a prefix of a longer one, so the cut equals what
``max_new_tokens=L`` would have generated, up to batch numerics (a row's logits may differ in the
last bits with the batch it is in) and re-encoding (decoded text re-tokenized may split differently
from the generated tokens; the study decodes without special tokens).

Responses generated before the end-of-turn fix ran on past the template's end of turn into an
invented turn, decoded without the special tokens as "...\\nuser\\n..." or glued to the answer
("zormittencareeruser\\n..."); ``--cut-run-on`` cuts each at its first role word followed by a
newline, which is where generation now stops (checked: on the base model this reproduces a
post-fix CPU run's 329 responses exactly).

    python benchmarks/eval_lengths.py OUT/cache/evals --tokenizer OUT/cache/smollm2/base --cut-run-on
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from csulora.evaluate.judges import KeywordJudge, StrictKeywordJudge
from csulora.evaluate.metrics import answer_matches
from csulora_lab.smollm2.study import refused

RUN_ON = re.compile(r"(?:user|assistant|system)+(?:\n|$)")
JUDGES = (KeywordJudge(), StrictKeywordJudge())


def cut_run_on(response: str) -> str:
    """The response up to where the model opened an invented next turn (see the module docstring)."""
    match = RUN_ON.search(response)
    return (response[: match.start()] if match else response).strip()


def outcomes(set_name: str, responses: list[str], records: list[dict]) -> list[tuple]:
    """Every judged outcome of each response, as one tuple per response."""
    if set_name == "harmful":
        prompts = [r["prompt"] for r in records]
        flags = [judge.attack_succeeded(prompts, responses) for judge in JUDGES]
        return list(zip(*flags, strict=True))
    if set_name == "over_refusal":
        return [(flag,) for flag in refused(responses)]
    return [(c,) for c in answer_matches(responses, [r["answer"] for r in records], "contains")]


def cut_judgements(tokenizer, set_name: str, records: list[dict], cut: bool) -> dict:
    """Per response its stable length and length in tokens; per cut length the outcomes it changes."""
    raw = [r["response"] for r in records]
    whole = [cut_run_on(r) for r in raw] if cut else raw
    reference = outcomes(set_name, whole, records)
    changed_by_cut = sum(a != b for a, b in zip(outcomes(set_name, raw, records), reference, strict=True))
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in whole]
    longest = max((len(i) for i in ids), default=0)
    stable = [0] * len(records)
    settled = [True] * len(records)  # every cut from here up to the whole response agrees
    changed_at = {}
    for length in range(longest, -1, -1):
        texts = [tokenizer.decode(i[:length], skip_special_tokens=True).strip() for i in ids]
        judged = outcomes(set_name, texts, records)
        changed_at[length] = sum(got != want for got, want in zip(judged, reference, strict=True))
        for row, (got, want) in enumerate(zip(judged, reference, strict=True)):
            settled[row] = settled[row] and got == want
            if settled[row]:
                stable[row] = length
    return {
        "stable": stable,
        "tokens": [len(i) for i in ids],
        "changed_by_cut": changed_by_cut,
        "changed_at": changed_at,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evals", type=Path, nargs="+", help="directories of the study's eval JSONs")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the base checkpoint (its tokenizer)")
    parser.add_argument("--cut-run-on", action="store_true", help="cut pre-fix responses at the invented turn")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    files = sorted(f for d in args.evals for f in d.glob("*.json"))
    report: dict = {"files": len(files), "sets": {}}
    per_set: dict[str, dict] = {
        s: {"stable": [], "tokens": [], "changed_by_cut": 0, "worst": [], "changed_at": Counter()}
        for s in ("harmful", "utility", "general", "over_refusal")
    }
    for f in files:
        record = json.loads(f.read_text())
        sets = {"harmful": record["responses"]} | {k: v["records"] for k, v in record["task_responses"].items()}
        for name, records in sets.items():
            got = cut_judgements(tokenizer, name, records, args.cut_run_on)
            acc = per_set[name]
            acc["stable"] += got["stable"]
            acc["tokens"] += got["tokens"]
            acc["changed_by_cut"] += got["changed_by_cut"]
            acc["changed_at"].update(got["changed_at"])
            acc["worst"] += [(s, record["name"], r["prompt"]) for s, r in zip(got["stable"], records, strict=True)]
    for name, acc in per_set.items():
        stable, tokens = acc["stable"], acc["tokens"]
        if not stable:
            continue
        counts = Counter(stable)
        at_least = {q: sum(s <= q for s in stable) / len(stable) for q in (4, 8, 12, 16, 20, 24, 32)}
        worst = sorted(acc["worst"], reverse=True)[:3]
        changed_at = {q: acc["changed_at"][q] for q in sorted(acc["changed_at"])}
        report["sets"][name] = {
            "responses": len(stable),
            "stable_length_max": max(stable),
            "stable_length_p99": sorted(stable)[int(0.99 * (len(stable) - 1))],
            "shortest_changing_nothing": min(q for q, n in changed_at.items() if n == 0),
            "outcomes_changed_at": changed_at,
            "share_settled_by": at_least,
            "response_tokens_max": max(tokens),
            "response_tokens_mean": round(sum(tokens) / len(tokens), 1),
            "outcomes_changed_by_run_on_cut": acc["changed_by_cut"],
            "stable_length_histogram": dict(sorted(counts.items())),
            "worst": [{"stable": s, "model": m, "prompt": p} for s, m, p in worst],
        }
        r = report["sets"][name]
        print(
            f"{name:8s} {r['responses']:6d} responses  stable length max {r['stable_length_max']:3d}  "
            f"p99 {r['stable_length_p99']:3d}  response tokens max {r['response_tokens_max']:3d} "
            f"mean {r['response_tokens_mean']:5.1f}  outcomes changed by the run-on cut {acc['changed_by_cut']}"
        )
        print(f"         shortest cut that changes no outcome: {r['shortest_changing_nothing']}")
        print("         outcomes changed by a cut to L: " + "  ".join(f"{q}: {changed_at.get(q, 0)}" for q in at_least))
        print("         settled by L: " + "  ".join(f"{q}: {v:.4f}" for q, v in at_least.items()))
        for w in r["worst"]:
            print(f"         worst: L={w['stable']} {w['model']}: {w['prompt'][:70]!r}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
