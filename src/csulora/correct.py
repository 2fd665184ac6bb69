"""The CSULoRA closed form and its relatives, in factored form.

Pure functions on tensors: no I/O, no global state. A LoRA update is ``dW = scale * B @ A`` with
``B: m x r`` and ``A: r x n``; a subspace is ``U: m x k`` (left, output side) and ``R: n x k``
(right, input side), both with orthonormal columns. Nothing here forms an ``m x n`` or ``m x m``
matrix: every product is with ``r``- or ``k``-wide factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .errors import CsuloraError


@dataclass(frozen=True)
class LoraFactors:
    """One module's update ``dW = scale * B @ A``."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    def dense(self) -> torch.Tensor:
        """The ``m x n`` update; for tests and tiny models only."""
        return self.scale * self.B @ self.A


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: ``torch.isfinite(tensor).all()`` at a fraction of its cost.

    A finite sum proves it (NaN and Inf propagate through a sum; +Inf and -Inf sum to NaN); only a
    non-finite sum, which finite values can also give by overflowing, needs the element-wise test.
    """
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


def frobenius_sq(B: torch.Tensor, A: torch.Tensor) -> float:
    """``||B @ A||_F^2`` through the r x r Gram matrices: ``tr((B^T B)(A A^T))``."""
    return float(torch.sum((B.T @ B) * (A @ A.T)))


def frobenius_inner(x: LoraFactors, y: LoraFactors) -> float:
    """``<s_x B_x A_x, s_y B_y A_y>_F = s_x s_y tr((B_x^T B_y)(A_y A_x^T))``: an r_x x r_y product, no m x n.

    In float64 whatever the factors' dtype, so that ``<x, y>^2 = ||x||^2 ||y||^2`` can be told to 1e-12.
    """
    gram_b = x.B.double().T @ y.B.double()
    gram_a = y.A.double() @ x.A.double().T
    return x.scale * y.scale * float(torch.sum(gram_b * gram_a.T))


@dataclass(frozen=True)
class Decomposition:
    """``dW = F + H + O`` split in factored form, with the energy of each part.

    ``F = s B_in A_in``, ``H = s (B_in A_out + B_out A_in)``, ``O = s B_out A_out``; the four factors
    are formed on first use, since the energies alone need only ``k x r`` products.
    """

    lora: LoraFactors
    U: torch.Tensor
    R: torch.Tensor
    C: torch.Tensor  # U^T B, k x r: B_in = U C
    D: torch.Tensor  # A R, r x k: A_in = D R^T
    e_f: float
    e_h: float
    e_o: float

    @property
    def scale(self) -> float:
        return self.lora.scale

    @cached_property
    def B_in(self) -> torch.Tensor:
        return self.U @ self.C

    @cached_property
    def A_in(self) -> torch.Tensor:
        return self.D @ self.R.T

    @property
    def B_out(self) -> torch.Tensor:
        return self.lora.B - self.B_in

    @property
    def A_out(self) -> torch.Tensor:
        return self.lora.A - self.A_in

    @property
    def energy(self) -> float:
        return self.e_f + self.e_h + self.e_o

    def _relative(self, e: float) -> float:
        return e / self.energy if self.energy > 0 else 0.0

    @property
    def rho_f(self) -> float:
        return self._relative(self.e_f)

    @property
    def rho_h(self) -> float:
        return self._relative(self.e_h)

    @property
    def rho_o(self) -> float:
        return self._relative(self.e_o)


def decompose(lora: LoraFactors, U: torch.Tensor, R: torch.Tensor) -> Decomposition:
    """Split the update into fully aligned, partially aligned and off-subspace parts.

    ``B_in = U U^T B`` and ``A_in = A R R^T``; the parts are Frobenius-orthogonal because
    ``B_in^T B_out = 0`` and ``A_in A_out^T = 0``, so their energies add up to the total. With
    ``C = U^T B`` the Gram matrices are ``B_in^T B_in = C^T C`` and ``B_out^T B_out = B^T B - C^T C``
    (likewise for A with ``D = A R``): r x r and k x r work instead of passes over the m x r factors.
    """
    B, A = lora.B, lora.A
    _check_subspace_shapes(B, A, U, R)
    C, D = U.T @ B, A @ R
    gram_b_in, gram_a_in = C.T @ C, D @ D.T
    gram_b_out, gram_a_out = B.T @ B - gram_b_in, A @ A.T - gram_a_in
    s2 = lora.scale**2
    e_f = s2 * float(torch.sum(gram_b_in * gram_a_in))
    e_h = s2 * (float(torch.sum(gram_b_in * gram_a_out)) + float(torch.sum(gram_b_out * gram_a_in)))
    e_o = s2 * float(torch.sum(gram_b_out * gram_a_out))
    # a difference of Gram matrices can round below zero when a part is (nearly) empty, and more
    # so with a float32 basis that is orthonormal only to ~1e-7: an energy is never negative
    return Decomposition(lora, U, R, C, D, max(e_f, 0.0), max(e_h, 0.0), max(e_o, 0.0))


def _check_subspace_shapes(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, R: torch.Tensor) -> None:
    if U.shape[0] != B.shape[0] or R.shape[0] != A.shape[1]:
        raise CsuloraError(
            f"subspace of shape U {tuple(U.shape)}, R {tuple(R.shape)} does not fit a LoRA update of "
            f"shape {B.shape[0]} x {A.shape[1]}"
        )


def attenuation(lam: float, rho: float) -> float:
    """``kappa = 1 / (1 + lam * rho)``; ``lam = inf`` is the hard projection (kappa 0 unless rho 0)."""
    if math.isinf(lam):
        return 1.0 if rho == 0 else 0.0
    return 1.0 / (1.0 + lam * rho)


@dataclass(frozen=True)
class Corrected:
    """A corrected module: its new factors and what the report says about it."""

    lora: LoraFactors
    info: dict


def _check_lam(lam: float) -> None:
    if lam < 0 or math.isnan(lam):
        raise CsuloraError(f"lam must be >= 0, got {lam}")


def csulora_update(lora: LoraFactors, U: torch.Tensor, R: torch.Tensor, lam: float) -> Corrected:
    """The closest safe update ``F + kappa_H H + kappa_O O`` as a LoRA of rank at most 2r.

    ``dW* = s (B_in + kH B_out)(A_in + kH A_out) + s (kO - kH^2) B_out A_out`` exactly, so
    ``B' = [B_in + kH B_out, (kO - kH^2) B_out]`` and ``A' = [A_in + kH A_out ; A_out]``.
    The second block is dropped when its coefficient is zero (``lam = 0``: the adapter itself).
    """
    _check_lam(lam)
    d = decompose(lora, U, R)
    k_h, k_o = attenuation(lam, d.rho_h), attenuation(lam, d.rho_o)
    info = _decomposition_info(d) | {"kappa_h": k_h, "kappa_o": k_o}
    if lam == 0:
        return Corrected(lora, info)
    # written straight into the new factors: no concatenated copy
    r, coef = lora.rank, k_o - k_h**2
    width = r if coef == 0 else 2 * r
    B_out, A_out = d.B_out, d.A_out
    B_new, A_new = B_out.new_empty(B_out.shape[0], width), A_out.new_empty(width, A_out.shape[1])
    torch.add(d.B_in, B_out, alpha=k_h, out=B_new[:, :r])
    torch.add(d.A_in, A_out, alpha=k_h, out=A_new[:r])
    if coef != 0:
        torch.mul(B_out, coef, out=B_new[:, r:])
        A_new[r:] = A_out
    return Corrected(LoraFactors(B_new, A_new, lora.scale), info)


def corrected_energy(d: Decomposition, k_h: float, k_o: float) -> float:
    """``||F + kH H + kO O||_F^2``: the parts are orthogonal, so no product is needed."""
    return d.e_f + k_h**2 * d.e_h + k_o**2 * d.e_o


def project_update(lora: LoraFactors, U: torch.Tensor, R: torch.Tensor) -> Corrected:
    """Hard two-sided projection onto the fully aligned part ``F = s B_in A_in`` (rank kept)."""
    d = decompose(lora, U, R)
    info = _decomposition_info(d) | {"kappa_h": 0.0, "kappa_o": 0.0}
    return Corrected(LoraFactors(d.B_in, d.A_in, lora.scale), info)


def scale_update(lora: LoraFactors, factor: float) -> Corrected:
    """The whole update times one factor (folded into B, so the adapter's scaling is unchanged)."""
    return Corrected(LoraFactors(factor * lora.B, lora.A, lora.scale), {"factor": factor})


def thin_svd(lora: LoraFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``B @ A = u diag(sigma) v^T`` from a QR of each factor and an r x r SVD (scale excluded)."""
    Q_b, R_b = torch.linalg.qr(lora.B)
    Q_a, R_a = torch.linalg.qr(lora.A.T)
    U_c, sigma, Vh_c = torch.linalg.svd(R_b @ R_a.T)
    return Q_b @ U_c, sigma, Q_a @ Vh_c.T


def csulora_dir_update(lora: LoraFactors, U: torch.Tensor, R: torch.Tensor, lam: float) -> Corrected:
    """Per-direction variant: keep each singular direction's in-subspace part, shrink the rest.

    ``dW* = sum_i sigma_i (P_L u_i + kappa_i Q_L u_i) v_i^T`` with ``rho_i = ||U^T u_i||^2`` and
    ``kappa_i = 1 / (1 + lam (1 - rho_i))``. Rank r exactly.
    """
    _check_lam(lam)
    d = decompose(lora, U, R)
    u, sigma, v = thin_svd(lora)
    u_in = U @ (U.T @ u)
    rho = torch.sum(u_in * u_in, dim=0).clamp(0.0, 1.0)
    if math.isinf(lam):
        kappa = (rho >= 1.0).to(u.dtype)
    else:
        kappa = 1.0 / (1.0 + lam * (1.0 - rho))
    B_new = (u_in + kappa * (u - u_in)) * sigma
    info = _decomposition_info(d) | {
        "kappa_h": None,
        "kappa_o": None,
        "rho_dir": [round(float(x), 6) for x in rho],
        "kappa_dir": [round(float(x), 6) for x in kappa],
    }
    return Corrected(LoraFactors(B_new, v.T.contiguous(), lora.scale), info)


def safelora_candidate(lora: LoraFactors, V: torch.Tensor) -> Corrected:
    """Safe LoRA's projected candidate ``B' = C B`` with ``C = V V^T / ||V||_F``, and the cosine.

    ``C B`` is computed as ``V (V^T B) / ||V||_F``: no ``m x m`` matrix. The cosine is the Frobenius
    cosine similarity of ``C dW`` and ``dW`` (the scale cancels).
    """
    B, A = lora.B, lora.A
    if V.shape != (B.shape[0], A.shape[1]):
        raise CsuloraError(
            f"alignment matrix of shape {tuple(V.shape)} does not fit a LoRA update of shape "
            f"{B.shape[0]} x {A.shape[1]}"
        )
    norm_v = torch.linalg.matrix_norm(V)
    B_proj = V @ (V.T @ B) / norm_v if norm_v > 0 else torch.zeros_like(B)
    gram_a = A @ A.T
    inner = float(torch.sum((B_proj.T @ B) * gram_a))
    denom = math.sqrt(max(frobenius_sq(B_proj, A), 0.0) * max(frobenius_sq(B, A), 0.0))
    cosine = inner / denom if denom > 0 else 0.0
    return Corrected(LoraFactors(B_proj, A, lora.scale), {"cosine": cosine})


def truncate_to_rank(lora: LoraFactors, rank: int) -> tuple[LoraFactors, float]:
    """Best rank-``rank`` approximation of ``s B A`` and its relative Frobenius truncation error.

    From ``thin_svd`` (QR of both factors, SVD of the small core); singular values are split evenly
    (square roots) between B and A.
    """
    if lora.rank <= rank:
        return lora, 0.0
    u, sigma, v = thin_svd(lora)
    total = float(torch.sum(sigma**2))
    dropped = float(torch.sum(sigma[rank:] ** 2))
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    root = torch.sqrt(sigma[:rank])
    B_new = u[:, :rank] * root
    A_new = (root[:, None] * v[:, :rank].T).contiguous()
    return LoraFactors(B_new, A_new, lora.scale), error


def _decomposition_info(d: Decomposition) -> dict:
    return {
        "energy": d.energy,
        "rho_f": d.rho_f,
        "rho_h": d.rho_h,
        "rho_o": d.rho_o,
    }


# -- the signed overlap with the alignment ----------------------------------------------------------
@dataclass(frozen=True)
class SignedOverlap:
    """How an update lies along (+) or against (-) the alignment ``V_k = U diag(sigma) R^T`` (docs/method.md).

    ``coordinates`` are ``c_i = u_i^T dW r_i``, the update's coordinate along each singular direction
    ``u_i r_i^T`` of ``V_k`` (the diagonal of ``U^T dW R``); ``e_agree`` / ``e_oppose`` sum ``c_i^2``
    over the directions where ``c_i sigma_i`` is positive / negative, and ``e_cross`` is the rest of
    ``e_F`` (the off-diagonal coordinates, and directions with ``sigma_i = 0``), orthogonal to ``V_k``.
    """

    energy: float  # e = ||dW||_F^2
    e_f: float  # ||F||_F^2 = e_agree + e_oppose + e_cross
    e_agree: float
    e_oppose: float
    e_cross: float
    signed_overlap: float  # <dW, V_k>_F / (||dW||_F ||V_k||_F), in [-1, 1]
    coordinates: torch.Tensor | None = None  # c_i per direction (None for a sum over modules)
    sigma: torch.Tensor | None = None

    def _of_f(self, e: float) -> float:
        total = self.e_agree + self.e_oppose + self.e_cross
        return e / total if total > 0 else 0.0

    @property
    def opposing_share(self) -> float:
        """The share of ``e_F`` along directions of V with the opposite sign: 1 for ``dW = -c V_k``."""
        return self._of_f(self.e_oppose)

    @property
    def agreeing_share(self) -> float:
        return self._of_f(self.e_agree)

    @property
    def cross_share(self) -> float:
        return self._of_f(self.e_cross)

    @property
    def rho_opposing(self) -> float:
        """``e_oppose / e``: the share of the whole update that reverses V (csulora keeps it whole)."""
        return self.e_oppose / self.energy if self.energy > 0 else 0.0

    def direction_shares(self) -> list[float]:
        """Per direction of V, ``sign(c_i sigma_i) c_i^2 / e_F``: negative where it reverses V."""
        if self.coordinates is None or self.sigma is None:
            return []
        c, total = self.coordinates, self.e_agree + self.e_oppose + self.e_cross
        signed = torch.sign(c * self.sigma) * c * c / total if total > 0 else torch.zeros_like(c)
        return [round(float(x), 6) for x in signed]

    def scaled(self, factor_sq: float) -> SignedOverlap:
        """The figures of the update times a factor ``c >= 0`` (``factor_sq = c^2``): only energies change."""
        if factor_sq == 0:
            return SignedOverlap(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        root = math.sqrt(factor_sq)
        return SignedOverlap(
            self.energy * factor_sq,
            self.e_f * factor_sq,
            self.e_agree * factor_sq,
            self.e_oppose * factor_sq,
            self.e_cross * factor_sq,
            self.signed_overlap,
            None if self.coordinates is None else self.coordinates * root,
            self.sigma,
        )


def signed_overlap(
    lora: LoraFactors, U: torch.Tensor, R: torch.Tensor, sigma: torch.Tensor, d: Decomposition | None = None
) -> SignedOverlap:
    """The update's signed overlap with ``V_k = U diag(sigma) R^T`` and the sign split of ``e_F``.

    Factored: with ``C = U^T B`` (k x r) and ``D = A R`` (r x k), ``U^T dW R = s C D``, whose diagonal
    ``c_i = s sum_j C_ij D_ji`` costs k r; ``<dW, V_k>_F = sum_i sigma_i c_i`` and ``||V_k||_F = ||sigma||``.
    ``d``: the update's decomposition against the same ``U``, ``R`` when the caller has it.
    """
    if sigma.dim() != 1 or sigma.shape[0] != U.shape[1]:
        raise CsuloraError(f"sigma of shape {tuple(sigma.shape)} does not fit a subspace of k = {U.shape[1]}")
    if d is None:
        if lora.B.dtype != U.dtype:  # e.g. a result stored in float32 against a float64 basis
            lora = LoraFactors(lora.B.to(U.dtype), lora.A.to(U.dtype), lora.scale)
        d = decompose(lora, U, R)
    sigma = sigma.to(d.C.dtype)
    c = lora.scale * torch.sum(d.C * d.D.T, dim=1)
    along = c * sigma
    e_agree = float(torch.sum(torch.where(along > 0, c * c, 0.0)))
    e_oppose = float(torch.sum(torch.where(along < 0, c * c, 0.0)))
    # e_F comes from Gram matrices, the diagonal from the coordinates: rounding may put the rest below 0
    e_cross = max(d.e_f - e_agree - e_oppose, 0.0)
    norm_v = float(torch.linalg.vector_norm(sigma))
    denominator = math.sqrt(d.energy) * norm_v
    cosine = float(torch.sum(along)) / denominator if denominator > 0 else 0.0
    return SignedOverlap(d.energy, d.e_f, e_agree, e_oppose, e_cross, min(max(cosine, -1.0), 1.0), c, sigma)


def combined_overlap(parts: list[SignedOverlap]) -> SignedOverlap:
    """The figures of several modules together: energies add, the signed overlap is energy-weighted.

    The shares of the sum are therefore e_F-weighted means of the modules' shares (docs/method.md).
    """
    energy = sum(p.energy for p in parts)
    weighted = sum(p.energy * p.signed_overlap for p in parts) / energy if energy > 0 else 0.0
    return SignedOverlap(
        energy,
        sum(p.e_f for p in parts),
        sum(p.e_agree for p in parts),
        sum(p.e_oppose for p in parts),
        sum(p.e_cross for p in parts),
        weighted,
    )


def csulora_signed_update(
    lora: LoraFactors, U: torch.Tensor, R: torch.Tensor, sigma: torch.Tensor, lam: float, weight: float
) -> Corrected:
    """csulora, with the part of F that reverses V along its singular directions shrunk as well.

    ``dW* = csulora(dW) - (1 - kappa_-) F_-`` with ``F_- = sum over i with c_i sigma_i < 0 of
    c_i u_i r_i^T`` and ``kappa_- = 1 / (1 + lam weight)``: the closed-form minimiser of csulora's
    objective plus ``lam weight ||F_-(X)||^2``, the rest of F held fixed (docs/method.md). Exactly a
    LoRA of rank at most ``2r + |S_-|``: csulora's factors, then ``B_x = -(1 - kappa_-) / s U_S diag(c_S)``,
    ``A_x = R_S^T`` (``S_-``: the reversing directions).
    """
    _check_lam(lam)
    d = decompose(lora, U, R)
    overlap = signed_overlap(lora, U, R, sigma, d)
    base = csulora_update(lora, U, R, lam)
    k_minus = attenuation(lam, weight)
    assert overlap.coordinates is not None and overlap.sigma is not None
    reversing = torch.nonzero(overlap.coordinates * overlap.sigma < 0).flatten()
    info = base.info | {"kappa_opposing": k_minus, "opposing_directions": len(reversing)}
    if k_minus == 1.0 or len(reversing) == 0:
        return Corrected(base.lora, info)
    c = overlap.coordinates[reversing]
    B_x = U[:, reversing] * (-(1.0 - k_minus) / lora.scale * c).to(U.dtype)
    A_x = R[:, reversing].T
    B_new = torch.cat([base.lora.B, B_x.to(base.lora.B.dtype)], dim=1)
    A_new = torch.cat([base.lora.A, A_x.to(base.lora.A.dtype)], dim=0)
    return Corrected(LoraFactors(B_new, A_new, lora.scale), info)
