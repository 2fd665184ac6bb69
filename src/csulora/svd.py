"""The safety subspace's math: a truncated SVD of the alignment displacement ``V = W_aligned - W_base``.

Pure functions on tensors: ``randomized_svd`` (Halko-Martinsson-Tropp) and ``adaptive_svd`` (block
Krylov, for a rank chosen by energy), ``choose_rank``, ``displacement_energy``, and ``module_basis``,
which turns one module's ``V`` into its ``ModuleBasis`` as ``SubspaceSettings`` (declared in
``csulora.settings``) say. The subspace
file that stores the bases is ``csulora.subspace``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .settings import SubspaceSettings

__all__ = [
    "ModuleBasis",
    "SubspaceSettings",
    "adaptive_svd",
    "choose_rank",
    "displacement_energy",
    "module_basis",
    "randomized_svd",
]


def randomized_svd(
    V: torch.Tensor, rank: int, *, oversample: int = 10, power_iters: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``V ~ U diag(sigma) R^T`` (Halko, Martinsson & Tropp 2011, Alg. 4.4).

    A Gaussian sketch of ``rank + oversample`` columns (seeded, so the result is reproducible),
    ``power_iters`` subspace iterations re-orthonormalised by QR, then an exact SVD of the small
    projected matrix. Falls back to an exact SVD when the sketch would not be smaller than V.
    """
    m, n = V.shape
    rank = min(rank, m, n)
    width = rank + oversample
    if width >= min(m, n):
        return _exact_svd(V, rank)
    return _sketched_svd(V, _gaussian_sketch(V, width, seed), rank, power_iters)


