"""Randomized SVD, rank choice and the subspace file."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dense_reference import orthonormal

from csulora import CsuloraError, compute_subspace, load_subspace, svd
from csulora.svd import SubspaceSettings, adaptive_svd, choose_rank, module_basis, randomized_svd


def low_rank_plus_noise(m, n, rank, seed, noise=1e-3):
    g = torch.Generator().manual_seed(seed)
    U = orthonormal(m, rank, g)
    R = orthonormal(n, rank, g)
    sigma = torch.linspace(10, 1, rank, dtype=torch.float64)
    return ((U * sigma) @ R.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("shape", [(200, 120), (96, 300)])
def test_randomized_svd_matches_exact_svd(shape):
    V = low_rank_plus_noise(*shape, rank=8, seed=1)
    U, sigma, R = randomized_svd(V, 8, oversample=10, power_iters=2, seed=0)
    U_ex, s_ex, Vh_ex = torch.linalg.svd(V.double(), full_matrices=False)
    assert torch.allclose(sigma.double(), s_ex[:8], rtol=1e-4)
    # principal angles between the subspaces: all cosines ~ 1
    assert torch.linalg.svdvals(U_ex[:, :8].T @ U.double()).min() > 1 - 1e-5
    assert torch.linalg.svdvals(Vh_ex[:8] @ R.double()).min() > 1 - 1e-5
    assert torch.allclose(U.T @ U, torch.eye(8), atol=1e-5)


def test_randomized_svd_is_seeded():
    V = low_rank_plus_noise(80, 60, rank=30, seed=2, noise=0.5)
    first = randomized_svd(V, 5, oversample=2, power_iters=0, seed=7)
    again = randomized_svd(V, 5, oversample=2, power_iters=0, seed=7)
    other = randomized_svd(V, 5, oversample=2, power_iters=0, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_choose_rank_reaches_the_energy_fraction():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5])
    total = float(torch.sum(sigma**2)) + 1.0  # energy V has beyond the computed values
    for tau in (0.1, 0.5, 0.7, 0.9, 0.99):
        k = choose_rank(sigma, total, tau, max_rank=256)
        captured = torch.cumsum(sigma**2, 0) / total
        assert k == len(sigma) or captured[k - 1] >= tau
        assert k == 1 or captured[k - 2] < tau
    assert choose_rank(sigma, total, 0.99, max_rank=2) == 2


def test_module_basis_energy_mode_and_fixed_rank():
    V = low_rank_plus_noise(64, 48, rank=4, seed=3, noise=1e-2)
    fixed = module_basis(V, SubspaceSettings(rank=6))
    assert fixed.k == 6
    energy = module_basis(V, SubspaceSettings(energy=0.99, max_rank=32))
    exact = torch.linalg.svdvals(V.double())
    assert energy.total_energy == pytest.approx(
        float(torch.sum(V.double() ** 2)), rel=1e-7
    )  # displacement_energy: float32 runs
    expected_k = int(torch.nonzero(torch.cumsum(exact**2, 0) >= 0.99 * torch.sum(exact**2))[0]) + 1
    assert energy.k == expected_k
    assert energy.energy_captured >= 0.99 - 1e-6


def with_spectrum(m, n, sigma, seed, noise_share=0.0):
    """``U diag(sigma) R^T`` with random orthonormal U, R, plus Gaussian noise holding ``noise_share`` of the energy."""
    g = torch.Generator().manual_seed(seed)
    V = (orthonormal(m, len(sigma), g) * sigma) @ orthonormal(n, len(sigma), g).T
    if noise_share:
        scale = (noise_share * float(torch.sum(sigma**2)) / (m * n)) ** 0.5
        V += scale * torch.randn(m, n, generator=g, dtype=torch.float64)
    return V.float()


def largest_angle_deg(A, B):
    cosine = float(torch.linalg.svdvals(A.double().T @ B.double()).min())
    return math.degrees(math.acos(min(1.0, cosine)))


_i = torch.arange(1, 401, dtype=torch.float64)
_j = torch.arange(120, dtype=torch.float64)
SPECTRA = {
    "power law 0.75": (_i**-0.75, 0.0),
    "power law 1": (_i**-1.0, 0.0),
    "power law 1.5": (_i**-1.5, 0.0),
    "fast decay + 1% noise": (torch.exp(-_j / 3), 0.01),
    "decay + 10% noise": (torch.exp(-_j / 12), 0.1),
    "slow decay + 10% noise": (torch.exp(-_j / 30), 0.1),
    # a real alignment displacement's law (benchmarks/spectra/), its tail beyond 120 values as noise
    "power law 0.7 + tail noise": (_j.add(1) ** -0.7, 0.05),
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("tau", [pytest.param(0.5, marks=pytest.mark.slow), 0.8])  # 0.8: the default
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_adaptive_sketch_matches_exact_svd(spectrum, tau, seed):
    """Energy mode's growing sketch: the exact SVD's k and a top-k subspace within 1 degree of it."""
    sigma, noise = SPECTRA[spectrum]
    V = with_spectrum(600, 400, sigma, seed, noise)
    total = float(torch.sum(V.double() ** 2))
    U_ex, S_ex, Vh_ex = torch.linalg.svd(V.double(), full_matrices=False)
    k_exact = choose_rank(S_ex, total, tau, max_rank=128)
    U, s, R = adaptive_svd(V, total, tau, max_rank=128, seed=seed)
    assert U.shape[1] == R.shape[1] == len(s) == k_exact
    assert largest_angle_deg(U, U_ex[:, :k_exact]) <= 1.0
    assert largest_angle_deg(R, Vh_ex[:k_exact].T) <= 1.0
    assert torch.allclose(s.double(), S_ex[:k_exact], rtol=1e-3)
    assert torch.allclose(U.T @ U, torch.eye(k_exact), atol=1e-5)


@pytest.mark.parametrize(
    "spectrum",
    [pytest.param("power law 0.75", marks=pytest.mark.slow), "power law 0.7 + tail noise", "decay + 10% noise"],
)
def test_adaptive_sketch_stops_early_on_decaying_spectra(spectrum, monkeypatch):
    """The Krylov space is accepted well before the full-width sketch: that is where the time goes."""
    sigma, noise = SPECTRA[spectrum]
    V = with_spectrum(600, 400, sigma, 0, noise)
    total = float(torch.sum(V.double() ** 2))
    products = []
    real_matmul = torch.Tensor.__matmul__

    def counting(a, b):
        if a.shape == V.shape or a.shape == V.T.shape:
            products.append(b.shape[1])
        return real_matmul(a, b)

    monkeypatch.setattr(svd, "randomized_svd", None)  # the full-width fallback must not run
    monkeypatch.setattr(torch.Tensor, "__matmul__", counting)
    U, s, R = adaptive_svd(V, total, 0.8, max_rank=128)
    # the full-width sketch multiplies V by (2 q + 2) blocks of 128 + 10 columns
    assert 0 < sum(products) <= 6 * 138 / 2


def test_adaptive_sketch_on_a_rank_deficient_matrix():
    """An exactly rank-3 V: the Krylov space is invariant after one block; the basis is still exact."""
    V = with_spectrum(300, 200, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), seed=6)
    total = float(torch.sum(V.double() ** 2))
    U, s, R = adaptive_svd(V, total, 0.99, max_rank=64)
    U_ex, S_ex, Vh_ex = torch.linalg.svd(V.double(), full_matrices=False)
    assert len(s) == 3
    assert largest_angle_deg(U, U_ex[:, :3]) <= 1.0 and largest_angle_deg(R, Vh_ex[:3].T) <= 1.0
    assert torch.allclose(U.T @ U, torch.eye(3), atol=1e-5) and torch.allclose(R.T @ R, torch.eye(3), atol=1e-5)


def test_adaptive_sketch_at_the_cap_is_the_full_width_sketch():
    """A flat spectrum widens the sketch to max_rank: then it is today's sketch, bit for bit, truncated to k."""
    V = with_spectrum(600, 400, torch.ones(300, dtype=torch.float64), seed=4, noise_share=0.2)
    total = float(torch.sum(V.double() ** 2))
    U, s, R = adaptive_svd(V, total, 0.5, max_rank=128, seed=3)
    U_full, s_full, R_full = randomized_svd(V, 128, seed=3)
    k = choose_rank(s_full, total, 0.5, 128)
    assert len(s) == k > 32
    assert torch.equal(U, U_full[:, :k]) and torch.equal(s, s_full[:k]) and torch.equal(R, R_full[:, :k])


