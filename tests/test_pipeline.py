"""The correction pipeline returns typed per-module results and writes nothing; the subspace it streams
records the same provenance as ``compute_subspace``, derived from the modules it used."""

from __future__ import annotations

import torch

from csulora import compute_subspace
from csulora.adapter import load_adapter
from csulora.correct import csulora_update
from csulora.methods import get_method
from csulora.pair import open_pair
from csulora.pipeline import Correction, ModuleResult, run_correction
from csulora.sources import AdapterSubspace, BasisSource


def test_run_correction_returns_one_typed_result_per_module_and_writes_nothing(tmp_path, llama_pair, llama_adapter):
    base, aligned = llama_pair
    adapter = load_adapter(llama_adapter)
    spec = get_method("csulora")
    settings = spec.settings_from({"lam": 2.0})
    pair = open_pair(adapter, base, aligned, allow_pickle=False)
    bases = AdapterSubspace(adapter, BasisSource(base=base, aligned=aligned), pair)
    before = sorted(p.name for p in tmp_path.iterdir())
    correction = run_correction(adapter, spec, settings, bases=bases, pair=pair)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert isinstance(correction, Correction) and correction.method == "csulora"
    assert [r.module for r in correction.modules] == adapter.modules
    assert all(isinstance(r, ModuleResult) and not r.unchanged for r in correction.modules)

    # each result is the method applied to that module's streamed basis
    reference = compute_subspace(base, aligned, adapter=adapter)
    for result in correction.modules:
        basis = reference[result.name]
        expected = csulora_update(adapter.factors(result.module), basis.U.double(), basis.R.double(), 2.0)
        assert result.k == basis.k and result.rank_in == adapter.rank(result.module)
        got, want = result.corrected.lora.dense().double(), expected.lora.dense()
        assert torch.linalg.matrix_norm(got - want) <= 1e-5 * torch.linalg.matrix_norm(want)
        assert result.corrected.info["kappa_h"] == expected.info["kappa_h"]

    # provenance: the pair's chained digests, as compute_subspace records them
    assert correction.subspace == reference.metadata
    report = correction.report(adapter)
    assert report["subspace"] == reference.metadata and report["params"] == {"lam": 2.0, "rank_mode": "exact"}
    assert list(report["modules"]) == [r.name for r in correction.modules]


def test_a_method_that_reads_no_subspace_records_none(llama_pair, llama_adapter):
    adapter = load_adapter(llama_adapter)
    spec = get_method("scale")
    correction = run_correction(adapter, spec, spec.settings_from({"factor": 0.5}))
    assert correction.subspace is None
    assert all(r.k is None and r.corrected.info["factor"] == 0.5 for r in correction.modules)
    for result in correction.modules:
        original = adapter.factors(result.module)
        assert torch.allclose(result.corrected.lora.B.double(), 0.5 * original.B, rtol=1e-6)