def _exact_svd(V: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, sigma, Vh = torch.linalg.svd(V, full_matrices=False)
    return U[:, :rank], sigma[:rank], Vh[:rank].T


def _gaussian_sketch(V: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """``n x width`` standard Gaussian test matrix, drawn on the CPU so every device sees the same one."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(V.shape[1], width, generator=generator, dtype=V.dtype).to(V.device)


def _sketched_svd(
    V: torch.Tensor, omega: torch.Tensor, rank: int, power_iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Range finder on ``V @ omega`` with ``power_iters`` QR-stabilised subspace iterations, then the SVD."""
    Q, _ = torch.linalg.qr(V @ omega)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(V.T @ Q)
        Q, _ = torch.linalg.qr(V @ Z)
    U_small, sigma, Vh = torch.linalg.svd(Q.T @ V, full_matrices=False)
    return Q @ U_small[:, :rank], sigma[:rank], Vh[:rank].T


# Energy mode grows a block Krylov space this many columns at a time.
KRYLOV_BLOCK = 32
# Accept the top-k Ritz vectors once their residual bound on the angle to the exact top-k subspace is
# below this (degrees): a tenth of the 1-degree accuracy contract.
KRYLOV_TOLERANCE_DEG = 0.1


def adaptive_svd(
    V: torch.Tensor,
    total_energy: float,
    tau: float,
    max_rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k SVD of V, k the smallest rank holding ``tau`` of ``total_energy`` (at most ``max_rank``).

    A sketch of ``max_rank + oversample`` columns costs the same whatever k turns out to be, and a
    narrower one with q subspace iterations needs a sketch of about 5.5 k before it pins the top-k
    subspace of a power-law spectrum (sigma_i ~ i^-0.7, as in real alignment displacements) down.
    Instead this grows a block Krylov space ``span[G, (V^T V) G, (V^T V)^2 G, ...]`` from a Gaussian
    block G, ``KRYLOV_BLOCK`` columns per step, keeping every iterate (Musco & Musco 2015: at the same
    number of products a Krylov space is far more accurate for the top k than the last power iterate).
    Each step costs one product with V and one with V^T; the second also gives the residuals
    ``V^T u_i - sigma_i r_i`` of the current Ritz triplets for free, and the step is accepted when
    Wedin's bound ``||residual|| / (sigma_k - sigma_k+1)`` on the top-k angle is below
    ``KRYLOV_TOLERANCE_DEG`` (the gap taken from the Ritz values, an a posteriori estimate checked
    against exact SVDs in the tests). A space of width w has cost 2 w columns of products, the
    full-width sketch ``2 (q + 1) (max_rank + oversample)``; if the space is not accepted within half
    that, the full-width sketch ``randomized_svd(V, max_rank, ...)`` truncated to k is returned, as
    before (so a flat spectrum costs at most 1.5x what it did).
    """
    m, n = V.shape
    cap = min(max_rank, m, n)
    if cap + oversample >= min(m, n) or total_energy <= 0:
        U, sigma, R = _exact_svd(V, cap)
        k = choose_rank(sigma, total_energy, tau, cap)
        return U[:, :k], sigma[:k], R[:, :k]
    # at most half the full-width sketch's products, and a right basis narrower than V
    max_width = min((power_iters + 1) * (cap + oversample) // 2, min(m, n) - KRYLOV_BLOCK)
    found = _krylov_svd(V, total_energy, tau, cap, max_width, seed)
    if found is not None:
        return found
    U, sigma, R = randomized_svd(V, cap, oversample=oversample, power_iters=power_iters, seed=seed)
    k = choose_rank(sigma, total_energy, tau, cap)
    return U[:, :k], sigma[:k], R[:, :k]


def _krylov_svd(
    V: torch.Tensor, total_energy: float, tau: float, cap: int, max_width: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Block Krylov (right-space Lanczos with full reorthogonalisation) until the top-k bound holds.

    Keeps the orthonormal right basis ``Q``, its image ``Y = V Q`` and ``V^T Y``; the Ritz triplets
    come from the small Gram matrix ``Y^T Y`` (float64). None when the space would exceed max_width.
    """
    block = KRYLOV_BLOCK
    if max_width < block:
        return None
    m, n = V.shape
    # the space grows into buffers of the largest width it may reach: no copy of the space per block
    Q_all, backs_all, Y_all = V.new_empty(n, max_width), V.new_empty(n, max_width), V.new_empty(m, max_width)
    new_Q = torch.linalg.qr(_gaussian_sketch(V, block, seed))[0]
    gram = V.new_empty(0, 0, dtype=torch.float64)
    width = 0
    while True:
        new_Y = V @ new_Q
        cross = (Y_all[:, :width].T @ new_Y).double()
        gram = torch.cat([torch.cat([gram, cross], 1), torch.cat([cross.T, (new_Y.T @ new_Y).double()], 1)], 0)
        Q_all[:, width : width + block], Y_all[:, width : width + block] = new_Q, new_Y
        width += block
        Q, Y, backs = Q_all[:, :width], Y_all[:, :width], backs_all[:, :width]
        back = V.T @ new_Y  # V^T V q for the newest block: the next Krylov block, and residuals
        backs[:, width - block :] = back
        eigenvalues, vectors = torch.linalg.eigh((gram + gram.T) / 2)  # ascending
        sigma = eigenvalues.flip(0).clamp_min(0).sqrt()
        k = choose_rank(sigma, total_energy, tau, cap)
        W = vectors.flip(1)[:, :k].to(V.dtype)
        if k < len(sigma):
            ritz_right = Q @ W  # the top-k Ritz vectors r_i, for the bound and, if accepted, for R
            if _converged(ritz_right, backs @ W, sigma, k):
                # Rayleigh-Ritz on the k accepted right vectors: U orthonormal to working precision
                U, sigma_k, Wh = torch.linalg.svd(Y @ W, full_matrices=False)
                return U, sigma_k, ritz_right @ Wh.T
        if width + block > max_width:
            return None
        for _ in range(2):  # classical Gram-Schmidt, twice: float32 keeps the basis orthonormal
            back = back - Q @ (Q.T @ back)
        new_Q = torch.linalg.qr(back)[0]


def _converged(ritz_right: torch.Tensor, back_w: torch.Tensor, sigma: torch.Tensor, k: int) -> bool:
    """Wedin's bound on the top-k Ritz vectors' angle, ``||V^T u_i - s_i r_i|| / (s_k - s_k+1)``, is small.

    ``ritz_right``: the vectors ``r_i = Q w_i``; ``back_w``: ``(V^T V Q) w_i``.
    """
    gap = float(sigma[k - 1] - sigma[k])
    if gap <= 0:
        return False
    s = sigma[:k].to(ritz_right.dtype)
    # V r_i = s_i u_i exactly, and V^T u_i = (V^T V Q) w_i / s_i
    residual = back_w / s - ritz_right * s
    return float(torch.linalg.matrix_norm(residual, 2)) <= math.sin(math.radians(KRYLOV_TOLERANCE_DEG)) * gap


def choose_rank(sigma: torch.Tensor, total_energy: float, tau: float, max_rank: int) -> int:
    """Smallest k whose top-k energy reaches ``tau * ||V||_F^2``, capped at ``max_rank`` (at least 1)."""
    if total_energy <= 0:
        return 1
    cumulative = torch.cumsum(sigma.double() ** 2, dim=0)
    reached = torch.nonzero(cumulative >= tau * total_energy)
    k = int(reached[0]) + 1 if len(reached) else len(sigma)
    return max(1, min(k, max_rank))


@dataclass(frozen=True)
class ModuleBasis:
    """One module's subspace: ``U: m x k``, ``R: n x k`` orthonormal, ``sigma`` descending."""

    U: torch.Tensor
    R: torch.Tensor
    sigma: torch.Tensor
    total_energy: float
    # sha256 (hex) of the module's weight in each checkpoint, {"base": ..., "aligned": ...}, when known
    sha256: dict | None = None
    # the same for the weights' sampled rows (``checkpoint.sample_digest``): a cheap check of the model
    samples: dict | None = None

    @property
    def k(self) -> int:
        return self.U.shape[1]

    @property
    def energy_captured(self) -> float:
        """Fraction of ``||V||_F^2`` the top-k singular values capture."""
        if self.total_energy <= 0:
            return 0.0
        return float(torch.sum(self.sigma.double() ** 2)) / self.total_energy


def module_basis(V: torch.Tensor, settings: SubspaceSettings, total_energy: float | None = None) -> ModuleBasis:
    """The subspace of one module's displacement, rank chosen per ``settings``.

    ``total_energy``: ``||V||_F^2`` when the caller has it already (``displacement_energy(V)``).
    """
    V = V.float()
    total = displacement_energy(V) if total_energy is None else total_energy
    sketch = {"oversample": settings.oversample, "power_iters": settings.power_iters, "seed": settings.seed}
    if settings.rank is not None:
        U, sigma, R = randomized_svd(V, settings.rank, **sketch)
    else:
        U, sigma, R = adaptive_svd(V, total, settings.energy, settings.max_rank, **sketch)
    return ModuleBasis(U.contiguous(), R.contiguous(), sigma.contiguous(), total)


def displacement_energy(V: torch.Tensor, run: int = 256) -> float:
    """``||V||_F^2`` to about 1e-8 relative, at the cost of one float32 pass over V.

    The float32 norm of a run of 256 entries is accurate (few terms each), and the runs' squares
    are summed in float64: cheaper than squaring a float64 copy (no copy is made), and far more
    accurate than one float32 norm of the whole matrix, whose error grows with its size. Where float32
    squares would overflow or underflow (entries beyond about 1e19 or below 1e-19) the sum is taken
    in float64. Not finite when V is not.
    """
    flat = V.reshape(-1)
    cut = flat.numel() - flat.numel() % run
    runs = torch.linalg.vector_norm(flat[:cut].view(-1, run), dim=1).double()
    energy = float(torch.sum(runs * runs) + torch.sum(flat[cut:].double() ** 2))
    if math.isfinite(energy) and energy >= FLOAT32_SAFE_SQUARES * flat.numel():
        return energy
    if energy == 0 and not bool(flat.any()):  # a module alignment left alone: no float64 pass for a zero
        return 0.0
    return _float64_energy(V)


FLOAT32_SAFE_SQUARES = 1e-30  # a mean square below this has lost digits to float32 underflow


def _float64_energy(V: torch.Tensor, rows: int = 1024) -> float:
    """Exact ``||V||_F^2`` accumulated in float64 without a float64 copy of the whole matrix."""
    # square_ in place on the float64 chunk: same values as ``** 2`` without a second chunk-sized buffer
    return math.fsum(float(torch.sum(V[i : i + rows].double().square_())) for i in range(0, V.shape[0], rows))
