"""Numerics of the Larimar memory: float64 truncated pseudo-inverses, ridge solves, the noise floor of a forget
(`bitmar.memory.larimar`'s docstring says why each is needed)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor


def work_dtype(device: torch.device) -> torch.dtype:
    """Dtype of every least-squares solve: float64 keeps the cutoff far above rounding noise; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast would run the solves in bf16/fp16 (useless precision): switch it off inside the memory."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def gram_pinv(G: Tensor, rcond: float) -> Tensor:
    """Truncated pseudo-inverse of a symmetric PSD Gram matrix G = A A^T (d, d); rcond is relative to sigma_max(A)."""
    G = 0.5 * (G + G.mT)  # exact symmetry for the Hermitian eigensolver
    rtol = rcond * rcond  # eigenvalues are sigma^2
    if G.dtype != torch.float64:  # float32 fallback (MPS): never cut below the rounding noise of the Gram matrix
        rtol = max(rtol, torch.finfo(G.dtype).eps * G.shape[-1])
    return torch.linalg.pinv(G, rtol=rtol, hermitian=True)


FORGET_NOISE = 64.0  # noise floor of a forget, in eps * ||C_before||_F (the residue measures <= 0.4 of that)


def clean_solve(C: Tensor, B: Tensor, rcond: float, floor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(M = C^+ B, C, B) with C's eigen-directions below max(rcond^2 lambda_max, floor) removed from all three.

    Used after forgetting: those directions hold only the rounding residue of what was subtracted, and keeping them in
    the statistics would bring it back at the next solve.  Masks instead of indexing: no host sync."""
    G = 0.5 * (C + C.mT)  # (K, K)
    lam, V = torch.linalg.eigh(G)  # ascending
    cut = torch.maximum(rcond * rcond * lam[-1].clamp_min(0.0), floor)
    keep = lam > cut  # (K,)
    Vk = V * keep.to(V.dtype)  # (K, K) kept eigenvectors, zero columns elsewhere
    VtB = Vk.mT @ B  # (K, C)
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    memory = Vk @ (inv[:, None] * VtB)  # (K, C) = C^+ B
    return memory, (Vk * lam) @ Vk.mT, Vk @ VtB


def svd_rcond(A: Tensor, rcond: float) -> float:
    # float32 SVD cannot resolve singular values below ~eps * dim * sigma_max: never cut below that noise floor
    return max(rcond, torch.finfo(A.dtype).eps * max(A.shape))


def pinv_right(X: Tensor, A: Tensor, rcond: float) -> Tensor:
    """X A^+ for X (n, q), A (p, q) -> (n, p), using the smaller Gram matrix of A (well conditioned in float64)."""
    if X.dtype != torch.float64:
        return X @ torch.linalg.pinv(A, rtol=svd_rcond(A, rcond))  # (n, p)
    p, q = A.shape
    if p <= q:  # A^+ = A^T (A A^T)^+
        return (X @ A.mT) @ gram_pinv(A @ A.mT, rcond)  # (n, p)
    return (X @ gram_pinv(A.mT @ A, rcond)) @ A.mT  # A^+ = (A^T A)^+ A^T ; (n, p)


def ridge_right(X: Tensor, A: Tensor, rcond: float) -> Tensor:
    """X A^+ for a matrix A (p, q) of full rank min(p, q) (the learned prior), via Cholesky of its smaller Gram matrix
    with a relative ridge (rcond^2 * trace): several times cheaper than an eigendecomposition, and exactness of the
    memory does not depend on it (write_kv and read_kv share this very addressing; read's projection holds for any
    full-rank addressing).  A rank-deficient A only gets its null directions damped, never NaN."""
    if X.dtype != torch.float64:
        return pinv_right(X, A, rcond)  # float32 Cholesky cannot take a 1e-12 ridge: truncated SVD instead
    p, q = A.shape
    G = A @ A.mT if p <= q else A.mT @ A  # (d, d), d = min(p, q)
    lam = rcond * rcond * G.diagonal().sum() + torch.finfo(G.dtype).tiny  # relative to trace: far above f64 noise
    # cholesky_ex: no host sync on CUDA; with this ridge G + lam I is positive definite by a 1e-12 relative margin
    L, _ = torch.linalg.cholesky_ex(G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device))  # (d, d)
    if p <= q:  # X A^T (A A^T)^-1
        return torch.cholesky_solve((X @ A.mT).mT, L).mT  # (n, p)
    return torch.cholesky_solve(X.mT, L).mT @ A.mT  # X (A^T A)^-1 A^T ; (n, p)


def pinv_left(A: Tensor, Y: Tensor, rcond: float) -> Tensor:
    """A^+ Y for A (p, q), Y (p, r) -> (q, r): the minimum-norm least-squares solution of A X = Y."""
    if Y.dtype != torch.float64:
        return torch.linalg.pinv(A, rtol=svd_rcond(A, rcond)) @ Y  # (q, r)
    p, q = A.shape
    if p <= q:
        return A.mT @ (gram_pinv(A @ A.mT, rcond) @ Y)  # (q, r)
    return gram_pinv(A.mT @ A, rcond) @ (A.mT @ Y)  # (q, r)
