"""Properties of the activation builders: rotation_contrast finds real rotations only, shared
directions are shared beyond chance."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import haar, seeds

from ws_harness import linalg as la
from ws_harness.builders import procrustes_skew_basis

PROFILE = settings(settings.get_profile("ws-invariants"), max_examples=15)  # 64 null fits each


def persona_pair(
    seed: int, n: int, d: int, r: int, theta: float, noise: float, shift: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(neg, pos, plane): n samples in an r-dim support of R^d; pos = neg rotated by `theta`
    in `plane` (the two highest-variance support directions), + noise + a mean shift."""
    g = torch.Generator().manual_seed(seed)
    Q = haar(seed, d, r).double()
    scale = torch.cat([torch.full((2,), 3.0), torch.linspace(1.0, 0.3, r - 2)]).double()
    neg = (torch.randn(n, r, generator=g, dtype=torch.float64) * scale) @ Q.T
    u, v = Q[:, 0], Q[:, 1]
    c, s = math.cos(theta), math.sin(theta)
    rot = (torch.eye(d, dtype=torch.float64) + (c - 1) * (torch.outer(u, u) + torch.outer(v, v))
           + s * (torch.outer(v, u) - torch.outer(u, v)))
    offset = shift * torch.randn(d, generator=g, dtype=torch.float64)  # persona mean shift
    pos = neg @ rot.T + offset + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return neg, pos, Q[:, :2]


def cosines(B1: torch.Tensor, B2: torch.Tensor) -> torch.Tensor:
    return torch.cos(la.principal_angles(B1.double(), B2.double()))


cases = st.tuples(seeds, st.integers(10, 40), st.integers(12, 64), st.integers(4, 12))


@settings(PROFILE)
@given(case=cases, noise=st.sampled_from([0.0, 0.01, 0.05, 0.2]), shift=st.sampled_from([0.0, 5.0]))
def test_no_rotation_returns_almost_nothing(case, noise, shift):
    """pos = neg + shift + noise: no plane is real; at most one pair may pass the noise level
    (the threshold is the maximum of 64 null draws, so ~1/65 of cases)."""
    seed, n, d, r = case
    r = min(r, n - 1, d)
    neg, pos, _ = persona_pair(seed, n, d, r, 0.0, noise, shift)
    B = procrustes_skew_basis(neg, pos, 8)
    assert B.shape[1] <= 2, f"{B.shape[1]} directions from data with no rotation"


@settings(PROFILE)
@given(case=cases, theta=st.floats(0.3, 1.5), noise=st.sampled_from([0.0, 0.005, 0.02]),
       shift=st.sampled_from([0.0, 5.0]))
def test_planted_rotation_plane_is_recovered(case, theta, noise, shift):
    seed, n, d, r = case
    r = min(r, n - 1, d)
    neg, pos, plane = persona_pair(seed, n, d, r, theta, noise, shift)
    B = procrustes_skew_basis(neg, pos, 8)
    assert 2 <= B.shape[1] <= 4, f"rank {B.shape[1]}: the planted plane, at most one noise pair"
    assert B.shape[1] % 2 == 0
    assert bool((cosines(B[:, :2], plane) > 0.99).all()), cosines(B[:, :2], plane)
    # float32 inputs give the same planes (no dependence on an arbitrary LAPACK completion)
    B32 = procrustes_skew_basis(neg.float(), pos.float(), 8)
    assert B32.shape == B.shape
    assert bool((cosines(B32, B) > 0.99).all())


@settings(PROFILE)
@given(case=cases, noise=st.sampled_from([0.01, 0.05]))
def test_rotation_float32_and_float64_agree(case, noise):
    """The issue's measurement: no rotation, pos = neg + noise, float32 vs float64 inputs."""
    seed, n, d, r = case
    r = min(r, n - 1, d)
    neg, pos, _ = persona_pair(seed, n, d, r, 0.0, noise, 0.0)
    B64 = procrustes_skew_basis(neg, pos, 8)
    B32 = procrustes_skew_basis(neg.float(), pos.float(), 8)
    assert B32.shape == B64.shape
    if B64.shape[1]:
        assert bool((cosines(B32, B64) > 0.99).all())


def test_shared_directions_above_chance_are_rare_for_random_subspaces():
    """Two unrelated random subspaces share nothing beyond chance in ~99% of draws."""
    d, k1, k2 = 96, 8, 7
    cut = la.chance_cosine(d, k1, k2)
    hits = sum(la.shared_directions(haar(2 * s + 10_000, d, k1), haar(2 * s + 10_001, d, k2),
                                    min_cos=cut)[0].shape[1] > 0 for s in range(300))
    assert hits <= 12  # ≈ 3 expected at q = 0.99


@settings(PROFILE)
@given(seed=seeds, d=st.integers(40, 200), k=st.integers(2, 8), c=st.floats(0.9, 1.0))
def test_a_planted_shared_direction_is_kept_with_its_cosine(seed, d, k, c):
    B1, R = haar(seed, d, k).double(), haar(seed + 1, d, k).double()
    u = B1[:, 0]
    w = R[:, 0] - u * (u @ R[:, 0])
    B2 = torch.cat([(c * u + math.sqrt(1 - c * c) * w / w.norm())[:, None], R[:, 1:]], dim=1)
    B2 = la.orthonormalize(B2)
    shared, cos = la.shared_directions(B1.float(), B2.float(), min_cos=la.chance_cosine(d, k, k))
    assert shared.shape[1] >= 1 and float(cos[0]) >= c - 1e-3
    assert float(cosines(shared[:, :1], u[:, None])[0]) > 0.9  # bisector: cos(θ/2) ≥ 0.975 − chance
