"""Presenting decompositions: a text table and a plot of rho_f / rho_h / rho_o by layer."""

from __future__ import annotations

from pathlib import Path

from .api import inspect_adapter
from .io_utils import atomic_file

__all__ = ["format_table", "inspect_adapter", "is_png", "plot_decomposition"]


def format_table(rows: list[dict]) -> str:
    """Fixed-width table of the per-module decomposition, plus an energy-weighted total line."""
    width = max([len("module")] + [len(row["module"]) for row in rows])
    header = f"{'module':<{width}}  {'k':>4}  {'r':>3}  {'energy':>10}  {'rho_f':>6}  {'rho_h':>6}  {'rho_o':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['module']:<{width}}  {row['k']:>4}  {row['rank']:>3}  {row['energy']:>10.4g}  "
            f"{row['rho_f']:>6.3f}  {row['rho_h']:>6.3f}  {row['rho_o']:>6.3f}"
        )
    total = sum(row["energy"] for row in rows)
    if total > 0:
        shares = [sum(row[key] * row["energy"] for row in rows) / total for key in ("rho_f", "rho_h", "rho_o")]
        lines.append("-" * len(header))
        lines.append(
            f"{'all modules (energy-weighted)':<{width}}  {'':>4}  {'':>3}  {total:>10.4g}  "
            f"{shares[0]:>6.3f}  {shares[1]:>6.3f}  {shares[2]:>6.3f}"
        )
    return "\n".join(lines)


def is_png(path: Path) -> bool:
    """Whether ``path`` is a PNG image (the only kind of file ``--plot --force`` replaces)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def plot_decomposition(rows: list[dict], path: str | Path, *, force: bool = False) -> Path:
    """Stacked bars of rho_f / rho_h / rho_o per module, grouped by layer, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(rows, key=lambda row: (row["layer"] if row["layer"] is not None else -1, row["module"]))
    x = range(len(ordered))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(ordered) + 2), 4))
    bottom = [0.0] * len(ordered)
    for key, label, color in (
        ("rho_f", "fully aligned (rho_f)", "#2a9d8f"),
        ("rho_h", "partially aligned (rho_h)", "#e9c46a"),
        ("rho_o", "off-subspace (rho_o)", "#e76f51"),
    ):
        values = [row[key] for row in ordered]
        ax.bar(x, values, bottom=bottom, label=label, color=color, width=0.85)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ticks = [f"L{row['layer']}.{row['module'].split('.')[-1]}" for row in ordered]
    ax.set_xticks(list(x), ticks, rotation=90, fontsize=6)
    ax.set_ylabel("share of the update's energy")
    ax.set_ylim(0, 1)
    ax.set_title("LoRA update decomposition by module")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, force=force, owned=is_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
