"""Inspecting an adapter: its per-module decomposition and signed overlap with V, as a table and a plot."""

from __future__ import annotations

from pathlib import Path

from .adapter import Adapter, load_adapter
from .correct import SignedOverlap, combined_overlap, decompose, signed_overlap
from .safe_output import Output, ReservedOutput, atomic_file
from .sources import AdapterSubspace, BasisSource
from .subspace_stream import warn_unaligned
from .threads import torch_threads

__all__ = [
    "adapter_figures",
    "alignment_diagnostic",
    "format_table",
    "inspect_adapter",
    "is_png",
    "plot_decomposition",
]


@torch_threads(1)
def inspect_adapter(adapter: str | Path | Adapter, source: BasisSource, *, progress: bool = False) -> list[dict]:
    """The per-module decomposition of ``adapter`` and its signed overlap with V (nothing is written).

    One row per module: ``rho_f``, ``rho_h``, ``rho_o`` and the signed figures of ``overlap_row``.
    """
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, allow_pickle=source.allow_pickle)
    bases = AdapterSubspace(adapter, source, source.open_pair(adapter), progress)
    rows = []
    for basis in bases.bases():
        lora = adapter.factors(basis.module)
        d = decompose(lora, basis.U, basis.R)
        rows.append(
            {
                "module": basis.name,
                "layer": layer_index(basis.name),
                "k": basis.k,
                "rank": lora.rank,
                "energy": d.energy,
                "rho_f": d.rho_f,
                "rho_h": d.rho_h,
                "rho_o": d.rho_o,
            }
            | overlap_row(signed_overlap(lora, basis.U, basis.R, basis.sigma, d))
        )
    warn_unaligned([str(row["module"]) for row in rows if row["k"] == 0], len(adapter.modules), bases.where)
    return rows


def overlap_row(overlap: SignedOverlap) -> dict:
    """The signed figures of one module (docs/method.md), under the names ``inspect --json`` gives them."""
    return {
        "signed_overlap": overlap.signed_overlap,
        "opposing_share": overlap.opposing_share,
        "agreeing_share": overlap.agreeing_share,
        "cross_share": overlap.cross_share,
        "rho_opposing": overlap.rho_opposing,
        "signed_share_by_direction": overlap.direction_shares(),
    }


def _row_overlap(row: dict) -> SignedOverlap:
    """A row's figures back as energies, so that modules combine (``combined_overlap``)."""
    e_f = row["rho_f"] * row["energy"]
    agree, oppose, cross = (row[key] * e_f for key in ("agreeing_share", "opposing_share", "cross_share"))
    return SignedOverlap(row["energy"], e_f, agree, oppose, cross, row["signed_overlap"])


def adapter_figures(rows: list[dict]) -> dict:
    """All modules together: rho_f, rho_h, rho_o and the signed overlap energy-weighted, the shares of
    ``e_F`` e_F-weighted (the sums of the modules' energies; docs/method.md)."""
    shares = energy_weighted_shares(rows)
    total = combined_overlap([_row_overlap(row) for row in rows])
    figures = overlap_row(total)
    del figures["signed_share_by_direction"]
    rhos = {key: share for (key, _), share in zip(PARTS, shares, strict=True)}
    return {"modules": len(rows), "energy": total.energy} | rhos | figures


def alignment_diagnostic(adapter: str | Path | Adapter, source: BasisSource, *, progress: bool = False) -> dict:
    """Where an adapter's update lies against the alignment: ``{"modules": rows, "adapter": totals}``.

    The rows of ``inspect_adapter`` and their ``adapter_figures``; what ``csulora inspect --json`` prints.
    """
    rows = inspect_adapter(adapter, source, progress=progress)
    return {"modules": rows, "adapter": adapter_figures(rows)}


def layer_index(module: str) -> int | None:
    """The first integer component of a module path (``model.layers.3.mlp.up_proj`` -> 3)."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None


PARTS = (
    ("rho_f", "fully aligned (rho_f)"),
    ("rho_h", "partially aligned (rho_h)"),
    ("rho_o", "off-subspace (rho_o)"),
)
# The signed figures, each on a scale of its own in the plot.
SIGNED = (
    ("opposing_share", "share of e_F reversing V (opposing_share)"),
    ("signed_overlap", "cosine with V_k (signed_overlap)"),
)


def energy_weighted_shares(rows: list[dict]) -> list[float]:
    """rho_f, rho_h, rho_o of all modules together: each module's shares weighted by its energy."""
    total = sum(row["energy"] for row in rows)
    return [sum(row[key] * row["energy"] for row in rows) / total if total > 0 else 0.0 for key, _ in PARTS]


def format_table(rows: list[dict]) -> str:
    """Fixed-width table of the per-module decomposition and signed overlap, plus an all-modules line.

    Energies are in scientific notation (they span orders of magnitude), shares and the signed
    overlap with three decimals; the last line is ``adapter_figures``.
    """
    width = max([len("module")] + [len(row["module"]) for row in rows])
    header = (
        f"{'module':<{width}}  {'k':>4}  {'r':>3}  {'energy':>9}  {'rho_f':>6}  {'rho_h':>6}  {'rho_o':>6}  "
        f"{'signed_overlap':>14}  {'opposing_share':>14}"
    )
    lines = [header, "-" * len(header)]

    def numbers(row: dict) -> str:
        return (
            f"{row['energy']:>9.3e}  {row['rho_f']:>6.3f}  {row['rho_h']:>6.3f}  {row['rho_o']:>6.3f}  "
            f"{row['signed_overlap']:>+14.3f}  {row['opposing_share']:>14.3f}"
        )

    for row in rows:
        lines.append(f"{row['module']:<{width}}  {row['k']:>4}  {row['rank']:>3}  {numbers(row)}")
    total = adapter_figures(rows)
    if total["energy"] > 0:
        lines.append("-" * len(header))
        lines.append(f"{'all modules (energy-weighted)':<{width}}  {'':>4}  {'':>3}  {numbers(total)}")
    return "\n".join(lines)


