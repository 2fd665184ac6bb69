"""Independent dense implementations of docs/method.md, for small matrices only."""

from __future__ import annotations

import torch


def projectors(U: torch.Tensor, R: torch.Tensor):
    P_L = U @ U.T
    P_R = R @ R.T
    return P_L, torch.eye(U.shape[0], dtype=U.dtype) - P_L, P_R, torch.eye(R.shape[0], dtype=R.dtype) - P_R


def parts(dW, U, R):
    P_L, Q_L, P_R, Q_R = projectors(U, R)
    F = P_L @ dW @ P_R
    H = P_L @ dW @ Q_R + Q_L @ dW @ P_R
    O = Q_L @ dW @ Q_R
    return F, H, O


def energies(dW, U, R):
    F, H, O = parts(dW, U, R)
    e = float(torch.sum(dW**2))
    return [float(torch.sum(X**2)) / e for X in (F, H, O)]


def csulora_dense(dW, U, R, lam):
    F, H, O = parts(dW, U, R)
    _, rho_h, rho_o = energies(dW, U, R)
    return F + H / (1 + lam * rho_h) + O / (1 + lam * rho_o)


def csulora_dir_dense(dW, U, lam):
    u, sigma, vh = torch.linalg.svd(dW, full_matrices=False)
    P_L = U @ U.T
    out = torch.zeros_like(dW)
    for i in range(len(sigma)):
        if sigma[i] <= 1e-12 * sigma[0]:
            continue
        ui = u[:, i]
        rho = float(torch.sum((U.T @ ui) ** 2))
        kappa = 1 / (1 + lam * (1 - rho))
        in_part = P_L @ ui
        out += sigma[i] * torch.outer(in_part + kappa * (ui - in_part), vh[i])
    return out


def safelora_dense(B, A, scale, V):
    C = V @ V.T / torch.linalg.matrix_norm(V)
    dW = scale * B @ A
    projected = scale * (C @ B) @ A
    cosine = float(torch.sum(projected * dW) / (torch.linalg.matrix_norm(projected) * torch.linalg.matrix_norm(dW)))
    return projected, cosine


def best_rank(M, r):
    u, s, vh = torch.linalg.svd(M, full_matrices=False)
    approx = (u[:, :r] * s[:r]) @ vh[:r]
    return approx, float(torch.linalg.matrix_norm(M - approx) / torch.linalg.matrix_norm(M))


def orthonormal(rows, cols, generator):
    Q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return Q


def signed_overlap_dense(dW, U, R, sigma):
    """The cosine of dW with V_k = U diag(sigma) R^T, and e_F split by the sign of each direction's coordinate.

    Each singular direction of V_k is the unit rank-one matrix u_i r_i^T; F's coordinate along it is
    <dW, u_i r_i^T>_F. Returns (cosine, agreeing, opposing, cross) with the three shares of e_F.
    """
    V_k = U @ torch.diag(sigma) @ R.T
    norms = torch.linalg.matrix_norm(dW) * torch.linalg.matrix_norm(V_k)
    cosine = float(torch.sum(dW * V_k) / norms) if norms > 0 else 0.0
    F, _, _ = parts(dW, U, R)
    e_f = float(torch.sum(F**2))
    agree = oppose = 0.0
    for i in range(U.shape[1]):
        c = float(torch.sum(dW * torch.outer(U[:, i], R[:, i])))
        if c * float(sigma[i]) > 0:
            agree += c * c
        elif c * float(sigma[i]) < 0:
            oppose += c * c
    if e_f == 0:
        return cosine, 0.0, 0.0, 0.0
    return cosine, agree / e_f, oppose / e_f, (e_f - agree - oppose) / e_f


def reversing_part_dense(dW, U, R, sigma):
    """F_-: the sum over directions with <dW, u_i r_i^T> sigma_i < 0 of that coordinate times u_i r_i^T."""
    out = torch.zeros_like(dW)
    for i in range(U.shape[1]):
        direction = torch.outer(U[:, i], R[:, i])
        c = float(torch.sum(dW * direction))
        if c * float(sigma[i]) < 0:
            out += c * direction
    return out


def csulora_signed_dense(dW, U, R, sigma, lam, weight):
    """csulora's result with F_- shrunk to F_- / (1 + lam weight)."""
    shrink = 1 - 1 / (1 + lam * weight)
    return csulora_dense(dW, U, R, lam) - shrink * reversing_part_dense(dW, U, R, sigma)
