"""Properties of the subspace helpers: rank detection, orthonormality, removal stays removed."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import seeds

from ws_harness import linalg as la

PROFILE = settings(settings.get_profile("ws-invariants"), max_examples=50)  # cheap: more cases
ORTHO_TOL = 1e-5  # float32 bases: ‖BᵀB − I‖_max after a float64 SVD and a cast


def ortho_err(B: torch.Tensor) -> float:
    G = B.double().T @ B.double()
    return float((G - torch.eye(G.shape[0], dtype=G.dtype)).abs().max()) if G.numel() else 0.0


def low_rank(seed: int, n: int, d: int, rank: int) -> torch.Tensor:
    """[n, d] matrix of exact rank min(rank, n, d) (float32)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)).float()


@settings(PROFILE)
@given(
    seed=seeds,
    n=st.integers(1, 40),
    d=st.integers(2, 48),
    rank=st.integers(1, 48),
    k=st.integers(1, 48),
    offset=st.booleans(),
)
def test_pca_never_exceeds_data_rank(seed, n, d, rank, k, offset):
    X = low_rank(seed, n, d, rank)
    if offset:  # a shared offset is removed by centering and must not count as a direction
        X = X + 10.0 * torch.randn(1, d, generator=torch.Generator().manual_seed(seed + 1))
    B = la.pca_basis(X, k)
    supported = min(rank, d, max(n - 1, 0))
    assert B.shape[0] == d
    assert B.shape[1] <= min(k, supported)
    assert ortho_err(B) < ORTHO_TOL
    # Equality when the data clearly supports the directions (generic Gaussian factors).
    if not offset:
        Xc = X.double() - X.double().mean(0)
        true_rank = int(torch.linalg.matrix_rank(Xc, rtol=1e-4))
        assert B.shape[1] == min(k, true_rank)


@settings(PROFILE)
@given(seed=seeds, d=st.integers(2, 48), m=st.integers(1, 60), rank=st.integers(0, 48))
def test_orthonormalize_detects_rank(seed, d, m, rank):
    M = low_rank(seed, d, m, rank) if rank else torch.zeros(d, m)
    Q = la.orthonormalize(M)
    assert Q.shape == (d, min(rank, d, m))
    assert ortho_err(Q) < ORTHO_TOL
    # Span check: M lies in span(Q).
    resid = la.project_out(M.double(), Q.double())
    assert float(resid.norm()) <= 1e-5 * max(float(M.norm()), 1.0)


@settings(PROFILE)
@given(seed=seeds, d=st.integers(3, 40), data=st.data())
def test_remove_subspace_and_complement(seed, d, data, make_haar):
    kb = data.draw(st.integers(1, d - 1), label="kb")
    kc = data.draw(st.integers(1, d - 1), label="kc")
    shared = data.draw(st.integers(0, min(kb, kc) - 1), label="shared")
    C = make_haar(seed, d, kc)
    # B shares `shared` directions with span(C) exactly, the rest generic.
    B = la.orthonormalize(torch.cat([C[:, :shared], make_haar(seed + 7, d, kb - shared)], dim=1))
    R = la.remove_subspace(B, C)
    assert ortho_err(R) < ORTHO_TOL
    assert float((C.double().T @ R.double()).abs().max()) < 1e-5
    # Directions inside C are dropped, generic ones survive: rank = dim(B + C) − dim C.
    assert R.shape[1] == min(kb - shared, d - kc)
    Cc = la.complement(C)
    assert Cc.shape == (d, d - kc)
    assert ortho_err(Cc) < ORTHO_TOL
    assert float((C.double().T @ Cc.double()).abs().max()) < 1e-5
    P = la.project_out(B, C)
    assert float((C.double().T @ P.double()).abs().max()) < 1e-5


