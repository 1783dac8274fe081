"""Properties of the linear (attribution) retention's null (SPEC §4.1): indefinite C, signed p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from strategies import count_below, seeds

from ws_harness import attribution as at
from ws_harness import nulls as nu

PROFILE = settings.get_profile("ws-invariants")
N_CAL = 4000  # Haar-random bases per calibration case
N_MC = 4000  # draws per moment check
ALPHAS = (0.01, 0.05)
BINOM_LEVEL = 1e-4  # per-bound false-alarm level (the cases are derandomized anyway)
# Lower bounds allow mild conservativeness: the rate may fall to this fraction of α.
LOWER_FRACTION = {0.01: 0.5, 0.05: 0.8}
KINDS = ("mixed", "dom_pos", "dom_neg", "near_iso", "lowrank")


def spectrum(kind: str, d: int, rng: np.random.Generator) -> np.ndarray:
    """Eigenvalues of an indefinite C of the given shape."""
    if kind == "mixed":  # both signs, no structure
        return rng.normal(0.2, 1.0, d)
    if kind == "dom_pos":  # one dominant positive direction over a two-signed bulk
        mu = rng.normal(0.0, 0.3, d)
        mu[0] = 10.0
        return mu
    if kind == "dom_neg":  # one dominant negative direction over a positive bulk
        mu = rng.normal(0.3, 0.3, d)
        mu[0] = -10.0
        return mu
    if kind == "near_iso":  # C ≈ I: a tiny spread on a large common value
        return 1.0 + 0.01 * rng.normal(size=d)
    if kind == "lowrank":  # sym(A Bᵀ), A, B [d, 2]: what a rank-2 ΔW and its gradient give
        A, B = rng.normal(size=(d, 2)), rng.normal(size=(d, 2))
        return np.linalg.eigvalsh((A @ B.T + B @ A.T) / 2.0)
    raise ValueError(f"unknown spectrum kind {kind!r}; use one of {KINDS}")


def random_c(mu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """U diag(μ) Uᵀ with Haar U: eigenvectors in general position."""
    U, _ = np.linalg.qr(rng.normal(size=(mu.size, mu.size)))
    return (U * mu) @ U.T


def trace_draws(c: np.ndarray, k: int, n: int, seed: int) -> np.ndarray:
    """tr(QᵀCQ) for n bases from ws_harness.nulls.haar_bases (float64)."""
    Q = nu.haar_bases(c.shape[0], k, n, seed, dtype=torch.float64)
    return torch.einsum("ndk,de,nek->n", Q, torch.as_tensor(c), Q).numpy()


def null_draws(d: int, k: int, kind: str, scope: str, method: str = "beta"):
    """(draws of Σ_l tr(P_l C_l) under the null, p-value function) for one calibration case."""
    rng = np.random.default_rng(1000 * d + 10 * k + KINDS.index(kind))
    n_layers = 1 if scope == "single" else 3
    mus = [spectrum(kind, d, rng) for _ in range(n_layers)]
    cs = [random_c(mu, rng) for mu in mus]
    if scope == "global":  # one shared subspace: tr(QᵀC̄Q), C̄ = Σ_l C_l
        c_bar = sum(cs)
        draws = trace_draws(c_bar, k, N_CAL, 7)
        spectra = [np.linalg.eigvalsh(c_bar)]
    else:  # an independent subspace per layer
        draws = sum(trace_draws(c, k, N_CAL, 7 + i) for i, c in enumerate(cs))
        spectra = mus
    ks = [k] * len(spectra)
    return draws, lambda x: nu.signed_layer_sum_p_value(x, spectra, ks, d, method=method)


def rejection_rates(d: int, k: int, kind: str, scope: str, method: str = "beta") -> dict:
    draws, p_of = null_draws(d, k, kind, scope, method)
    return {alpha: count_below(draws, p_of, alpha) / N_CAL for alpha in ALPHAS}


def bounds(alpha: float) -> tuple[float, float]:
    lo = stats.binom.ppf(BINOM_LEVEL, N_CAL, LOWER_FRACTION[alpha] * alpha) / N_CAL
    hi = stats.binom.ppf(1.0 - BINOM_LEVEL, N_CAL, alpha) / N_CAL
    return lo, hi


CAL_CASES = [
    (d, k, kind, scope)
    for scope in ("single", "per_layer", "global")
    for d in (16, 64)
    for k in (1, 4, 8)
    for kind in KINDS
]


@pytest.mark.parametrize(("d", "k", "kind", "scope"), CAL_CASES)
def test_signed_p_is_calibrated(d, k, kind, scope):
    """Haar-random bases are rejected at rates within binomial bounds of α = 1 % and 5 %:
    never above the upper bound, and at least LOWER_FRACTION·α (mild conservativeness)."""
    rates = rejection_rates(d, k, kind, scope)
    for alpha, rate in rates.items():
        lo, hi = bounds(alpha)
        assert rate <= hi, f"anti-conservative: {rate:.4f} rejections at α={alpha} (≤ {hi:.4f})"
        assert rate >= lo, f"too conservative: {rate:.4f} rejections at α={alpha} (≥ {lo:.4f})"


@pytest.mark.xfail(
    strict=True,
    reason="finding: the chi-square linearisation (method='linear') is anti-conservative with a "
    "dominant negative eigenvalue at k/d = 1/2 (~4 % at α = 1 %); the default Beta model is not",
)
def test_linearised_p_is_calibrated_for_a_dominant_negative_eigenvalue():
    rates = rejection_rates(16, 8, "dom_neg", "single", method="linear")
    assert rates[0.01] <= bounds(0.01)[1]


def layer_cs(seed: int, d: int, n_layers: int, kind: str) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    cs = [random_c(spectrum(kind, d, rng), rng) for _ in range(n_layers)]
    if sum(np.trace(c) for c in cs) < 0:  # linear_retention needs Σ tr C > 0
        cs = [-c for c in cs]
    return cs


@settings(PROFILE, max_examples=15)
@given(
    seed=seeds,
    d=st.integers(4, 48),
    n_layers=st.integers(1, 3),
    kind=st.sampled_from(KINDS),
    scope=st.sampled_from(at.SCOPES),
    data=st.data(),
)
def test_exact_null_moments_match_monte_carlo(seed, d, n_layers, kind, scope, data):
    """linear_retention's exact null mean and sd of Σ_l tr(P_l C_l) (per-layer: independent
    subspaces, variances summed; global: one subspace, C̄) vs 4000 Haar draws, within 4 SE."""
    k = data.draw(st.integers(1, d - 1), label="k")
    cs = layer_cs(seed, d, n_layers, kind)
    basis = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]
    res = at.linear_retention(basis, [torch.as_tensor(c) for c in cs], scope)
    assert res.reason is None
    mean, sd = res.null_mean * res.tr_c, res.null_sd * res.tr_c  # of the numerator
    if scope == "global":
        draws = trace_draws(sum(cs), k, N_MC, seed + 1)
    else:
        draws = sum(trace_draws(c, k, N_MC, seed + 1 + i) for i, c in enumerate(cs))
    m_hat, v_hat = float(draws.mean()), float(draws.var(ddof=1))
    assert abs(m_hat - mean) <= 4.0 * sd / math.sqrt(N_MC) + 1e-9 * abs(mean), (m_hat, mean)
    # SE of a sample variance: √((μ₄ − σ⁴)/n), μ₄ from the draws.
    mu4 = float(((draws - m_hat) ** 4).mean())
    se_v = math.sqrt(max(mu4 - v_hat**2, 0.0) / N_MC)
    assert abs(v_hat - sd**2) <= 4.0 * se_v + 1e-9 * sd**2, (v_hat, sd**2, se_v)
    # r, z and p are wired to the same null.
    assert res.r == pytest.approx(res.c_lin / res.null_mean, rel=1e-12)
    assert res.z == pytest.approx((res.r - 1.0) / res.null_sd_r, rel=1e-9, abs=1e-12)
    spectra = [np.linalg.eigvalsh(sum(cs))] if scope == "global" else [
        np.linalg.eigvalsh(c) for c in cs
    ]
    expected = nu.signed_layer_sum_p_value(res.numerator, spectra, [k] * len(spectra), d)
    assert res.p == pytest.approx(expected, rel=1e-6, abs=1e-12)


@settings(PROFILE, max_examples=12)
@given(seed=seeds, d=st.integers(4, 24), n_layers=st.integers(1, 3), kind=st.sampled_from(KINDS),
       data=st.data())
def test_signed_p_is_monotone_bounded_and_sure_at_the_support(seed, d, n_layers, kind, data):
    k = data.draw(st.integers(1, d - 1), label="k")
    cs = layer_cs(seed, d, n_layers, kind)
    spectra = [np.linalg.eigvalsh(c) for c in cs]
    low = sum(float(np.sort(mu)[:k].sum()) for mu in spectra)  # Ky Fan: tr(PC) ∈ [low, high]
    high = sum(float(np.sort(mu)[-k:].sum()) for mu in spectra)
    span = high - low
    grid = np.linspace(low - 0.05 * span, high + 0.05 * span, 17)
    p = np.array([nu.signed_layer_sum_p_value(x, spectra, [k] * n_layers, d) for x in grid])
    assert ((0.0 <= p) & (p <= 1.0)).all()
    assert (np.diff(p) <= 1e-9).all(), p
    assert p[0] == 1.0 and p[-1] == 0.0, (p[0], p[-1])  # outside the support: sure


def test_signed_p_point_masses():
    d = 12
    mu = np.random.default_rng(0).normal(size=d)
    for spectra, ks in (
        ([mu], [d]),  # k = d: every subspace is R^d
        ([np.full(d, 2.5)], [3]),  # C ∝ I
        ([np.zeros(d)], [3]),  # C = 0
        ([mu, np.full(d, -1.0)], [d, 5]),  # all layers point masses
    ):
        mean = sum(k * float(np.sum(s)) / d for s, k in zip(spectra, ks, strict=True))
        assert nu.signed_layer_sum_p_value(mean, spectra, ks, d) == 1.0
        assert nu.signed_layer_sum_p_value(mean - 1.0, spectra, ks, d) == 1.0
        assert nu.signed_layer_sum_p_value(mean + 1.0, spectra, ks, d) == 0.0
    # A point-mass layer only shifts the others' null.
    shifted = nu.signed_layer_sum_p_value(1.0 + 3.0 * 2.5, [mu, np.full(d, 2.5)], [4, 3], d)
    assert shifted == pytest.approx(nu.signed_layer_sum_p_value(1.0, [mu], [4], d), rel=1e-12)
    assert math.isnan(nu.signed_layer_sum_p_value(math.nan, [mu], [4], d))
    with pytest.raises(ValueError, match="method"):
        nu.signed_layer_sum_p_value(0.0, [mu], [4], d, method="normal")
    with pytest.raises(ValueError, match="k must be in"):
        nu.signed_layer_sum_p_value(0.0, [mu], [13], d)


@settings(PROFILE, max_examples=15)
@given(seed=seeds, d=st.integers(4, 32), n_layers=st.integers(1, 3), kind=st.sampled_from(KINDS),
       data=st.data())
def test_no_basis_beats_the_causal_oracle(seed, d, n_layers, kind, data):
    """Ky Fan: the top-k eigenvectors of each C_l maximise tr(BᵀC_lB) at rank k."""
    k = data.draw(st.integers(1, d), label="k")
    cs = [torch.as_tensor(c) for c in layer_cs(seed, d, n_layers, kind)]
    oracle = at.linear_retention(at.causal_oracle(cs, k), cs)
    assert oracle.pct_oracle == pytest.approx(1.0, abs=1e-9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        bases = [torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
                 for _ in cs]
        res = at.linear_retention(bases, cs)
        assert res.numerator <= oracle.numerator + 1e-9 * oracle.abs_c
        assert res.pct_oracle <= 1.0 + 1e-9


def test_rank_one_paths_agree():
    """k = d − 1 (the complement is rank 1) and the multi-layer Dirichlet path give the
    single-layer ratio form's p (a second, near-constant layer barely moves the null)."""
    d = 12
    rng = np.random.default_rng(3)
    mu, tiny = rng.normal(0.3, 1.0, d), 1e-7 * rng.normal(size=d)
    for k in (1, d - 1):
        for x in np.linspace(float(np.sort(mu)[:k].sum()), float(np.sort(mu)[-k:].sum()), 9)[1:-1]:
            single = nu.signed_layer_sum_p_value(x, [mu], [k], d)
            paired = nu.signed_layer_sum_p_value(x + 3 * float(tiny.sum()) / d, [mu, tiny], [k, 3], d)
            assert paired == pytest.approx(single, rel=1e-3, abs=1e-9), (k, x)
