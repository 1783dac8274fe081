"""Subspace linear algebra for SPEC §4: rank-detected orthonormal bases, PCA, angles."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "BASIS_ORTHONORMAL_TOL",
    "DEFAULT_RTOL",
    "orthonormalize",
    "top_eigenvectors",
    "numerical_rank",
    "pca_basis",
    "uncentered_basis",
    "left_basis",
    "right_basis",
    "bottom_right_basis",
    "project_out",
    "remove_subspace",
    "complement",
    "union_basis",
    "principal_angles",
    "shared_directions",
    "chance_cosine",
    "overlap",
    "effective_rank",
    "validate_basis",
]

BASIS_ORTHONORMAL_TOL = 1e-4  # SPEC §6 claim 1: ‖BᵀB − I‖_max of a valid basis (float32)

# Relative singular-value tolerance for "does the data support this direction" (SPEC §4, Rank).
DEFAULT_RTOL = 1e-5

# A long side this many times the short side makes the Gram-matrix route cheaper than a full SVD.
_GRAM_ASPECT = 2


def _f64(t: Tensor) -> Tensor:
    """``t`` in float64 for rank decisions; MPS has no float64, so those go through the CPU."""
    if t.device.type == "mps":
        return t.detach().to("cpu", torch.float64)
    return t.detach().to(torch.float64)


def _out_dtype(t: Tensor) -> torch.dtype:
    """Float dtype to return bases in: the input's if floating, else float32."""
    return t.dtype if t.is_floating_point() else torch.float32


def _check_matrix(M: object, name: str) -> Tensor:
    if not isinstance(M, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(M).__name__}; "
            "convert it with torch.as_tensor"
        )
    if M.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(M.shape)}; reshape it to a matrix")
    n_bad = int((~torch.isfinite(M)).sum()) if M.is_floating_point() else 0
    if n_bad:
        raise ValueError(
            f"{name} has {n_bad} non-finite entries; "
            "clean the input (NaN/inf) before building a basis"
        )
    return M


def _check_same_d(A: Tensor, B: Tensor, na: str, nb: str) -> None:
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"{na} has {A.shape[0]} rows but {nb} has {B.shape[0]}; both must live in the same R^d"
        )


def _check_k(k: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"{name} must be >= 0, got {k}")
    return k


def _n_supported(s: Tensor, rtol: float, atol: float = 0.0) -> int:
    """Count of singular values (descending ``s``) above ``max(rtol * s_max, atol)``; 0 if all 0."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    thresh = max(rtol * float(s[0]), atol)
    return int((s > thresh).sum())


def _left_svd(M: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors and values (descending) of ``M`` [d, m] in float64."""
    M64 = _f64(M)
    d, m = M64.shape
    if m >= _GRAM_ASPECT * d:
        # Wide matrix: eigh of the d×d Gram MMᵀ is much cheaper than an SVD;
        # float64 keeps σ² resolvable down to rtol².
        evals, evecs = torch.linalg.eigh(M64 @ M64.T)
        s = evals.flip(0).clamp_min(0.0).sqrt()
        return evecs.flip(1), s
    U, s, _ = torch.linalg.svd(M64, full_matrices=False)
    return U, s


def _right_svd(M: Tensor) -> tuple[Tensor, Tensor]:
    """Right singular vectors (as columns) and values (descending) of ``M`` [m, d] in float64."""
    V, s = _left_svd(M.T)
    return V, s


def orthonormalize(M: Tensor, rtol: float = DEFAULT_RTOL, *, atol: float = 0.0) -> Tensor:
    """Orthonormal basis [d, r] of the column space of ``M`` [d, m].

    Rank detection: keeps left singular vectors whose singular value exceeds
    ``max(rtol * s_max, atol)``. A zero matrix gives shape [d, 0]. Pass ``atol`` when the
    natural scale is known (e.g. 1 for a projected orthonormal basis), so that pure rounding
    noise is not promoted to a direction.
    """
    M = _check_matrix(M, "M")
    U, s = _left_svd(M)
    r = _n_supported(s, rtol, atol)
    return U[:, :r].to(device=M.device, dtype=_out_dtype(M)).contiguous()


