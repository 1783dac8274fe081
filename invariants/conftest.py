"""Shared settings and data factories for the property-based invariants of the scoring core."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, settings

# Derandomized so CI runs the same examples every time; no deadline (first calls pay
# torch/scipy warm-up). max_examples is per property and kept small for a < 60 s suite.
# Registered, not loaded: test modules opt in with ``settings(settings.get_profile(...))`` so
# hypothesis tests elsewhere in the repository keep their own defaults.
settings.register_profile(
    "ws-invariants",
    derandomize=True,
    database=None,  # no replay of stored examples: every run tests exactly the same cases
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# Spectrum shapes the strategies draw from; degenerate ones on purpose.
SPECTRA = ("generic", "rank1", "repeated", "near_zero", "spiked", "isotropic")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spectrum(kind: str, r: int, g: torch.Generator) -> torch.Tensor:
    """Singular values (length r) of the requested shape."""
    if kind == "generic":
        return torch.rand(r, generator=g) * 2.0 + 0.05
    if kind == "rank1":
        return torch.cat([torch.ones(1), torch.zeros(r - 1)])
    if kind == "repeated":  # a flat block: repeated eigenvalues, arbitrary eigenvectors
        n_flat = max(1, r // 2)
        return torch.cat([torch.ones(n_flat), 0.3 * torch.ones(r - n_flat)])
    if kind == "near_zero":  # some directions barely supported
        s = torch.rand(r, generator=g) + 0.5
        s[r // 2 :] = 1e-6
        return s
    if kind == "spiked":
        return torch.cat([torch.full((1,), 5.0), 0.2 * torch.ones(r - 1)])
    if kind == "isotropic":
        return torch.ones(r)
    raise ValueError(f"unknown spectrum kind {kind!r}; use one of {SPECTRA}")


def haar(seed: int, d: int, k: int) -> torch.Tensor:
    """A Haar-uniform orthonormal basis [d, k] (QR of a Gaussian), float32."""
    Q, _ = torch.linalg.qr(torch.randn(d, k, generator=_gen(seed), dtype=torch.float64))
    return Q.float()


def samples(seed: int, n: int, d: int, kind: str) -> torch.Tensor:
    """Label-like samples X [n, d]: Gaussian scores times a spectrum along random directions."""
    g = _gen(seed)
    r = min(n, d)
    U = haar(seed + 1, d, r).double()
    s = _spectrum(kind, r, g).double()
    Z = torch.randn(n, r, generator=g, dtype=torch.float64)
    if kind == "rank1":
        Z[:, 0] = Z[:, 0].abs() + 0.1  # keep every row nonzero
    X = (Z * s) @ U.T
    # Rows made ~0 by the spectrum get a tiny generic component so x_i ≠ 0.
    small = X.norm(dim=1) < 1e-9
    if bool(small.any()):
        X[small] += 1e-3 * U[:, 0]
    return X.float()


def weight(seed: int, d: int, m: int, kind: str) -> torch.Tensor:
    """A weight delta M [d, m] = U diag(s) Vᵀ with the requested spectrum."""
    g = _gen(seed)
    r = min(d, m)
    U = haar(seed + 2, d, r).double()
    V = haar(seed + 3, m, r).double()
    s = _spectrum(kind, r, g).double()
    return ((U * s) @ V.T).float() * math.exp(float(torch.randn(1, generator=g)))


@pytest.fixture(scope="session")
def make_samples():
    """Factory fixture: ``make_samples(seed, n, d, kind)`` → X [n, d]."""
    return samples


@pytest.fixture(scope="session")
def make_weight():
    """Factory fixture: ``make_weight(seed, d, m, kind)`` → ΔW [d, m]."""
    return weight


@pytest.fixture(scope="session")
def make_haar():
    """Factory fixture: ``make_haar(seed, d, k)`` → Haar-uniform orthonormal [d, k]."""
    return haar
