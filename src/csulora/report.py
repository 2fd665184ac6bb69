"""Inspecting an adapter: its per-module decomposition, as a text table and a plot of rho_f / rho_h / rho_o."""

from __future__ import annotations

from pathlib import Path

from .adapter import Adapter, load_adapter
from .correct import decompose
from .io_utils import atomic_file
from .sources import AdapterSubspace, open_pair
from .subspace import Subspace, SubspaceSettings
from .subspace_stream import warn_unaligned
from .threads import torch_threads

__all__ = ["format_table", "inspect_adapter", "is_png", "plot_decomposition"]


@torch_threads(1)
def inspect_adapter(
    adapter: str | Path | Adapter,
    *,
    subspace: str | Path | Subspace | None = None,
    base: str | Path | None = None,
    aligned: str | Path | None = None,
    settings: SubspaceSettings | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
    device: str | None = None,
    verify: bool = False,
) -> list[dict]:
    """The per-module decomposition of ``adapter`` (nothing is written): one row per module."""
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, allow_pickle=allow_pickle)
    pair = open_pair(adapter, base, aligned, allow_pickle, verify=verify)
    source = AdapterSubspace(adapter, subspace, pair, aligned, settings, progress, device, verify)
    rows = []
    for basis in source.bases():
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
        )
    warn_unaligned([str(row["module"]) for row in rows if row["k"] == 0], len(adapter.modules), source.where)
    return rows


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


def energy_weighted_shares(rows: list[dict]) -> list[float]:
    """rho_f, rho_h, rho_o of all modules together: each module's shares weighted by its energy."""
    total = sum(row["energy"] for row in rows)
    return [sum(row[key] * row["energy"] for row in rows) / total if total > 0 else 0.0 for key, _ in PARTS]


def format_table(rows: list[dict]) -> str:
    """Fixed-width table of the per-module decomposition, plus an energy-weighted total line.

    Energies are in scientific notation (they span orders of magnitude), shares with three decimals.
    """
    width = max([len("module")] + [len(row["module"]) for row in rows])
    header = f"{'module':<{width}}  {'k':>4}  {'r':>3}  {'energy':>9}  {'rho_f':>6}  {'rho_h':>6}  {'rho_o':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['module']:<{width}}  {row['k']:>4}  {row['rank']:>3}  {row['energy']:>9.3e}  "
            f"{row['rho_f']:>6.3f}  {row['rho_h']:>6.3f}  {row['rho_o']:>6.3f}"
        )
    total = sum(row["energy"] for row in rows)
    if total > 0:
        shares = energy_weighted_shares(rows)
        lines.append("-" * len(header))
        lines.append(
            f"{'all modules (energy-weighted)':<{width}}  {'':>4}  {'':>3}  {total:>9.3e}  "
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
    """``(row labels, column labels, {rho key: layer x module-type values})``; None where no module.

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
    grid: dict[str, list[list[float | None]]] = {key: [[None] * len(columns) for _ in row_keys] for key, _ in PARTS}
    for row in rows:
        i = row_keys.index(row["layer"] if row["layer"] is not None else row["module"])
        j = types.index(module_type(row)) if row["layer"] is not None else len(columns) - 1
        for key, _ in PARTS:
            grid[key][i][j] = row[key]
    labels = [f"layer {k}" if isinstance(k, int) else k for k in row_keys]
    return labels, columns, grid


def plot_decomposition(rows: list[dict], path: str | Path, *, title: str = "", force: bool = False) -> Path:
    """Three layer x module-type heatmaps (rho_f, rho_h, rho_o) on one colour scale, as a PNG.

    Readable at 30+ layers: one row per layer, one column per module type; cells are annotated with
    their value while the grid is small enough for the numbers to fit.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, columns, grid = decomposition_grid(rows)
    height = min(max(3.5, 0.24 * len(labels) + 1.8), 40.0)
    width = max(8.0, 3 * (0.45 * len(columns) + 0.8) + 1.5)
    fig, axes = plt.subplots(1, 3, figsize=(width, height), sharey=True, layout="constrained")
    annotate = len(labels) * len(columns) <= 120
    images = []
    for ax, (key, name) in zip(axes, PARTS, strict=True):
        values = np.array([[np.nan if v is None else v for v in line] for line in grid[key]], dtype=float)
        images.append(ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest"))
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) > 20 else 8)
        if annotate:
            for (i, j), v in np.ndenumerate(values):
                if not np.isnan(v):
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.5 else "black"
                    )
    fig.colorbar(images[0], ax=list(axes), shrink=0.8, label="share of the module's update energy")
    shares = energy_weighted_shares(rows)
    summary = ", ".join(f"{key} {share:.3f}" for (key, _), share in zip(PARTS, shares, strict=True))
    heading = "LoRA update decomposition by layer and module type"
    fig.suptitle(f"{heading}\n{title}\nall {len(rows)} modules, energy-weighted: {summary}", fontsize=10)
    path = Path(path)
    with atomic_file(path, force=force, owned=is_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
