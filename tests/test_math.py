"""Property tests of the factored closed forms against the dense reference (docs/method.md)."""

from __future__ import annotations

import math

import pytest
import torch
from dense_reference import (
    best_rank,
    csulora_dense,
    csulora_dir_dense,
    energies,
    orthonormal,
    parts,
    safelora_dense,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from csulora.correct import (
    LoraFactors,
    all_finite,
    csulora_dir_update,
    csulora_update,
    decompose,
    project_update,
    safelora_candidate,
    truncate_to_rank,
)

RTOL = 1e-5


def rel_err(x, y) -> float:
    return float(torch.linalg.matrix_norm(x - y) / max(float(torch.linalg.matrix_norm(y)), 1e-30))


@st.composite
def problems(draw):
    m = draw(st.integers(3, 24))
    n = draw(st.integers(3, 24))
    r = draw(st.integers(1, min(m, n, 6)))
    k_left = draw(st.integers(1, m - 1))
    k_right = draw(st.integers(1, n - 1))
    k = min(k_left, k_right)
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.5, 2.0, 16 / math.sqrt(8)]))
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    U = orthonormal(m, k, g)
    R = orthonormal(n, k, g)
    return LoraFactors(B, A, scale), U, R


LAMS = st.sampled_from([0.0, 0.1, 1.0, 3.0, 50.0])


@settings(max_examples=40, deadline=None)
@given(problems())
def test_decomposition_matches_dense_and_is_orthogonal(problem):
    lora, U, R = problem
    d = decompose(lora, U, R)
    dW = lora.dense()
    F, H, O = parts(dW, U, R)
    assert rel_err(d.scale * d.B_in @ d.A_in, F) < RTOL or float(torch.linalg.matrix_norm(F)) < 1e-10
    rho_ref = energies(dW, U, R)
    assert [d.rho_f, d.rho_h, d.rho_o] == pytest.approx(rho_ref, rel=RTOL, abs=1e-9)
    assert d.energy == pytest.approx(float(torch.sum(dW**2)), rel=RTOL)
    assert float(torch.sum(F * H)) == pytest.approx(0.0, abs=1e-8 * d.energy)
    assert float(torch.sum(F * O)) == pytest.approx(0.0, abs=1e-8 * d.energy)
    assert float(torch.sum(H * O)) == pytest.approx(0.0, abs=1e-8 * d.energy)


@settings(max_examples=40, deadline=None)
@given(problems(), LAMS)
def test_csulora_factored_equals_dense_closed_form(problem, lam):
    lora, U, R = problem
    result = csulora_update(lora, U, R, lam)
    expected = csulora_dense(lora.dense(), U, R, lam)
    assert rel_err(result.lora.dense(), expected) < RTOL
    assert result.lora.rank <= 2 * lora.rank
    assert result.lora.scale == lora.scale
    F_new, _, _ = parts(result.lora.dense(), U, R)
    F_old, _, _ = parts(lora.dense(), U, R)
    assert float(torch.linalg.matrix_norm(F_new - F_old)) <= 1e-9 * max(1.0, float(torch.linalg.matrix_norm(F_old)))


@settings(max_examples=25, deadline=None)
@given(problems(), st.sampled_from([0.5, 2.0, 10.0]), st.integers(0, 1000))
def test_csulora_minimises_the_penalised_objective(problem, lam, seed):
    """No feasible perturbation (one that keeps F) lowers the objective: X* is the argmin."""
    lora, U, R = problem
    dW = lora.dense()
    _, rho_h, rho_o = energies(dW, U, R)

    def objective(X):
        _, H, O = parts(X, U, R)
        return float(torch.sum((X - dW) ** 2) + lam * rho_h * torch.sum(H**2) + lam * rho_o * torch.sum(O**2))

    best = csulora_update(lora, U, R, lam).lora.dense()
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        D = torch.randn(dW.shape, generator=g, dtype=torch.float64)
        _, D_h, D_o = parts(D, U, R)
        D = D_h + D_o  # feasible: F(X* + eps D) = F
        for eps in (1e-3, 1e-1):
            assert objective(best + eps * D) >= objective(best) - 1e-9 * max(1.0, objective(best))


@settings(max_examples=20, deadline=None)
@given(problems())
def test_lam_zero_returns_the_adapter_and_infinity_is_projection(problem):
    lora, U, R = problem
    same = csulora_update(lora, U, R, 0.0)
    assert torch.equal(same.lora.B, lora.B) and torch.equal(same.lora.A, lora.A)
    hard = csulora_update(lora, U, R, math.inf).lora.dense()
    projected = project_update(lora, U, R)
    F, _, _ = parts(lora.dense(), U, R)
    assert rel_err(projected.lora.dense(), F) < RTOL or float(torch.linalg.matrix_norm(F)) < 1e-10
    assert float(torch.linalg.matrix_norm(hard - F)) <= 1e-9 * max(1.0, float(torch.linalg.matrix_norm(lora.dense())))
    large = csulora_update(lora, U, R, 1e9).lora.dense()
    assert float(torch.linalg.matrix_norm(large - F)) <= 1e-6 * float(torch.linalg.matrix_norm(lora.dense()))


