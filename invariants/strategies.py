"""Shared strategies and data factories of the invariants: one definition each.

Imported as a top-level module (``from strategies import ...``): invariants/ has no
``__init__.py``, so pytest's default ``prepend`` import mode puts this folder on sys.path
before it imports conftest.py and the test modules (with or without xdist).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st

from ws_harness import scores as sc

# Spectrum shapes the strategies draw from; degenerate ones on purpose.
SPECTRA = ("generic", "rank1", "repeated", "near_zero", "spiked", "isotropic")

seeds = st.integers(0, 2**31 - 1)


@st.composite
def target_cases(draw, d_min: int = 4, d_max: int = 48, spectra=SPECTRA, n_min: int = 1):
    """(kind, seed, d, size, spectrum): activation (size = n ≥ n_min samples) or weight
    (size = m columns) case; ``build`` / ``target_for`` turn it into a target."""
    kind = draw(st.sampled_from(["act", "weight"]), label="kind")
    d = draw(st.integers(d_min, d_max), label="d")
    size = draw(st.integers(n_min, 24) if kind == "act" else st.integers(1, 2 * d), label="size")
    return (
        kind,
        draw(seeds, label="seed"),
        d,
        size,
        draw(st.sampled_from(spectra), label="spectrum"),
    )


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


def build(case, make_samples=samples, make_weight=weight) -> tuple[sc.Target, torch.Tensor]:
    """(target, raw tensor) for a drawn ``target_cases`` case (X [n, d] or ΔW [d, m])."""
    kind, seed, d, size, spectrum = case
    if kind == "act":
        X = make_samples(seed, size, d, spectrum)
        return sc.activation_target(X), X
    M = make_weight(seed, d, size, spectrum)
    return sc.weight_target(M), M


def target_for(kind, seed, d, size, spectrum, make_samples=samples, make_weight=weight) -> sc.Target:
    """The target of ``build`` from a case's fields."""
    return build((kind, seed, d, size, spectrum), make_samples, make_weight)[0]


def count_below(e: np.ndarray, p_of, alpha: float) -> int:
    """#{i: p_of(e_i) < alpha} by bisection over sorted e: ~12 p evaluations instead of n.

    Exact because p is non-increasing in e (test_p_values_are_monotone_and_bounded).
    """
    e = np.sort(np.asarray(e))
    lo, hi = 0, e.size  # first index whose p is below alpha
    while lo < hi:
        mid = (lo + hi) // 2
        if p_of(float(e[mid])) < alpha:
            hi = mid
        else:
            lo = mid + 1
    return int(e.size - lo)


# ---- spectra of the default run's shapes (d = 576, k = 8; issue 10, item 9) -------------------


def label_like_spectrum(top: float = 0.95, rank: int = 20, decay: float = 0.7) -> np.ndarray:
    """A label spectrum's shape: one dominant eigenvalue ``top`` (measured 0.80–0.98 on the
    default run's EVAL labels), then ``rank − 1`` geometrically decaying ones (rank = n_eval)."""
    if not 0.0 < top < 1.0:
        raise ValueError(f"top must be in (0, 1), got {top}")
    tail = decay ** np.arange(rank - 1)
    return np.concatenate([[top], (1.0 - top) * tail / tail.sum()])


def weight_like_spectrum(exponent: float = 1.2, rank: int = 16) -> np.ndarray:
    """A weight diff's shape: λ_i ∝ i^−exponent over rank = 2 × LoRA rank (measured on the
    default run's balanced [ΔW_o | ΔW_down]: λ₁ ≈ 0.3–0.5, gentle decay)."""
    lam = np.arange(1, rank + 1, dtype=float) ** -float(exponent)
    return lam / lam.sum()


def mean_like_spectrum(layers, d: int, seed: int = 0, shared: float = 0.7) -> np.ndarray:
    """Eigenvalues of Ā = mean_l U_l diag(λ_l) U_lᵀ, random U_l whose top directions share one
    unit vector with weight ``shared`` (cos ≈ 0.7: the default run's label Ā keeps ≈ 0.44 of
    its trace on one direction); the rest of each U_l is random. Descending, sums to 1."""
    rng = np.random.default_rng(seed)
    u0 = rng.standard_normal(d)
    u0 /= np.linalg.norm(u0)
    acc = np.zeros((d, d))
    for lam in layers:
        lam = np.asarray(lam, float)
        G = rng.standard_normal((d, lam.size))
        G[:, 0] = shared * math.sqrt(d) * u0 + math.sqrt(1.0 - shared**2) * G[:, 0]
        U, _ = np.linalg.qr(G)
        acc += (U * lam) @ U.T
    ev = np.clip(np.linalg.eigvalsh(acc / len(layers))[::-1], 0.0, None)
    return ev / ev.sum()
