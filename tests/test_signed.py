"""The signed overlap with the alignment and the sign-aware correction (docs/method.md, "Sign").

Property tests of the factored forms against the dense reference, and the readings the issue asks
for: an update equal to +c V_k reads +1, -c V_k reads -1, one orthogonal to V_k reads 0, a random
one reads near 0.
"""

from __future__ import annotations

import math

import pytest
import torch
from dense_reference import (
    csulora_dense,
    csulora_signed_dense,
    orthonormal,
    parts,
    reversing_part_dense,
    signed_overlap_dense,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from csulora.correct import (
    LoraFactors,
    combined_overlap,
    csulora_signed_update,
    csulora_update,
    signed_overlap,
)
from csulora.errors import CsuloraError

RTOL = 1e-5


def rel_err(x, y) -> float:
    return float(torch.linalg.matrix_norm(x - y) / max(float(torch.linalg.matrix_norm(y)), 1e-30))


@st.composite
def problems(draw, zero_sigma: bool = True):
    """A LoRA update, a subspace and its singular values (sometimes with trailing zeros)."""
    m = draw(st.integers(3, 24))
    n = draw(st.integers(3, 24))
    r = draw(st.integers(1, min(m, n, 6)))
    k = draw(st.integers(1, min(m, n) - 1))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.5, 2.0, 16 / math.sqrt(8)]))
    g = torch.Generator().manual_seed(seed)
    U = orthonormal(m, k, g)
    R = orthonormal(n, k, g)
    sigma = torch.sort(torch.rand(k, generator=g, dtype=torch.float64) + 0.1, descending=True).values
    if zero_sigma and draw(st.booleans()):
        sigma[draw(st.integers(0, k - 1)) :] = 0.0
    # part of the update along +-V's directions, so that both signs are well represented
    mix = draw(st.sampled_from([0.0, 1.0, 3.0]))
    B = torch.randn(m, r, generator=g, dtype=torch.float64) + mix * U @ torch.randn(
        k, r, generator=g, dtype=torch.float64
    )
    A = (
        torch.randn(r, n, generator=g, dtype=torch.float64)
        + mix * torch.randn(r, k, generator=g, dtype=torch.float64) @ R.T
    )
    return LoraFactors(B, A, scale), U, R, sigma


def along_v(U, R, sigma, c: float, scale: float) -> LoraFactors:
    """``s B A = c V_k``: ``B = (c / s) U diag(sigma)``, ``A = R^T`` (rank k)."""
    return LoraFactors(U * sigma * (c / scale), R.T.contiguous(), scale)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_signed_overlap_matches_dense(problem):
    lora, U, R, sigma = problem
    got = signed_overlap(lora, U, R, sigma)
    cosine, agree, oppose, cross = signed_overlap_dense(lora.dense(), U, R, sigma)
    assert got.signed_overlap == pytest.approx(cosine, rel=RTOL, abs=1e-9)
    assert [got.agreeing_share, got.opposing_share, got.cross_share] == pytest.approx(
        [agree, oppose, cross], rel=RTOL, abs=1e-9
    )
    assert got.agreeing_share + got.opposing_share + got.cross_share == pytest.approx(1.0)
    assert -1.0 <= got.signed_overlap <= 1.0
    F, _, _ = parts(lora.dense(), U, R)
    assert got.e_f == pytest.approx(float(torch.sum(F**2)), rel=RTOL, abs=1e-12)
    assert got.rho_opposing == pytest.approx(oppose * got.e_f / got.energy, rel=RTOL, abs=1e-12)
    # the per-direction signed shares: their negative part is the opposing share
    shares = got.direction_shares()
    assert len(shares) == U.shape[1]
    assert -sum(x for x in shares if x < 0) == pytest.approx(got.opposing_share, abs=1e-5)