def top_eigenvectors(C: Tensor, k: int) -> Tensor:
    """The k eigenvectors of a symmetric (possibly indefinite) d×d C with the largest
    eigenvalues, float32 [d, k]: by Ky Fan they maximise tr(BᵀCB) over orthonormal rank-k B."""
    C = _check_matrix(C, "C")
    if C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square (d×d), got shape {tuple(C.shape)}")
    k = min(_check_k(k), int(C.shape[0]))
    C64 = _f64(C)
    _, evecs = torch.linalg.eigh((C64 + C64.T) / 2)
    return evecs.flip(1)[:, :k].to(_out_dtype(C)).contiguous()


def numerical_rank(M: Tensor, rtol: float = DEFAULT_RTOL) -> int:
    """Number of singular values of ``M`` above ``rtol * s_max`` (0 for a zero matrix), float64."""
    M = _check_matrix(M, "M")
    return _n_supported(_left_svd(M)[1], rtol)


def left_basis(M: Tensor, k: int, rtol: float = DEFAULT_RTOL) -> Tensor:
    """Top-k left singular vectors of ``M`` [d, m] → [d, r], r = min(k, supported rank)."""
    M = _check_matrix(M, "M")
    k = _check_k(k)
    U, s = _left_svd(M)
    r = min(k, _n_supported(s, rtol))
    return U[:, :r].to(device=M.device, dtype=_out_dtype(M)).contiguous()


def right_basis(M: Tensor, k: int, rtol: float = DEFAULT_RTOL) -> Tensor:
    """Top-k right singular vectors of ``M`` [m, d] → [d, r], r = min(k, supported rank)."""
    M = _check_matrix(M, "M")
    return left_basis(M.T, k, rtol)


def bottom_right_basis(M: Tensor, k: int) -> Tensor:
    """Bottom-k right singular vectors of ``M`` [m, d] → [d, k]: the directions ``M`` reads least.

    Used for ``logits_null`` (least-read directions of the unembedding). When m < d the
    null space of ``M`` (singular value 0) comes first; no rank detection applies since
    "least read" directions exist for any matrix.
    """
    M = _check_matrix(M, "M")
    k = _check_k(k)
    d = M.shape[1]
    if k > d:
        raise ValueError(f"k={k} exceeds the dimension d={d}; ask for at most {d} directions")
    M64 = _f64(M)
    # Full eigh of the d×d Gram MᵀM, so null-space directions (m < d) are included.
    evals, evecs = torch.linalg.eigh(M64.T @ M64)  # ascending
    return evecs[:, :k].to(device=M.device, dtype=_out_dtype(M)).contiguous()


def pca_basis(X: Tensor, k: int, rtol: float = DEFAULT_RTOL) -> Tensor:
    """PCA of samples ``X`` [n, d] (rows): centered, top-k right singular vectors → [d, r].

    r = min(k, n − 1, #singular values ≥ rtol·s_max): centered data of n samples has rank
    ≤ n − 1, so a builder never returns directions its data does not support.
    """
    X = _check_matrix(X, "X")
    k = _check_k(k)
    n, d = X.shape
    if n < 2:
        return X.new_zeros((d, 0), dtype=_out_dtype(X))
    X64 = _f64(X)
    Xc = X64 - X64.mean(dim=0, keepdim=True)
    V, s = _right_svd(Xc)
    r = min(k, n - 1, _n_supported(s, rtol))
    return V[:, :r].to(device=X.device, dtype=_out_dtype(X)).contiguous()


def uncentered_basis(X: Tensor, k: int, rtol: float = DEFAULT_RTOL) -> Tensor:
    """Uncentered PCA of samples ``X`` [n, d]: top-k right singular vectors, mean *kept* → [d, r].

    The eigenvectors of the second moment XᵀX/n, not of the covariance: for paired differences
    (persona contrasts, labels) the mean is the signal (the diff-in-means direction), and
    centering would remove it. r = min(k, n, supported rank).
    """
    X = _check_matrix(X, "X")
    return right_basis(X, _check_k(k), rtol)


def project_out(M: Tensor, B: Tensor) -> Tensor:
    """(I − BBᵀ)M for ``M`` [d, m] and orthonormal ``B`` [d, j]."""
    M = _check_matrix(M, "M")
    B = _check_matrix(B, "B")
    _check_same_d(B, M, "B", "M")
    B = B.to(M.dtype)
    return M - B @ (B.T @ M)