def test_adaptive_sketch_is_seeded():
    V = with_spectrum(300, 200, torch.exp(-_j / 12), seed=5, noise_share=0.1)
    total = float(torch.sum(V.double() ** 2))
    first, again = (adaptive_svd(V, total, 0.8, 64, seed=7) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("bad", [{"rank": 0}, {"energy": 0.0}, {"energy": 1.5}, {"max_rank": 0}])
def test_settings_are_validated(bad):
    with pytest.raises(CsuloraError):
        SubspaceSettings(**bad)


def test_subspace_of_checkpoints_matches_exact_svd_and_round_trips(llama_pair, tmp_path):
    from safetensors.torch import load_file

    base, aligned = llama_pair
    sub = compute_subspace(base, aligned, targets=["q_proj", "down_proj"], settings=SubspaceSettings(rank=3))
    assert sorted(sub.modules()) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    W_b = load_file(base / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    W_a = {}
    for f in aligned.glob("*.safetensors"):
        W_a |= load_file(f)
    V = W_a[name + ".weight"].double() - W_b[name + ".weight"].double()
    U_ex, _, Vh_ex = torch.linalg.svd(V, full_matrices=False)
    basis = sub[name]
    assert torch.linalg.svdvals(U_ex[:, :3].T @ basis.U.double()).min() > 0.999
    assert torch.linalg.svdvals(Vh_ex[:3] @ basis.R.double()).min() > 0.999

    path = sub.save(tmp_path / "sub.safetensors")
    loaded = load_subspace(path)
    assert loaded.modules() == sub.modules()
    assert torch.equal(loaded[name].U, basis.U)
    assert loaded.metadata["settings"]["rank"] == 3
    assert len(loaded.metadata["base"]["sha256"]) == 64
    with pytest.raises(CsuloraError, match="already exists"):
        sub.save(path)
    # same inputs, same file contents: the computation is deterministic
    again = compute_subspace(base, aligned, targets=["q_proj", "down_proj"], settings=SubspaceSettings(rank=3))
    assert torch.equal(again[name].U, basis.U)
    assert again.metadata["aligned"]["sha256"] == sub.metadata["aligned"]["sha256"]


def test_load_subspace_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CsuloraError, match="not a csulora subspace"):
        load_subspace(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CsuloraError, match="broken.safetensors"):
        load_subspace(tmp_path / "broken.safetensors")
    save_file(
        {"m.U": torch.zeros(2, 1)},
        str(tmp_path / "partial.safetensors"),
        metadata={"csulora": json.dumps({"format_version": 1, "modules": {"m": {"total_energy": 1}}})},
    )
    with pytest.raises(CsuloraError, match="lacks tensors"):
        load_subspace(tmp_path / "partial.safetensors")


def test_subspace_settings_are_declared_like_a_methods_and_their_flags_generated():
    from csulora.cli import build_parser
    from csulora.settings import setting_specs

    for bad, message in [
        ({"energy": 0.0}, r"energy=\.\.\. must be in \(0, 1\], got 0.0"),
        ({"energy": 1.5}, r"energy=\.\.\. must be in \(0, 1\], got 1.5"),
        ({"energy": float("nan")}, r"energy=\.\.\. must be in \(0, 1\], got nan"),
        ({"rank": 0}, r"rank=\.\.\. must be >= 1, got 0"),
        ({"max_rank": 0}, r"max_rank=\.\.\. must be >= 1, got 0"),
        ({"oversample": -1}, r"oversample=\.\.\. must be >= 0, got -1"),
        ({"power_iters": -1}, r"power_iters=\.\.\. must be >= 0, got -1"),
    ]:
        with pytest.raises(CsuloraError, match=message):
            SubspaceSettings(**bad)
    assert SubspaceSettings(energy=1.0).energy == 1.0 and SubspaceSettings(rank=None).rank is None
    args = build_parser().parse_args(["subspace", "--base", "b", "--aligned", "a", "-o", "s", "--rank", "3"])
    specs = setting_specs(SubspaceSettings)
    assert {spec.name: getattr(args, spec.name) for spec in specs} == SubspaceSettings(rank=3).as_dict()