dims = st.tuples(st.integers(6, 30), st.integers(6, 30), st.integers(1, 3), st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(dims, st.floats(1e-3, 1e3), st.sampled_from([0.25, 2.0]))
def test_plus_and_minus_c_v_read_plus_and_minus_one(dims, c, scale):
    m, n, k, seed = dims
    g = torch.Generator().manual_seed(seed)
    U, R = orthonormal(m, k, g), orthonormal(n, k, g)
    sigma = torch.sort(torch.rand(k, generator=g, dtype=torch.float64) + 0.1, descending=True).values
    plus = signed_overlap(along_v(U, R, sigma, c, scale), U, R, sigma)
    minus = signed_overlap(along_v(U, R, sigma, -c, scale), U, R, sigma)
    assert plus.signed_overlap == pytest.approx(1.0, abs=1e-9)
    assert minus.signed_overlap == pytest.approx(-1.0, abs=1e-9)
    assert (plus.agreeing_share, plus.opposing_share) == pytest.approx((1.0, 0.0), abs=1e-9)
    assert (minus.agreeing_share, minus.opposing_share) == pytest.approx((0.0, 1.0), abs=1e-9)
    assert minus.rho_opposing == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(dims, st.sampled_from(["outside", "one side", "cross"]))
def test_an_update_orthogonal_to_v_reads_zero(dims, where):
    """Outside the subspace on both sides, on one side only, or inside it but off V's own directions."""
    m, n, k, seed = dims
    g = torch.Generator().manual_seed(seed)
    U, R = orthonormal(m, k + 1, g), orthonormal(n, k + 1, g)
    sigma = torch.rand(k + 1, generator=g, dtype=torch.float64) + 0.1
    r = 3
    if where == "cross":  # U M R^T with a zero diagonal: inside F, orthogonal to every u_i r_i^T
        M = torch.randn(k + 1, k + 1, generator=g, dtype=torch.float64)
        M.fill_diagonal_(0.0)
        lora = LoraFactors(U @ M, R.T.contiguous(), 1.0)
    else:
        outside = torch.eye(m, dtype=torch.float64) - U @ U.T
        B = outside @ torch.randn(m, r, generator=g, dtype=torch.float64)
        A = torch.randn(r, n, generator=g, dtype=torch.float64)
        if where == "outside":
            A = A @ (torch.eye(n, dtype=torch.float64) - R @ R.T)
        lora = LoraFactors(B, A, 2.0)
    got = signed_overlap(lora, U, R, sigma)
    assert got.signed_overlap == pytest.approx(0.0, abs=1e-9)
    assert got.opposing_share == pytest.approx(0.0, abs=1e-6) or got.e_f < 1e-20 * got.energy
    if where == "cross":
        assert got.cross_share == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_a_random_update_reads_near_zero(seed):
    """For a random rank-r update the cosine with a fixed matrix has spread about 1 / sqrt(m n)."""
    g = torch.Generator().manual_seed(seed)
    m, n, k, r = 96, 80, 8, 4
    U, R = orthonormal(m, k, g), orthonormal(n, k, g)
    sigma = torch.sort(torch.rand(k, generator=g, dtype=torch.float64) + 0.1, descending=True).values
    lora = LoraFactors(
        torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64), 2.0
    )
    got = signed_overlap(lora, U, R, sigma)
    assert abs(got.signed_overlap) < 6 / math.sqrt(m * n)
    assert abs(got.signed_overlap) < 0.1


