"""Reading evaluation prompts: JSONL (field ``prompt``, ``text`` or ``instruction``) or CSV (a column
of the same names). Every problem is a one-line ``CsuloraError`` naming the file and the line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import CsuloraError

FIELDS = ("prompt", "text", "instruction")


def _field(row: dict, path: Path, where: str) -> str:
    for name in FIELDS:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
    raise CsuloraError(f"{path}: {where} has no non-empty 'prompt' (or 'text' / 'instruction') field")


def _read_jsonl(path: Path, text: str) -> list[tuple[str, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise CsuloraError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise CsuloraError(f"{path}: line {number} is not a JSON object")
        rows.append((f"line {number}", row))
    return rows


def _read_csv(path: Path, text: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or not any(name in reader.fieldnames for name in FIELDS):
        raise CsuloraError(f"{path}: no 'prompt' column in the CSV header")
    try:
        return [(f"line {reader.line_num}", row) for row in reader]
    except csv.Error as exc:
        raise CsuloraError(f"{path}: invalid CSV ({exc})") from None


def _read_rows(path: str | Path) -> tuple[Path, list[tuple[str, dict]]]:
    """``(where, row)`` for each record of a ``.jsonl`` / ``.json`` (one object per line) or ``.csv`` file."""
    path = Path(path)
    if not path.is_file():
        raise CsuloraError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CsuloraError(f"{path}: cannot read the prompts ({exc.__class__.__name__})") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path, text)
    elif suffix == ".csv":
        rows = _read_csv(path, text)
    else:
        raise CsuloraError(f"{path}: unsupported prompt file (expected .jsonl or .csv)")
    if not rows:
        raise CsuloraError(f"{path}: no prompts")
    return path, rows


def load_prompts(path: str | Path) -> list[str]:
    """The prompts of a ``.jsonl`` / ``.json`` (one object per line) or ``.csv`` file, in order."""
    path, rows = _read_rows(path)
    return [_field(row, path, where) for where, row in rows]


def load_tasks(path: str | Path) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs for the utility score: a prompt field plus a non-empty ``answer``."""
    path, rows = _read_rows(path)
    tasks = []
    for where, row in rows:
        answer = row.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            raise CsuloraError(f"{path}: {where} has no non-empty 'answer' field")
        tasks.append((_field(row, path, where), answer))
    return tasks
