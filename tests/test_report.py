"""`csulora inspect`'s presentation: the table's number format and the layer x module-type heatmap."""

from __future__ import annotations

import pytest

from csulora.errors import CsuloraError
from csulora.report import decomposition_grid, energy_weighted_shares, format_table, plot_decomposition

TYPES = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
         "self_attn.q_proj", "self_attn.v_proj"]  # fmt: skip


def rows_for(layers: int) -> list[dict]:
    """Rows as inspect_adapter gives them (natural module order), with values that encode their cell."""
    rows = []
    for layer in range(layers):
        for j, kind in enumerate(TYPES):
            rho_f = (layer * len(TYPES) + j) / (layers * len(TYPES))
            rest = (1 - rho_f) / 2
            rows.append({"module": f"model.layers.{layer}.{kind}", "layer": layer, "k": 8, "rank": 4,
                         "energy": 10.0 ** (j - 3), "rho_f": rho_f, "rho_h": rest, "rho_o": rest})  # fmt: skip
    rows.append({"module": "lm_head", "layer": None, "k": 8, "rank": 4, "energy": 1.0,
                 "rho_f": 0.5, "rho_h": 0.25, "rho_o": 0.25})  # fmt: skip
    return rows


def test_grid_is_layers_by_module_types_in_reading_order():
    rows = rows_for(30)
    labels, columns, grid = decomposition_grid(rows)
    assert labels == [f"layer {i}" for i in range(30)] + ["lm_head"]
    assert columns == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "(outside layers)"]
    for row in rows:
        i = labels.index("lm_head" if row["layer"] is None else f"layer {row['layer']}")
        j = len(columns) - 1 if row["layer"] is None else columns.index(row["module"].rsplit(".", 1)[-1])
        assert [grid[key][i][j] for key in ("rho_f", "rho_h", "rho_o")] == [row["rho_f"], row["rho_h"], row["rho_o"]]
    assert grid["rho_f"][0][-1] is None  # no module outside layers in a layer's row


def test_ambiguous_short_names_keep_their_block_path():
    rows = [{"module": f"gpt_neox.layers.0.{kind}", "layer": 0, "rho_f": 0.1, "rho_h": 0.2, "rho_o": 0.7}
            for kind in ("attention.dense", "mlp.dense")]  # fmt: skip
    assert decomposition_grid(rows)[1] == ["attention.dense", "mlp.dense"]


def test_table_uses_one_number_format_per_column():
    table = format_table(rows_for(2)).splitlines()
    energies = [line.split()[3] for line in table[2:-2]]
    assert energies[:3] == ["1.000e-03", "1.000e-02", "1.000e-01"] and all("e" in e for e in energies)
    total = table[-1].split()
    shares = energy_weighted_shares(rows_for(2))
    assert total[-3:] == [f"{s:.3f}" for s in shares] and sum(shares) == pytest.approx(1.0)


def test_plot_is_titled_and_sized_for_30_layers(tmp_path):
    from PIL import Image

    path = plot_decomposition(rows_for(30), tmp_path / "p.png", title="adapter A  |  subspace S")
    width, height = Image.open(path).size
    assert height > 900 and width < 2000  # a row per layer, not one long strip of bars
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
    with pytest.raises(CsuloraError, match="already exists"):
        plot_decomposition(rows_for(2), path)