def test_zero_update_and_empty_subspace_read_zero():
    g = torch.Generator().manual_seed(0)
    U, R = orthonormal(10, 2, g), orthonormal(8, 2, g)
    zero = LoraFactors(torch.zeros(10, 2, dtype=torch.float64), torch.zeros(2, 8, dtype=torch.float64), 1.0)
    got = signed_overlap(zero, U, R, torch.ones(2, dtype=torch.float64))
    assert (got.signed_overlap, got.opposing_share, got.rho_opposing) == (0.0, 0.0, 0.0)
    lora = LoraFactors(
        torch.randn(10, 2, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64), 1.0
    )
    empty = signed_overlap(lora, U[:, :0], R[:, :0], torch.zeros(0, dtype=torch.float64))
    assert (empty.signed_overlap, empty.opposing_share, empty.e_f) == (0.0, 0.0, 0.0)
    with pytest.raises(CsuloraError, match="sigma of shape"):
        signed_overlap(lora, U, R, torch.ones(3, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(st.lists(problems(), min_size=1, max_size=4))
def test_modules_combine_energy_weighted(problem_list):
    """The adapter's figures: the energy-weighted cosine, the shares of the summed e_F."""
    overlaps = [signed_overlap(*p) for p in problem_list]
    total = combined_overlap(overlaps)
    energy = sum(o.energy for o in overlaps)
    assert total.signed_overlap == pytest.approx(sum(o.energy * o.signed_overlap for o in overlaps) / energy)
    e_f = sum(o.e_f for o in overlaps)
    assert total.opposing_share == pytest.approx(sum(o.opposing_share * o.e_f for o in overlaps) / e_f, rel=1e-6)
    assert total.agreeing_share + total.opposing_share + total.cross_share == pytest.approx(1.0)


# -- csulora-signed ------------------------------------------------------------------------------
LAMS = st.sampled_from([0.0, 0.1, 1.0, 3.0, 50.0, 1e9])
WEIGHTS = st.sampled_from([0.0, 0.5, 1.0, 4.0])


@settings(max_examples=60, deadline=None)
@given(problems(), LAMS, WEIGHTS)
def test_csulora_signed_factored_equals_dense(problem, lam, weight):
    lora, U, R, sigma = problem
    result = csulora_signed_update(lora, U, R, sigma, lam, weight)
    expected = csulora_signed_dense(lora.dense(), U, R, sigma, lam, weight)
    assert rel_err(result.lora.dense(), expected) < RTOL or float(torch.linalg.matrix_norm(expected)) < 1e-10
    reversing = result.info["opposing_directions"]
    assert result.lora.rank <= 2 * lora.rank + reversing and result.lora.scale == lora.scale
    assert result.info["kappa_opposing"] == pytest.approx(
        1.0 if lam * weight == 0 or weight == 0 else 1 / (1 + lam * weight)
    )


@settings(max_examples=30, deadline=None)
@given(problems(), LAMS)
def test_weight_zero_and_lam_zero_are_csulora_and_the_adapter(problem, lam):
    lora, U, R, sigma = problem
    same = csulora_signed_update(lora, U, R, sigma, lam, 0.0).lora
    assert rel_err(same.dense(), csulora_update(lora, U, R, lam).lora.dense()) < 1e-12
    untouched = csulora_signed_update(lora, U, R, sigma, 0.0, 3.0).lora
    assert torch.equal(untouched.B, lora.B) and torch.equal(untouched.A, lora.A)


@settings(max_examples=30, deadline=None)
@given(problems(), st.sampled_from([1.0, 10.0, math.inf]))
def test_what_agrees_with_v_is_kept_and_what_reverses_it_shrinks(problem, lam):
    lora, U, R, sigma = problem
    dW = lora.dense()
    result = csulora_signed_update(lora, U, R, sigma, lam, 1.0).lora.dense()
    F_minus = reversing_part_dense(dW, U, R, sigma)
    F, _, _ = parts(dW, U, R)
    F_new, _, _ = parts(result, U, R)
    # the agreeing and cross parts of F are kept exactly, the reversing one is scaled by 1 / (1 + lam)
    kappa = 0.0 if math.isinf(lam) else 1 / (1 + lam)
    assert float(torch.linalg.matrix_norm(F_new - (F - (1 - kappa) * F_minus))) <= 1e-9 * max(
        1.0, float(torch.linalg.matrix_norm(dW))
    )
    after = signed_overlap(csulora_signed_update(lora, U, R, sigma, lam, 1.0).lora, U, R, sigma)
    before = signed_overlap(lora, U, R, sigma)
    assert after.e_oppose <= before.e_oppose * (kappa**2 + 1e-9) + 1e-20
    # an overlap is a ratio of energies: with none left (all of it reversing and removed) it is rounding's sign
    assert after.signed_overlap >= before.signed_overlap - 1e-9 or before.energy == 0 or after.energy <= 1e-20


@settings(max_examples=30, deadline=None)
@given(problems(), st.sampled_from([1.0, 10.0, 1e6]))
def test_csulora_moves_the_overlap_away_from_zero(problem, lam):
    """csulora keeps <dW, V_k> (it lives in F) and shrinks ||dW||: a negative overlap gets more negative."""
    lora, U, R, sigma = problem
    before = signed_overlap(lora, U, R, sigma)
    after = signed_overlap(csulora_update(lora, U, R, lam).lora, U, R, sigma)
    assert abs(after.signed_overlap) >= abs(before.signed_overlap) - 1e-9
    assert after.signed_overlap * before.signed_overlap >= -1e-12


@settings(max_examples=25, deadline=None)
@given(
    problems(zero_sigma=False),
    st.sampled_from([0.5, 2.0, 10.0]),
    st.sampled_from([0.5, 1.0, 3.0]),
    st.integers(0, 1000),
)
def test_csulora_signed_minimises_its_objective(problem, lam, weight, seed):
    """No feasible perturbation (one that keeps F's agreeing and cross parts) lowers the objective."""
    lora, U, R, sigma = problem
    dW = lora.dense()
    F_all, H_all, O_all = parts(dW, U, R)
    e = float(torch.sum(dW**2))
    rho_h, rho_o = float(torch.sum(H_all**2)) / e, float(torch.sum(O_all**2)) / e
    reversing = [i for i in range(U.shape[1]) if float(U[:, i] @ dW @ R[:, i]) * float(sigma[i]) < 0]

    def minus_part(X):
        out = torch.zeros_like(X)
        for i in reversing:
            direction = torch.outer(U[:, i], R[:, i])
            out += torch.sum(X * direction) * direction
        return out

    def objective(X):
        _, H, O = parts(X, U, R)
        F_m = minus_part(X)
        return float(
            torch.sum((X - dW) ** 2)
            + lam * rho_h * torch.sum(H**2)
            + lam * rho_o * torch.sum(O**2)
            + lam * weight * torch.sum(F_m**2)
        )

    best = csulora_signed_update(lora, U, R, sigma, lam, weight).lora.dense()
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        D = torch.randn(dW.shape, generator=g, dtype=torch.float64)
        F_d, H_d, O_d = parts(D, U, R)
        D = H_d + O_d + minus_part(F_d)  # feasible: F's agreeing and cross parts are held
        for eps in (1e-3, 1e-1):
            assert objective(best + eps * D) >= objective(best) - 1e-9 * max(1.0, objective(best))


def test_an_update_reversing_v_is_kept_by_csulora_and_removed_by_csulora_signed():
    """The issue's case: dW = -c V_k lies wholly in F; csulora keeps it at every lam, csulora-signed shrinks it."""
    g = torch.Generator().manual_seed(5)
    U, R = orthonormal(20, 3, g), orthonormal(16, 3, g)
    sigma = torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)
    lora = along_v(U, R, sigma, -0.7, 2.0)
    for lam in (1.0, 100.0, math.inf):
        assert rel_err(csulora_update(lora, U, R, lam).lora.dense(), lora.dense()) < 1e-12
    shrunk = csulora_signed_update(lora, U, R, sigma, 1.0, 1.0).lora.dense()
    assert rel_err(shrunk, 0.5 * lora.dense()) < 1e-12
    gone = csulora_signed_update(lora, U, R, sigma, math.inf, 1.0).lora.dense()
    assert float(torch.linalg.matrix_norm(gone)) < 1e-12
    kept = along_v(U, R, sigma, 0.7, 2.0)  # +c V_k: nothing to shrink
    assert rel_err(csulora_signed_update(kept, U, R, sigma, math.inf, 1.0).lora.dense(), kept.dense()) < 1e-12
    assert rel_err(csulora_dense(kept.dense(), U, R, 5.0), kept.dense()) < 1e-12


# -- through inspect and correct -----------------------------------------------------------------
def run(*argv) -> int:
    from csulora.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def reversing_adapter(tmp_path_factory, llama_adapter, subspace_file):
    """The tiny Llama adapter with every module's update replaced by -0.5 V_k (rank k, stored in float32)."""
    from csulora.adapter import load_adapter, write_adapter
    from csulora.subspace import load_subspace

    adapter, sub = load_adapter(llama_adapter), load_subspace(subspace_file)
    factors = {}
    for module in adapter.modules:
        basis = sub[module]
        U, R, sigma = basis.U.double(), basis.R.double(), basis.sigma.double()
        factors[module] = along_v(U, R, sigma, -0.5, adapter.scale(module))
    out = tmp_path_factory.mktemp("reversing") / "lora"
    out.mkdir()
    write_adapter(adapter, out, factors)
    return out


def test_inspect_reads_minus_one_for_an_adapter_reversing_v(reversing_adapter, subspace_file, capsys):
    import json

    assert run("inspect", reversing_adapter, "--subspace", subspace_file, "--json", "-q") == 0
    document = json.loads(capsys.readouterr().out)
    assert len(document["modules"]) == 14
    for row in document["modules"]:
        assert row["signed_overlap"] == pytest.approx(-1.0, abs=1e-5)
        assert row["opposing_share"] == pytest.approx(1.0, abs=1e-5)
        assert row["rho_f"] == pytest.approx(1.0, abs=1e-5)
        assert len(row["signed_share_by_direction"]) == row["k"]
        assert all(x < 0 for x in row["signed_share_by_direction"])
    totals = document["adapter"]
    assert totals["signed_overlap"] == pytest.approx(-1.0, abs=1e-5)
    assert totals["opposing_share"] == pytest.approx(1.0, abs=1e-5)
    assert totals["modules"] == 14
    assert run("inspect", reversing_adapter, "--subspace", subspace_file, "-q") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-2:] == ["signed_overlap", "opposing_share"]
    assert table[-1].startswith("all modules (energy-weighted)") and table[-1].split()[-2:] == ["-1.000", "1.000"]