@settings(PROFILE)
@given(seed=seeds, d=st.integers(2, 40), data=st.data())
def test_union_spans_both_and_counts_overlap_once(seed, d, data, make_haar):
    k1 = data.draw(st.integers(1, d), label="k1")
    k2 = data.draw(st.integers(1, d), label="k2")
    B1 = make_haar(seed, d, k1)
    B2 = torch.cat([B1[:, : min(k1, k2) // 2], make_haar(seed + 1, d, k2 - min(k1, k2) // 2)], 1)
    B2 = la.orthonormalize(B2)
    U = la.union_basis(B1, B2)
    assert ortho_err(U) < ORTHO_TOL
    expected = int(torch.linalg.matrix_rank(torch.cat([B1, B2], 1).double(), rtol=1e-4))
    assert U.shape[1] == expected
    for B in (B1, B2):
        assert float(la.project_out(B.double(), U.double()).abs().max()) < 1e-5


@settings(PROFILE)
@given(seed=seeds, d=st.integers(2, 40), data=st.data())
def test_principal_angles_shared_directions_overlap(seed, d, data, make_haar):
    k1 = data.draw(st.integers(1, d), label="k1")
    k2 = data.draw(st.integers(1, d), label="k2")
    n_common = data.draw(st.integers(0, min(k1, k2)), label="n_common")
    common = make_haar(seed, d, n_common) if n_common else torch.zeros(d, 0)
    B1 = la.union_basis(common, make_haar(seed + 1, d, k1 - n_common)) if k1 > n_common else common
    B2 = la.union_basis(common, make_haar(seed + 2, d, k2 - n_common)) if k2 > n_common else common
    k1, k2 = B1.shape[1], B2.shape[1]
    angles = la.principal_angles(B1, B2)
    assert angles.shape == (min(k1, k2),)
    assert bool((angles[1:] >= angles[:-1] - 1e-12).all())  # ascending
    assert bool((angles >= 0).all()) and bool((angles <= math.pi / 2 + 1e-9).all())
    # The common block gives n_common zero angles (up to float32 rounding of the bases).
    assert bool((angles[:n_common] < 1e-3).all())
    ov = la.overlap(B1, B2)
    assert 0.0 <= ov <= 1.0 + 1e-6
    assert abs(ov - float(torch.cos(angles).square().mean())) < 1e-6
    basis, cos = la.shared_directions(B1, B2, min_cos=0.999)
    assert basis.shape[1] == cos.numel() >= n_common
    assert ortho_err(basis) < 1e-4
    assert bool((cos >= 0.999).all())
    # Each shared direction lies (almost) in both subspaces.
    for B in (B1, B2):
        resid = la.project_out(basis.double(), B.double()).norm(dim=0)
        assert bool((resid < 0.05).all())
    assert abs(la.overlap(B1, B1) - 1.0) < 1e-5


@settings(PROFILE)
@given(seed=seeds, m=st.integers(1, 30), d=st.integers(2, 24), data=st.data())
def test_bottom_right_basis_is_least_read(seed, m, d, data):
    k = data.draw(st.integers(1, d), label="k")
    M = torch.randn(m, d, generator=torch.Generator().manual_seed(seed))
    B = la.bottom_right_basis(M, k)
    assert B.shape == (d, k) and ortho_err(B) < ORTHO_TOL
    # Ky Fan (min form): ‖MB‖_F² equals the sum of the k smallest eigenvalues of MᵀM.
    evals = torch.linalg.eigvalsh(M.double().T @ M.double())
    read = float((M.double() @ B.double()).square().sum())
    assert abs(read - float(evals[:k].sum())) <= 1e-4 * float(evals.sum()) + 1e-6
    top = la.right_basis(M, k)
    assert top.shape[1] <= min(k, m)


@settings(PROFILE)
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=30))
def test_effective_rank_bounds(values):
    s = torch.tensor(values, dtype=torch.float64)
    er = la.effective_rank(s)
    nnz = int((s > 0).sum())
    if nnz == 0:
        assert er == 0.0
    else:
        assert 1.0 - 1e-9 <= er <= nnz + 1e-9
    flat = la.effective_rank(torch.ones(len(values)))
    assert abs(flat - len(values)) < 1e-9