@settings(max_examples=40, deadline=None)
@given(problems(), LAMS)
def test_csulora_dir_matches_dense(problem, lam):
    lora, U, R = problem
    result = csulora_dir_update(lora, U, R, lam)
    expected = csulora_dir_dense(lora.dense(), U, lam)
    assert rel_err(result.lora.dense(), expected) < RTOL
    assert result.lora.rank == lora.rank
    # the in-subspace part of every direction is kept: P_L dW* = P_L dW
    P_L = U @ U.T
    assert (
        rel_err(P_L @ result.lora.dense(), P_L @ lora.dense()) < RTOL
        or float(torch.linalg.matrix_norm(P_L @ lora.dense())) < 1e-10
    )


@settings(max_examples=30, deadline=None)
@given(problems(), st.integers(0, 1000))
def test_safelora_candidate_matches_dense(problem, seed):
    lora, _, _ = problem
    m, n = lora.B.shape[0], lora.A.shape[1]
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(m, 2, generator=g, dtype=torch.float64) @ torch.randn(2, n, generator=g, dtype=torch.float64)
    result = safelora_candidate(lora, V)
    expected, cosine = safelora_dense(lora.B, lora.A, lora.scale, V)
    assert rel_err(result.lora.dense(), expected) < RTOL
    assert result.info["cosine"] == pytest.approx(cosine, rel=RTOL, abs=1e-9)
    assert result.lora.rank == lora.rank


@settings(max_examples=30, deadline=None)
@given(problems(), st.sampled_from([0.3, 1.0, 5.0]))
def test_keep_mode_is_the_best_rank_r_approximation(problem, lam):
    lora, U, R = problem
    exact = csulora_update(lora, U, R, lam).lora
    kept, error = truncate_to_rank(exact, lora.rank)
    _, expected_error = best_rank(exact.dense(), lora.rank)
    assert kept.rank <= lora.rank
    assert error == pytest.approx(expected_error, rel=1e-4, abs=1e-7)
    # Eckart-Young: reaching the optimal error means kept is a best rank-r approximation
    assert rel_err(kept.dense(), exact.dense()) == pytest.approx(expected_error, rel=1e-4, abs=1e-7)


def test_truncation_split_is_balanced():
    g = torch.Generator().manual_seed(3)
    lora = LoraFactors(
        torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g, dtype=torch.float64), 1.0
    )
    kept, _ = truncate_to_rank(lora, 3)
    norms_b = torch.linalg.vector_norm(kept.B, dim=0)
    norms_a = torch.linalg.vector_norm(kept.A, dim=1)
    assert torch.allclose(norms_b, norms_a)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    size=st.integers(0, 300),
    bad=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from([math.nan, math.inf, -math.inf]))),
    huge=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_all_finite_agrees_with_isfinite(dtype, size, bad, huge, seed):
    """The fast check is torch.isfinite(t).all(), also where finite values overflow the sum."""
    t = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if huge:  # finite values whose sum overflows the dtype
        t = t.sign() * torch.finfo(dtype).max
    t = t.to(dtype)
    for where, value in bad if size else []:
        t[int(where * size)] = value
    assert all_finite(t) == bool(torch.isfinite(t).all())
    assert all_finite(t.reshape(-1, 1) if size else t) == bool(torch.isfinite(t).all())


@pytest.mark.parametrize("seed", range(20))
def test_energies_never_negative_when_the_update_lies_in_a_float32_subspace(seed):
    """B in span(U) and A in span(R) with a float32 basis (orthonormal to ~1e-7, as read from a file):
    the partially aligned and off-subspace energies are zero up to rounding, never below zero."""
    g = torch.Generator().manual_seed(seed)
    m, n, k, r = 300, 200, 12, 4
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0].double()
    R = torch.linalg.qr(torch.randn(n, k, generator=g))[0].double()
    B = U @ torch.randn(k, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, k, generator=g, dtype=torch.float64) @ R.T
    d = decompose(LoraFactors(B, A, 2.0), U, R)
    assert min(d.e_f, d.e_h, d.e_o) >= 0.0
    assert d.rho_f <= 1.0 + 1e-12 and d.rho_h >= 0.0 and d.rho_o >= 0.0
    assert d.rho_h < 1e-5 and d.rho_o < 1e-5
    info = csulora_update(LoraFactors(B, A, 2.0), U, R, 1e8).info
    assert info["kappa_h"] <= 1.0 and info["kappa_o"] <= 1.0
