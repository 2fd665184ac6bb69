"""`csulora inspect`'s presentation: the table's number format and the layer x module-type heatmap."""

from __future__ import annotations

import pytest

from csulora.errors import CsuloraError
from csulora.inspection import (
    adapter_figures,
    decomposition_grid,
    energy_weighted_shares,
    format_table,
    plot_decomposition,
)

TYPES = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
         "self_attn.q_proj", "self_attn.v_proj"]  # fmt: skip


def signed(overlap: float, opposing: float) -> dict:
    return {"signed_overlap": overlap, "opposing_share": opposing, "agreeing_share": (1 - opposing) / 2,
            "cross_share": (1 - opposing) / 2}  # fmt: skip


def rows_for(layers: int) -> list[dict]:
    """Rows as inspect_adapter gives them (natural module order), with values that encode their cell."""
    rows = []
    for layer in range(layers):
        for j, kind in enumerate(TYPES):
            rho_f = (layer * len(TYPES) + j) / (layers * len(TYPES))
            rest = (1 - rho_f) / 2
            rows.append({"module": f"model.layers.{layer}.{kind}", "layer": layer, "k": 8, "rank": 4,
                         "energy": 10.0 ** (j - 3), "rho_f": rho_f, "rho_h": rest, "rho_o": rest}
                        | signed(rho_f - 0.5, rho_f / 2))  # fmt: skip
    rows.append({"module": "lm_head", "layer": None, "k": 8, "rank": 4, "energy": 1.0,
                 "rho_f": 0.5, "rho_h": 0.25, "rho_o": 0.25} | signed(-0.25, 0.75))  # fmt: skip
    return rows


def test_grid_is_layers_by_module_types_in_reading_order():
    rows = rows_for(30)
    labels, columns, grid = decomposition_grid(rows)
    assert labels == [f"layer {i}" for i in range(30)] + ["lm_head"]
    assert columns == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "(outside layers)"]
    for row in rows:
        i = labels.index("lm_head" if row["layer"] is None else f"layer {row['layer']}")
        j = len(columns) - 1 if row["layer"] is None else columns.index(row["module"].rsplit(".", 1)[-1])
        keys = ("rho_f", "rho_h", "rho_o", "opposing_share", "signed_overlap")
        assert [grid[key][i][j] for key in keys] == [row[key] for key in keys]
    assert grid["rho_f"][0][-1] is None  # no module outside layers in a layer's row


def test_ambiguous_short_names_keep_their_block_path():
    rows = [{"module": f"gpt_neox.layers.0.{kind}", "layer": 0, "rho_f": 0.1, "rho_h": 0.2, "rho_o": 0.7}
            | signed(0.0, 0.0) for kind in ("attention.dense", "mlp.dense")]  # fmt: skip
    assert decomposition_grid(rows)[1] == ["attention.dense", "mlp.dense"]


def test_table_uses_one_number_format_per_column():
    table = format_table(rows_for(2)).splitlines()
    energies = [line.split()[3] for line in table[2:-2]]
    assert energies[:3] == ["1.000e-03", "1.000e-02", "1.000e-01"] and all("e" in e for e in energies)
    assert table[0].split()[-2:] == ["signed_overlap", "opposing_share"]
    assert table[2].split()[-2:] == ["-0.500", "0.000"] and table[-3].split()[-2:] == ["-0.250", "0.750"]
    total = table[-1].split()
    shares = energy_weighted_shares(rows_for(2))
    assert total[-5:-2] == [f"{s:.3f}" for s in shares] and sum(shares) == pytest.approx(1.0)
    figures = adapter_figures(rows_for(2))
    assert total[-2:] == [f"{figures['signed_overlap']:+.3f}", f"{figures['opposing_share']:.3f}"]


def test_adapter_figures_weight_the_cosine_by_energy_and_the_shares_by_e_f():
    rows = [
        {"module": "a", "layer": 0, "energy": 3.0, "rho_f": 1.0, "rho_h": 0.0, "rho_o": 0.0} | signed(-1.0, 1.0),
        {"module": "b", "layer": 0, "energy": 1.0, "rho_f": 0.5, "rho_h": 0.5, "rho_o": 0.0} | signed(1.0, 0.0),
    ]
    figures = adapter_figures(rows)
    assert figures["signed_overlap"] == pytest.approx((3 * -1 + 1 * 1) / 4)
    assert figures["opposing_share"] == pytest.approx(3.0 / 3.5)  # e_oppose 3 of e_F 3 + 0.5
    assert figures["rho_opposing"] == pytest.approx(3.0 / 4)
    assert figures["rho_f"] == pytest.approx(3.5 / 4) and figures["modules"] == 2 and figures["energy"] == 4.0


def test_plot_is_titled_and_sized_for_30_layers(tmp_path):
    from PIL import Image

    path = plot_decomposition(rows_for(30), tmp_path / "p.png", title="adapter A  |  subspace S")
    width, height = Image.open(path).size
    assert height > 900 and width < 2700  # a row per layer, not one long strip of bars
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
    with pytest.raises(CsuloraError, match="already exists"):
        plot_decomposition(rows_for(2), path)