def remove_subspace(B: Tensor, C: Tensor, rtol: float = DEFAULT_RTOL) -> Tensor:
    """Orthonormal basis of (I − CCᵀ)B, re-orthonormalised with rank detection.

    ``B`` is orthonormal, so its scale is 1: directions whose residual after removing
    span(C) is below ``rtol`` (absolute) are dropped as lying inside span(C).
    """
    B = _check_matrix(B, "B")
    C = _check_matrix(C, "C")
    _check_same_d(C, B, "C", "B")
    R = project_out(_f64(B), _f64(C))
    # Second pass: one Gram-Schmidt-like projection loses orthogonality to C at ~eps·κ; repeat it.
    R = project_out(R, _f64(C))
    Q = orthonormalize(R, rtol, atol=rtol)
    return Q.to(device=B.device, dtype=_out_dtype(B)).contiguous()


def complement(B: Tensor) -> Tensor:
    """Orthonormal basis [d, d − r] of span(B)⊥, for B orthonormal [d, r]."""
    B = _check_matrix(B, "B")
    d, r = B.shape
    if r == 0:
        return torch.eye(d, dtype=_out_dtype(B), device=B.device)
    U, s, _ = torch.linalg.svd(_f64(B), full_matrices=True)
    # Rank of an (approximately) orthonormal B: singular values near 1; 0.5 separates them from 0.
    rank = int((s > 0.5).sum())
    return U[:, rank:].to(device=B.device, dtype=_out_dtype(B)).contiguous()


def union_basis(*Bs: Tensor, rtol: float = DEFAULT_RTOL) -> Tensor:
    """Orthonormal basis of span(B₁ ∪ B₂ ∪ …), rank detected (shared directions counted once)."""
    if not Bs:
        raise ValueError("union_basis needs at least one basis")
    mats = [_check_matrix(B, f"Bs[{i}]") for i, B in enumerate(Bs)]
    d = mats[0].shape[0]
    for i, B in enumerate(mats):
        if B.shape[0] != d:
            raise ValueError(
                f"Bs[{i}] has {B.shape[0]} rows, expected d={d}; "
                "all bases must live in the same R^d"
            )
    cat = torch.cat([_f64(B) for B in mats], dim=1)
    # Inputs are orthonormal (scale 1), so the absolute floor rtol is what "supported" means.
    Q = orthonormalize(cat, rtol, atol=rtol)
    return Q.to(device=mats[0].device, dtype=_out_dtype(mats[0])).contiguous()


def principal_angles(B1: Tensor, B2: Tensor) -> Tensor:
    """The min(k1, k2) principal angles (radians, ascending) between orthonormal B1 and B2."""
    B1 = _check_matrix(B1, "B1")
    B2 = _check_matrix(B2, "B2")
    _check_same_d(B1, B2, "B1", "B2")
    cos = torch.linalg.svdvals(_f64(B1).T @ _f64(B2)).clamp(
        0.0, 1.0
    )  # descending cos → ascending angles
    return torch.arccos(cos)


def shared_directions(B1: Tensor, B2: Tensor, min_cos: float = 0.9) -> tuple[Tensor, Tensor]:
    """Directions common to span(B1) and span(B2): (basis [d, s], cosines [s]).

    SVD B1ᵀB2 = U diag(c) Vᵀ pairs principal vectors u_i = B1 U_i, v_i = B2 V_i with cos c_i.
    Pairs with c_i ≥ ``min_cos`` are kept and represented by their bisector
    (u_i + v_i)/√(2 + 2c_i); bisectors of different pairs are exactly orthogonal, so the
    result is orthonormal.
    """
    B1 = _check_matrix(B1, "B1")
    B2 = _check_matrix(B2, "B2")
    _check_same_d(B1, B2, "B1", "B2")
    if not 0.0 <= min_cos <= 1.0:
        raise ValueError(f"min_cos must be in [0, 1], got {min_cos}")
    P1, P2 = _f64(B1), _f64(B2)
    U, c, Vh = torch.linalg.svd(P1.T @ P2, full_matrices=False)
    c = c.clamp(0.0, 1.0)
    keep = c >= min_cos
    u = P1 @ U[:, keep]
    v = P2 @ Vh.T[:, keep]
    basis = (u + v) / torch.sqrt(2.0 + 2.0 * c[keep])
    return basis.to(device=B1.device, dtype=_out_dtype(B1)).contiguous(), c[keep].to(
        torch.float64
    ).cpu()