def test_correct_records_the_figures_before_and_after(tmp_path, reversing_adapter, llama_adapter, subspace_file):
    """csulora keeps an update that reverses V whole; csulora-signed shrinks it; scale keeps its direction."""
    import json

    def correct(adapter, name, *flags) -> dict:
        out = tmp_path / name
        assert run("correct", adapter, "-o", out, "--subspace", subspace_file, *flags, "-q") == 0
        return json.loads((out / "csulora_report.json").read_text())

    kept = correct(reversing_adapter, "csulora", "--lam", "100")
    assert kept["signed_overlap_before"] == pytest.approx(-1.0, abs=1e-5)
    assert kept["signed_overlap_after"] == pytest.approx(-1.0, abs=1e-5)
    assert kept["opposing_share_after"] == pytest.approx(1.0, abs=1e-5)
    assert kept["energy_after"] == pytest.approx(kept["energy_before"], rel=1e-5)

    halved = correct(reversing_adapter, "signed", "--method", "csulora-signed", "--lam", "1")
    assert halved["energy_after"] == pytest.approx(0.25 * halved["energy_before"], rel=1e-5)
    for row in halved["modules"].values():
        assert row["kappa_opposing"] == 0.5 and row["opposing_directions"] == row["k"]
        assert row["signed_overlap_after"] == pytest.approx(-1.0, abs=1e-5)
    removed = correct(reversing_adapter, "removed", "--method", "csulora-signed", "--lam", "1e6")
    # what is left is F off V's estimated singular directions: the float32 randomized SVD's error, which
    # depends on the CPU's BLAS (below 1e-9 of the energy on an AMD EPYC, 2.8e-8 on an Intel Xeon)
    assert removed["energy_after"] < 1e-6 * removed["energy_before"]

    # the trained adapter: the report's before-figures are inspect's; scale's factor keeps them
    measured = correct(llama_adapter, "scale", "--method", "scale", "--match-lam", "3")
    for row in measured["modules"].values():
        assert row["signed_overlap_after"] == pytest.approx(row["signed_overlap_before"], abs=1e-6)
        assert row["opposing_share_after"] == pytest.approx(row["opposing_share_before"], abs=1e-6)
    assert measured["signed_overlap_after"] == pytest.approx(measured["signed_overlap_before"], abs=1e-6)
    fixed = correct(llama_adapter, "fixed", "--method", "scale", "--factor", "0.5")  # reads no subspace
    assert fixed["signed_overlap_before"] is None and fixed["signed_overlap_after"] is None
    assert all(row["opposing_share_after"] is None for row in fixed["modules"].values())


