"""The corrected adapter's model card (README.md): what was corrected, how, and from which subspace.

The YAML front matter is the one PEFT's ``save_pretrained`` writes (``base_model``, ``library_name: peft``,
tags; ``huggingface_hub``'s card data, which the Hub reads), with the input card's own metadata kept and
a ``csulora`` tag added; the body says how the adapter was corrected, then gives the input's card.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import yaml
from huggingface_hub import ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from .errors import CsuloraWarning

CARD_NAME = "README.md"
PAPER = "https://arxiv.org/abs/2605.30640"


def corrected_card(
    report: Mapping[str, Any],
    *,
    base_model: str | None,
    task_type: str | None = None,
    original: str | None = None,
    subspace_file: str | None = None,
    streamed: bool = False,
    pair: tuple[str, str] | None = None,
    where: str = "the adapter",
) -> str:
    """The card of a corrected adapter, from ``correct``'s report and the input card ``original``.

    ``subspace_file``: the subspace file it was corrected with, if any; ``streamed``: the subspace was
    computed from the pair on the fly; ``pair``: the (base, aligned) sources read for a method that
    needs the full ``V``.
    """
    data, text = _split(original, where)
    if base_model:
        data.base_model = base_model
    data.library_name = "peft"
    tags = data.tags if isinstance(data.tags, list) else [data.tags] if data.tags else []
    extra = ["csulora", "lora"] + ([f"base_model:adapter:{base_model}"] if base_model else [])
    data.tags = sorted({str(tag) for tag in tags} | set(extra))
    if task_type == "CAUSAL_LM" and not data.pipeline_tag:
        data.pipeline_tag = "text-generation"  # as PEFT sets it for a causal LM
    return f"---\n{data.to_yaml()}\n---\n" + _body(report, subspace_file, streamed, pair) + _original_section(text)


def _split(original: str | None, where: str) -> tuple[ModelCardData, str]:
    """The input card's metadata and its Markdown text (a card without valid front matter is all text)."""
    if not original:
        return ModelCardData(), ""
    match = REGEX_YAML_BLOCK.search(original)
    if match is None:
        return ModelCardData(), original
    try:
        fields = yaml.safe_load(match.group(2)) or {}
        if not isinstance(fields, dict):
            raise ValueError("not a mapping")
        return ModelCardData(**fields, ignore_metadata_errors=True), original[match.end() :]
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(
            f"{where}: the model card's front matter is not valid YAML ({first}); it is kept as text",
            CsuloraWarning,
            stacklevel=3,
        )
        return ModelCardData(), original


def _value(value: Any) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value)


def _body(report: Mapping[str, Any], subspace_file: str | None, streamed: bool, pair: tuple[str, str] | None) -> str:
    method, params = report["method"], report.get("params") or {}
    settings = ", ".join(f"`{name}={_value(value)}`" for name, value in params.items()) or "none"
    modules = report.get("modules") or {}
    unchanged = report.get("unchanged_modules") or []
    before, after = report.get("energy_before") or 0.0, report.get("energy_after") or 0.0
    kept = after / before if before else 1.0
    lines = [
        "",
        "# Corrected LoRA adapter",
        "",
        f"This adapter was corrected after training by csulora {report.get('csulora_version', '')} "
        f"(Closest Safe Update LoRA, [arXiv:2605.30640]({PAPER})), which moves a LoRA update back toward the "
        "safety subspace of the aligned model it was trained on.",
        "",
        f"- **Method**: `{method}`; settings: {settings}",
        *_subspace_lines(report.get("subspace"), subspace_file, streamed, pair),
        f"- **Modules**: {len(modules)} corrected"
        + (f", {len(unchanged)} left unchanged (aligned equals base there)" if unchanged else ""),
        f"- **Energy kept**: {kept:.1%} of the update's energy (the sum over modules of `||dW*||_F^2`, "
        "against that of `||dW||_F^2`)",
        "",
        "The per-module figures (the shares `rho_f`, `rho_h`, `rho_o`, the subspace rank `k`, the ranks in and "
        "out) are in `csulora_report.json` beside this card.",
        "",
    ]
    return "\n".join(lines)


def _subspace_lines(
    subspace: Mapping[str, Any] | None, subspace_file: str | None, streamed: bool, pair: tuple[str, str] | None
) -> list[str]:
    if subspace is None:
        if pair is None:
            return ["- **Subspace**: none (this method reads none)"]
        base, aligned = pair
        return [f"- **Alignment displacement**: `V = aligned - base`, read from base `{base}` and aligned `{aligned}`"]
    if subspace_file:
        origin = f"the subspace file `{subspace_file}`"
    else:
        origin = "a subspace computed on the fly" if streamed else "a subspace given in memory (not read from a file)"
    lines = [f"- **Subspace**: {origin}, from the (base, aligned) checkpoint pair"]
    for side in ("base", "aligned"):
        entry = subspace.get(side) or {}
        digest = f" (sha256 of the weights used `{entry['sha256']}`)" if entry.get("sha256") else ""
        lines.append(f"  - {side}: `{entry.get('source', 'unknown')}`{digest}")
    settings = subspace.get("settings") or {}
    if settings:
        listed = ", ".join(f"`{name}={_value(value)}`" for name, value in settings.items())
        lines.append(f"  - settings: {listed}")
    return lines


def _original_section(text: str) -> str:
    if not text.strip():
        return "\n## Original model card\n\nThe input adapter had no model card.\n"
    return "\n## Original model card\n\n" + text.lstrip("\r\n")