def is_png(path: Path) -> bool:
    """Whether ``path`` is a PNG image (the only kind of file ``--plot --force`` replaces)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def module_type(row: dict) -> str:
    """The module's name within its layer (``self_attn.q_proj``), or its full name outside layers."""
    if row["layer"] is None:
        return row["module"]
    return row["module"].split(f".{row['layer']}.", 1)[-1]


# Usual reading order of a block's projections (attention, then MLP); other types keep their order.
_TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _type_rank(module_type: str) -> int:
    last = module_type.rsplit(".", 1)[-1]
    return _TYPE_ORDER.index(last) if last in _TYPE_ORDER else len(_TYPE_ORDER)


def decomposition_grid(rows: list[dict]) -> tuple[list[str], list[str], dict[str, list[list[float | None]]]]:
    """``(row labels, column labels, {key: layer x module-type values})``; None where no module.

    The keys are the rho shares and the signed figures.

    Rows are layers in order (modules outside any layer last, one row each); columns are module
    types in their usual order (q, k, v, o, gate, up, down; others as they come), labelled by their
    last name part when that is unambiguous.
    """
    layers = sorted({row["layer"] for row in rows if row["layer"] is not None})
    outside = sorted(row["module"] for row in rows if row["layer"] is None)
    row_keys: list[int | str] = [*layers, *outside]
    ordered = sorted(rows, key=lambda row: (row["layer"] is None, row["layer"] or 0, row["module"]))
    appearance = list(dict.fromkeys(module_type(row) for row in ordered if row["layer"] is not None))
    types = sorted(appearance, key=lambda t: (_type_rank(t), appearance.index(t)))
    short = [t.rsplit(".", 1)[-1] for t in types]
    columns = short if len(set(short)) == len(short) else types
    if outside:
        columns.append("(outside layers)")
    keys = [key for key, _ in (*PARTS, *SIGNED)]
    grid: dict[str, list[list[float | None]]] = {key: [[None] * len(columns) for _ in row_keys] for key in keys}
    for row in rows:
        i = row_keys.index(row["layer"] if row["layer"] is not None else row["module"])
        j = types.index(module_type(row)) if row["layer"] is not None else len(columns) - 1
        for key in keys:
            grid[key][i][j] = row[key]
    labels = [f"layer {k}" if isinstance(k, int) else k for k in row_keys]
    return labels, columns, grid


def plot_decomposition(rows: list[dict], path: Output, *, title: str = "", force: bool = False) -> Path:
    """Layer x module-type heatmaps as a PNG: rho_f / rho_h / rho_o on one colour scale, then the
    signed figures (opposing_share on 0..1, signed_overlap on a scale symmetric about 0).

    Readable at 30+ layers: one row per layer, one column per module type; cells are annotated with
    their value while the grid is small enough for the numbers to fit.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, columns, grid = decomposition_grid(rows)
    panels = [*PARTS, *SIGNED]
    height = min(max(3.5, 0.24 * len(labels) + 1.8), 40.0)
    width = max(8.0, len(panels) * (0.4 * len(columns) + 0.7) + 2.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), sharey=True, layout="constrained")
    annotate = len(labels) * len(columns) <= 120
    images = []
    for ax, (key, name) in zip(axes, panels, strict=True):
        values = np.array([[np.nan if v is None else v for v in line] for line in grid[key]], dtype=float)
        if key == "signed_overlap":  # mostly far from +-1: a scale symmetric about 0 shows the sign
            bound = max(float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0, 1e-12)
            low, cmap = -bound, "RdBu"
        else:
            low, bound, cmap = 0.0, 1.0, "Reds" if key == "opposing_share" else "viridis"
        images.append(ax.imshow(values, vmin=low, vmax=bound, cmap=cmap, aspect="auto", interpolation="nearest"))
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) > 20 else 8)
        if annotate:
            for (i, j), v in np.ndenumerate(values):
                if not np.isnan(v):
                    # light text on the dark end of each map (viridis is dark at 0, the others at their ends)
                    dark = v < 0.5 if cmap == "viridis" else abs(v) > 0.6 * bound
                    color = "white" if dark else "black"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(images[0], ax=list(axes[: len(PARTS)]), shrink=0.8, label="share of the module's update energy")
    fig.colorbar(images[-2], ax=axes[-2], shrink=0.8, label="share of the module's e_F")
    fig.colorbar(images[-1], ax=axes[-1], shrink=0.8, label="cosine (+: along V, -: against)")
    figures = adapter_figures(rows)
    summary = ", ".join(f"{key} {figures[key]:.3f}" for key, _ in panels)
    heading = "LoRA update decomposition and signed overlap with V, by layer and module type"
    fig.suptitle(f"{heading}\n{title}\nall {len(rows)} modules, energy-weighted: {summary}", fontsize=10)
    with atomic_file(path, force=force, owned=is_png) as tmp:  # a reserved output is not checked again
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path.shown if isinstance(path, ReservedOutput) else path)