def test_a_finalize_that_turns_the_update_leaves_the_after_figures_unknown(tmp_path, llama_adapter, subspace_file):
    """The bases are gone by the time ``finalize`` runs: figures carry over only for a multiple c >= 0."""
    from csulora.correct import Corrected
    from csulora.methods import NoSettings, define_method, register, unregister
    from csulora.pipeline import correct_adapter
    from csulora.sources import BasisSource

    def swap(original, results, settings):  # B A -> (B A) with A's rows reversed: another direction
        return {
            name: Corrected(LoraFactors(r.lora.B, r.lora.A.flip(0), r.lora.scale), r.info)
            for name, r in results.items()
        }

    def double(original, results, settings):
        return {
            name: Corrected(LoraFactors(2 * r.lora.B, r.lora.A, r.lora.scale), r.info) for name, r in results.items()
        }

    for name, finalize in (("toy-swap", swap), ("toy-double", double)):

        @define_method(name, settings=NoSettings, summary="a test method", finalize=finalize)
        def toy(lora, inputs, settings):
            return Corrected(lora, {})

        register(toy)
        try:
            report = correct_adapter(llama_adapter, tmp_path / name, BasisSource(subspace_file), method=name)
        finally:
            unregister(name)
        rows = report["modules"].values()
        if name == "toy-swap":
            assert all(row["signed_overlap_after"] is None for row in rows) and report["signed_overlap_after"] is None
            assert all(row["signed_overlap_before"] is not None for row in rows)
        else:
            assert all(
                row["signed_overlap_after"] == pytest.approx(row["signed_overlap_before"], abs=1e-6) for row in rows
            )
            assert report["signed_overlap_after"] == pytest.approx(report["signed_overlap_before"], abs=1e-6)
