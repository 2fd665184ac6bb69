"""Reading evaluation prompts: JSONL (field ``prompt``, ``text`` or ``instruction``) or CSV (a column
of the same names). Every problem is a one-line ``CsuloraError`` naming the file and the line.

Each format is read by its own rules: JSONL records end at ``\\n`` only, CSV goes through the ``csv``
module (quoted newlines stay in the field), and other Unicode line breaks (U+2028, form feeds, ...)
are characters of the prompt, never record separators.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import CsuloraError

FIELDS = ("prompt", "text", "instruction")


def _text_field(row: dict, name: str, path: Path, where: str) -> str | None:
    """``row[name]`` if it is a non-empty string of valid Unicode (a JSON escape can make a lone surrogate)."""
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise CsuloraError(
            f"{path}: {where}: '{name}' holds a lone surrogate (U+{ord(bad):04X}), which is not text"
        ) from None
    return value


def _field(row: dict, path: Path, where: str) -> str:
    for name in FIELDS:
        value = _text_field(row, name, path, where)
        if value is not None:
            return value
    raise CsuloraError(f"{path}: {where} has no non-empty 'prompt' (or 'text' / 'instruction') field")


def _json_value(text: str, path: Path, where: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise CsuloraError(f"{path}: {where} is nested too deeply") from None


def _read_jsonl(path: Path, text: str) -> list[tuple[str, dict]]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # JSONL records end at "\n" only
        if not line.strip():
            continue
        try:
            row = _json_value(line, path, f"line {number}")
        except ValueError:
            raise CsuloraError(f"{path}: {_not_jsonl(path, text, number)}") from None
        if not isinstance(row, dict):
            raise CsuloraError(f"{path}: line {number} is not a JSON object")
        rows.append((f"line {number}", row))
    return rows


def _not_jsonl(path: Path, text: str, number: int) -> str:
    """Why line ``number`` does not parse: a whole-file JSON document (an array, say) is named as such."""
    try:
        document = _json_value(text, path, "the file")
    except ValueError:
        return f"line {number} is not valid JSON"
    kind = "an array" if isinstance(document, list) else type(document).__name__
    return f"one JSON document ({kind}) over several lines, not JSONL: write one JSON object per line"


def _read_csv(path: Path, text: str) -> list[tuple[str, dict]]:
    # newline="": the csv module sees the line endings and keeps quoted newlines inside their field
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if not reader.fieldnames or not any(name in reader.fieldnames for name in FIELDS):
            raise CsuloraError(f"{path}: no 'prompt' column in the CSV header")
        return [(f"line {reader.line_num}", row) for row in reader]
    except csv.Error as exc:
        raise CsuloraError(f"{path}: invalid CSV near line {max(reader.line_num, 1)} ({exc})") from None


def _read_rows(path: str | Path) -> tuple[Path, list[tuple[str, dict]]]:
    """``(where, row)`` for each record of a ``.jsonl`` / ``.json`` (one object per line) or ``.csv`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise CsuloraError(f"{path}: unsupported prompt file (expected .jsonl or .csv)")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CsuloraError(f"{path}: no such file") from None
    except OSError as exc:
        raise CsuloraError(f"{path}: cannot read the prompts ({exc.strerror})") from None
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end; a directory is no file
        kind = "a directory" if stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode) else "a special file"
        raise CsuloraError(f"{path}: is {kind}, not a regular file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CsuloraError(f"{path}: cannot read the prompts ({exc.__class__.__name__})") from None
    rows = _read_csv(path, text) if suffix == ".csv" else _read_jsonl(path, text)
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
        answer = _text_field(row, "answer", path, where)
        if answer is None:
            raise CsuloraError(f"{path}: {where} has no non-empty 'answer' field")
        tasks.append((_field(row, path, where), answer))
    return tasks