@functools.lru_cache(maxsize=256)
def chance_cosine(d: int, k1: int, k2: int, q: float = 0.99, draws: int = 512) -> float:
    """The q-quantile of the largest principal cosine between two independent Haar-random
    subspaces of ranks k1, k2 in R^d (Monte Carlo, fixed seed, so deterministic).

    A pair of bases sharing a direction "beyond chance" has a principal cosine above this;
    at d = 576 and ranks 8 and 7 it is ≈ 0.25: a cosine of 0.2 is what unrelated subspaces give.
    """
    for name, v in (("d", d), ("k1", k1), ("k2", k2), ("draws", draws)):
        _check_k(v, name)
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if min(k1, k2) == 0:
        return 1.0
    if k1 + k2 > d:
        return 1.0  # the subspaces must intersect: every pair counts
    g = torch.Generator().manual_seed(0)
    top = torch.empty(draws, dtype=torch.float64)
    for i in range(draws):
        Q1, _ = torch.linalg.qr(torch.randn(d, k1, generator=g, dtype=torch.float64))
        Q2, _ = torch.linalg.qr(torch.randn(d, k2, generator=g, dtype=torch.float64))
        top[i] = torch.linalg.svdvals(Q1.T @ Q2)[0]
    return float(torch.quantile(top, q))


def overlap(B: Tensor, B_w: Tensor) -> float:
    """‖BᵀB_w‖_F² / min(k, k_w): mean cos² of the principal angles ∈ [0, 1]; NaN if one is empty."""
    B = _check_matrix(B, "B")
    B_w = _check_matrix(B_w, "B_w")
    _check_same_d(B, B_w, "B", "B_w")
    k_min = min(B.shape[1], B_w.shape[1])
    if k_min == 0:
        return math.nan
    return float((_f64(B).T @ _f64(B_w)).square().sum()) / k_min


def effective_rank(spectrum: Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): exp(H(p)), p_i = s_i / Σ_j s_j.

    Computed on *singular values* s.

    Ranges from 1 (one direction) to the number of nonzero values (flat spectrum);
    0.0 for an all-zero spectrum. Pass eigenvalues of a covariance only if that is the
    intended weighting (it equals squared singular values).
    """
    if not isinstance(spectrum, Tensor):
        raise TypeError(f"spectrum must be a torch.Tensor, got {type(spectrum).__name__}")
    s = _f64(spectrum).reshape(-1)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("spectrum has non-finite values; pass finite singular values")
    if bool((s < 0).any()):
        raise ValueError(
            f"spectrum has negative values (min {float(s.min()):.3g}); pass singular values (>= 0)"
        )
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total
    # xlogy: 0·log 0 = 0, also for values that underflow to 0 after the division.
    return math.exp(float(-torch.special.xlogy(p, p).sum()))


def validate_basis(B: object, d: int, name: str = "basis", tol: float = 1e-4) -> Tensor:
    """Check that ``B`` is an orthonormal [d, k] basis with k ≥ 1 (SPEC §6 claim 1); return it.

    Raises TypeError if not a tensor, ValueError naming the defect otherwise: not 2-D,
    wrong d (expected vs got), non-finite entries (count), rank 0 (no columns), or not
    orthonormal (max |BᵀB − I| vs ``tol``).
    """
    if not isinstance(B, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [d, k], got {type(B).__name__}")
    if not B.is_floating_point():
        raise TypeError(
            f"{name} must be a floating tensor, got dtype {B.dtype}; cast it with .float()"
        )
    if B.ndim != 2:
        raise ValueError(f"{name} must be 2-D [d, k], got shape {tuple(B.shape)}")
    if B.shape[0] != d:
        raise ValueError(
            f"{name} has {B.shape[0]} rows, expected d={d}; "
            "a basis is [d_model, k] (did you pass Bᵀ?)"
        )
    n_bad = int((~torch.isfinite(B)).sum())
    if n_bad:
        raise ValueError(f"{name} has {n_bad} non-finite entries (NaN/inf); fix the basis builder")
    if B.shape[1] == 0:
        raise ValueError(
            f"{name} has rank 0 (shape {tuple(B.shape)}); a basis needs at least one direction"
        )
    G = _f64(B).T @ _f64(B)
    err = float((G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)).abs().max())
    if err > tol:
        raise ValueError(
            f"{name} is not orthonormal: max |BᵀB − I| = {err:.3g} > tol {tol:g}; "
            "re-orthonormalise it with ws_harness.linalg.orthonormalize"
        )
    return B
