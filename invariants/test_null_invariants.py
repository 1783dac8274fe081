"""Properties of the nulls: exact vs Monte Carlo moments, calibration, structured/layer nulls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from strategies import (
    SPECTRA,
    count_below,
    label_like_spectrum,
    mean_like_spectrum,
    seeds,
    target_for,
    weight_like_spectrum,
)
from strategies import target_cases as _target_cases

from ws_harness import nulls as nu
from ws_harness import scores as sc

PROFILE = settings.get_profile("ws-invariants")
N_MC = 3000  # Monte Carlo draws per example for moment checks
N_CAL = 6000  # random bases per calibration example
ALPHA = 0.01
BINOM_LEVEL = 1e-4  # per-example false-alarm level of the binomial bounds (derandomized anyway)


def cases(d_min=4, d_max=32, spectra=SPECTRA):
    """Target cases for the nulls: d ≤ 32 unless asked, at least 2 samples per activation case."""
    return _target_cases(d_min, d_max, spectra, n_min=2)


def haar_energies(t: sc.Target, k: int, n: int, seed: int) -> np.ndarray:
    """E for n Haar subspaces, computed here independently of ws_harness.nulls (float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, t.d, k, generator=g, dtype=torch.float64))
    return (Q.transpose(1, 2) @ t.factor.double()).square().sum((1, 2)).numpy() / t.norm2


def assert_moments_match(samples: np.ndarray, mean: float, var: float, what: str) -> None:
    """Sample mean within 4 SE; sample sd within 5 SE of an sd (kurtosis-aware) of the exact one."""
    n = samples.size
    sd = math.sqrt(var)
    m_hat, sd_hat = float(samples.mean()), float(samples.std(ddof=1))
    if sd < 1e-6:  # point-mass null (k = d, isotropic A): every draw scores the mean
        assert abs(m_hat - mean) < 1e-5 and sd_hat < 1e-5, what
        return
    assert abs(m_hat - mean) <= 4.0 * sd / math.sqrt(n), f"{what}: mean {m_hat} vs exact {mean}"
    # SE of a sample sd ≈ sd·√((κ − 1)/(4n)), κ the kurtosis (3 for a normal).
    kurt = float(stats.kurtosis(samples, fisher=False))
    rel_tol = 5.0 * math.sqrt(max(kurt - 1.0, 2.0) / (4.0 * n))
    assert abs(sd_hat / sd - 1.0) <= rel_tol, (
        f"{what}: sd {sd_hat} vs exact {sd} (tol {rel_tol:.3f})"
    )


@settings(PROFILE, max_examples=20)
@given(case=cases(), data=st.data())
def test_exact_null_moments_match_monte_carlo(case, data, make_samples, make_weight):
    t = target_for(*case, make_samples, make_weight)
    k = data.draw(st.integers(1, t.d), label="k")
    mean, var = nu.null_moments(1.0, t.tr_a2, k, t.d)
    assert mean == k / t.d
    independent = haar_energies(t, k, N_MC, case[1] + 1)
    assert_moments_match(independent, mean, var, "independent QR")
    # The library's own Monte Carlo null draws the same law.
    lib = nu.monte_carlo_null(t.factor, k, N_MC, generator=case[1] + 2).numpy()
    assert_moments_match(lib, mean, var, "monte_carlo_null")
    assert np.array_equal(
        lib, nu.monte_carlo_null(t.factor, k, N_MC, generator=case[1] + 2).numpy()
    )


def rejections(t: sc.Target, k: int, seed: int, method: str) -> tuple[int, int]:
    """(#p < α, #p < 5α) over N_CAL Haar-random bases."""
    e = haar_energies(t, k, N_CAL, seed)
    mean, var = nu.null_moments(1.0, t.tr_a2, k, t.d)
    if method == "beta":
        p_of = lambda x: nu.beta_p_value(x, mean, var)  # noqa: E731
    else:
        p_of = lambda x: nu.saddlepoint_p_value(x, t.spectrum, k, t.d)  # noqa: E731
    return count_below(e, p_of, ALPHA), count_below(e, p_of, 5 * ALPHA)


@settings(PROFILE, max_examples=20)
@given(
    case=cases(d_min=16, d_max=48, spectra=("generic", "repeated", "near_zero", "spiked")),
    data=st.data(),
)
def test_saddlepoint_p_is_calibrated(case, data, make_samples, make_weight):
    """Random bases reject at α = 0.01 at a rate consistent with ≤ 1% (both target kinds).

    Regime k ≤ d/4 (the harness uses k = 8–16 of d = 576); nearer d/2 the method turns
    conservative. At 5α the rate must stay within [0.8, 1]·5α: measured 4.4–5.2% over this
    regime, so a p-value that is miscentred or stuck near 1 fails here.
    """
    t = target_for(*case, make_samples, make_weight)
    k = data.draw(st.sampled_from([1, t.d // 8, t.d // 4]), label="k")  # include the edge d/4
    n1, n5 = rejections(t, k, case[1] + 3, "saddlepoint")
    assert n1 <= stats.binom.ppf(1 - BINOM_LEVEL, N_CAL, ALPHA), f"{n1}/{N_CAL} rejections at α"
    lo5 = stats.binom.ppf(BINOM_LEVEL, N_CAL, 0.8 * 5 * ALPHA)
    hi5 = stats.binom.ppf(1 - BINOM_LEVEL, N_CAL, 5 * ALPHA)
    assert lo5 <= n5 <= hi5, f"{n5}/{N_CAL} rejections at 5α"


@settings(PROFILE, max_examples=10)
@given(kind=st.sampled_from(["act", "weight"]), seed=seeds, d=st.integers(4, 48), data=st.data())
def test_beta_p_is_exact_for_rank_one_targets(kind, seed, d, data, make_samples, make_weight):
    """For rank-1 A the null is Beta(k/2, (d−k)/2): rejections consistent with exactly 1%."""
    t = target_for(kind, seed, d, 12, "rank1", make_samples, make_weight)
    k = data.draw(st.integers(1, d - 1), label="k")
    for method in ("beta", "saddlepoint"):  # saddlepoint defers to the exact Beta here
        n1, _ = rejections(t, k, seed + 4, method)
        lo = stats.binom.ppf(BINOM_LEVEL / 2, N_CAL, ALPHA)
        hi = stats.binom.ppf(1 - BINOM_LEVEL / 2, N_CAL, ALPHA)
        assert lo <= n1 <= hi, f"{method}: {n1}/{N_CAL} rejections at α=0.01"


@settings(PROFILE, max_examples=60)
@given(d=st.integers(2, 600), data=st.data())
def test_beta_p_matches_the_exact_rank_one_law(d, data):
    """Rank-1 A (tr A² = 1): E = ‖Bᵀu‖² ~ Beta(k/2, (d−k)/2) exactly, and so is the match."""
    k = data.draw(st.integers(1, d - 1), label="k")
    e = data.draw(st.floats(0.0, 1.0), label="e")
    mean, var = nu.null_moments(1.0, 1.0, k, d)
    exact = stats.beta(k / 2, (d - k) / 2)
    assert math.isclose(mean, exact.mean(), rel_tol=1e-12)
    assert math.isclose(var, exact.var(), rel_tol=1e-9)
    assert abs(nu.beta_p_value(e, mean, var) - exact.sf(e)) <= 1e-9


@pytest.mark.xfail(
    strict=True,
    reason="finding: the moment-matched Beta (SPEC §4) is "
    "anti-conservative for spiked spectra (~3% at α=1% here); use p_method='saddlepoint'",
)
def test_beta_p_is_calibrated_for_spiked_spectra():
    d, k, n = 16, 1, 20000
    lam = torch.tensor([0.2] + [0.8 / 15] * 15, dtype=torch.float64)
    U, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    t = sc.Target((U * lam.sqrt()).float())
    e = haar_energies(t, k, n, 1)
    mean, var = nu.null_moments(1.0, t.tr_a2, k, d)
    n1 = sum(nu.beta_p_value(x, mean, var) < ALPHA for x in e)
    assert n1 <= stats.binom.ppf(1 - BINOM_LEVEL, n, ALPHA)


@settings(PROFILE)
@given(case=cases(d_max=24), data=st.data())
def test_p_values_are_monotone_and_bounded(case, data, make_samples, make_weight):
    t = target_for(*case, make_samples, make_weight)
    k = data.draw(st.integers(1, t.d), label="k")
    mean, var = nu.null_moments(1.0, t.tr_a2, k, t.d)
    grid = np.linspace(0.0, 1.0, 41)
    for p in (
        [nu.beta_p_value(x, mean, var) for x in grid],
        [nu.saddlepoint_p_value(x, t.spectrum, k, t.d) for x in grid],
    ):
        p = np.array(p)
        assert ((0.0 <= p) & (p <= 1.0)).all()
        assert (np.diff(p) <= 1e-9).all(), p  # P(E ≥ e) never increases with e
    samples = torch.tensor(haar_energies(t, k, 200, case[1]))
    mc = [nu.mc_p_value(samples, x) for x in grid]
    assert all(1 / 201 <= x <= 1.0 for x in mc) and (np.diff(mc) <= 0).all()


@settings(PROFILE, max_examples=12)
@given(case=cases(d_max=24), data=st.data())
def test_structured_null_shape(case, data, make_samples, make_weight):
    t = target_for(*case, make_samples, make_weight)
    d = t.d
    k = data.draw(st.integers(1, d), label="k")
    # W ∝ I: directions shaped like an isotropic W are uniform, so the ordinary null results.
    samples = nu.structured_null(3.0 * torch.eye(d), t.factor, k, N_MC, generator=case[1]).numpy()
    assert_moments_match(samples, *nu.null_moments(1.0, t.tr_a2, k, d), what="structured, W = I")
    # Rank-r W: draws live in col(W). A target orthogonal to col(W) scores 0 in every draw,
    # and with k = r every draw is col(W) itself.
    r = data.draw(st.integers(1, d - 1), label="r")
    g = torch.Generator().manual_seed(case[1] + 5)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    W = Q[:, :r] @ torch.randn(r, 3 * d, generator=g)
    outside = sc.weight_target(Q[:, r:] @ torch.randn(d - r, 5, generator=g))
    inside = sc.weight_target(Q[:, :r] @ torch.randn(r, 5, generator=g))
    kk = min(k, r)
    assert nu.structured_null(W, outside.factor, kk, 64, generator=1).abs().max() < 1e-5
    assert (nu.structured_null(W, inside.factor, r, 64, generator=1) - 1.0).abs().max() < 1e-5


@settings(PROFILE, max_examples=8)
@given(case=cases(d_min=6, d_max=16), n_layers=st.integers(2, 4), data=st.data())
def test_layer_summary_nulls_match_monte_carlo(case, n_layers, data, make_samples, make_weight):
    """Global basis: one subspace shared by all layers ≡ the single-subspace null with Ā.
    Per-layer basis: independent subspaces, Var(mean R) = Σ Var(R_l)/L²."""
    kind, seed, d, size, spectrum = case
    targets = [
        target_for(kind, seed + 10 * l, d, size, spectrum, make_samples, make_weight)
        for l in range(n_layers)
    ]
    k = data.draw(st.integers(1, d - 1), label="k")
    g = torch.Generator().manual_seed(seed + 6)
    B = torch.linalg.qr(torch.randn(d, k, generator=g))[0]
    scores = [sc.recovery(B, t) for t in targets]
    # Shared subspace: mean over layers of E_l(Q) for the same Q.
    shared = np.mean([haar_energies(t, k, N_MC, seed + 7) for t in targets], axis=0)
    glob = sc.summarize_layers(scores, targets, "global")
    scale = d / k
    assert_moments_match(shared * scale, glob.null_mean_r, glob.null_sd_r**2, "global summary")
    # Ā directly: stacked factors / √L is a target whose exact null is the same.
    stacked = sc.Target(torch.cat([t.factor for t in targets], 1) / math.sqrt(n_layers))
    assert abs(sc.mean_tr_a2(targets) - stacked.tr_a2) <= 1e-6  # stacked factor is float32
    # Independent subspaces per layer.
    indep = np.mean([haar_energies(t, k, N_MC, seed + 8 + l) for l, t in enumerate(targets)], 0)
    per = sc.summarize_layers(scores, targets, "per_layer")
    assert_moments_match(indep * scale, per.null_mean_r, per.null_sd_r**2, "per-layer summary")


@settings(PROFILE, max_examples=10)
@given(
    case=cases(d_min=16, d_max=32, spectra=("generic", "spiked", "repeated")),
    n_layers=st.integers(2, 4),
    data=st.data(),
)
def test_layer_summary_saddlepoint_p_is_calibrated(case, n_layers, data, make_samples, make_weight):
    """Summary p-values (what claims are decided on) under the null, global and per-layer bases:
    rate ≤ 1% at α = 0.01 and within [0.8, 1]·5α at 5α, as for single layers."""
    kind, seed, d, size, spectrum = case
    targets = [
        target_for(kind, seed + 10 * l, d, size, spectrum, make_samples, make_weight)
        for l in range(n_layers)
    ]
    k = data.draw(st.sampled_from([1, d // 8, d // 4]), label="k")
    B = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]
    scores = [sc.recovery(B, t) for t in targets]
    per_kind = {
        "global": np.mean([haar_energies(t, k, N_CAL, seed + 1) for t in targets], 0),
        "per_layer": np.mean(
            [haar_energies(t, k, N_CAL, seed + 2 + l) for l, t in enumerate(targets)], 0
        ),
    }
    spectra = [t.spectrum for t in targets]
    spectrum_bar = sc.mean_spectrum(targets)
    p_of = {
        "global": lambda x: nu.saddlepoint_p_value(x, spectrum_bar, k, d),
        "per_layer": lambda x: nu.layer_mean_saddlepoint_p_value(
            x * d / k, spectra, [k] * n_layers, d
        ),
    }
    for basis_kind, mean_e in per_kind.items():
        n1 = count_below(mean_e, p_of[basis_kind], ALPHA)
        n5 = count_below(mean_e, p_of[basis_kind], 5 * ALPHA)
        assert n1 <= stats.binom.ppf(1 - BINOM_LEVEL, N_CAL, ALPHA), (basis_kind, n1)
        lo5 = stats.binom.ppf(BINOM_LEVEL, N_CAL, 0.8 * 5 * ALPHA)
        assert lo5 <= n5 <= stats.binom.ppf(1 - BINOM_LEVEL, N_CAL, 5 * ALPHA), (basis_kind, n5)
    # summarize_layers wires the same p-values (observed basis B).
    for basis_kind in ("global", "per_layer"):
        summ = sc.summarize_layers(scores, targets, basis_kind, p_method="saddlepoint")
        if basis_kind == "global":
            expected = nu.saddlepoint_p_value(summ.mean_e, spectrum_bar, k, d)
        else:
            expected = nu.layer_mean_saddlepoint_p_value(summ.mean_r, spectra, [k] * n_layers, d)
        assert summ.p == expected and summ.p_method == "saddlepoint"


# ---- calibration where BH uses it: d = 576, k = 8, the default run's spectrum shapes ---------
# (issue 10, item 9; the full table with α = 1e-4 and 10⁵–10⁶ draws: benchmarks/calibration.md)

D_REAL, K_REAL = 576, 8
REAL_SHAPES = {
    "label": label_like_spectrum(0.95),  # one dominant direction, fast tail (rank 20)
    "weight": weight_like_spectrum(1.2),  # gentle power-law decay (rank 16)
}


def test_diagonal_null_energies_match_qr():
    """The benchmark's fast sampler (rows along A's eigenvectors + Bartlett Wishart) draws the
    same law as QR of a full Gaussian: KS against haar_energies and exact moments."""
    d, k = 40, 5
    lam = np.array([0.6, 0.2, 0.1, 0.06, 0.04])
    U = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3),
                                    dtype=torch.float64))[0]
    t = sc.Target((U[:, :5] * torch.tensor(lam).sqrt()).float())
    fast = nu.diagonal_null_energies(lam, k, d, 200_000, 7)
    slow = haar_energies(t, k, 20_000, 8)
    assert stats.ks_2samp(fast[:20_000], slow).pvalue > 1e-3
    mean, var = nu.null_moments(1.0, float(np.sum(lam**2)), k, d)
    assert_moments_match(fast, mean, var, "diagonal_null_energies")


def _real_size_rejections(lam: np.ndarray, n: int, seed: int, method: str) -> dict[float, int]:
    e = nu.diagonal_null_energies(lam, K_REAL, D_REAL, n, seed)
    mean, var = nu.null_moments(1.0, float(np.sum(lam**2)), K_REAL, D_REAL)
    if method == "beta":
        p_of = lambda x: nu.beta_p_value(x, mean, var)  # noqa: E731
    else:
        p_of = lambda x: nu.saddlepoint_p_value(x, lam, K_REAL, D_REAL)  # noqa: E731
    return {a: count_below(e, p_of, a) for a in (1e-2, 1e-3)}


@pytest.mark.parametrize("shape", sorted(REAL_SHAPES))
def test_saddlepoint_p_is_calibrated_at_the_real_size(shape):
    """Haar-random 8-dim subspaces of R^576 against the default run's spectrum shapes: the
    claims' p (saddlepoint) rejects at α = 1e-2 and 1e-3 no more often than α allows
    (binomial bound at level 1e-4; 10⁵ draws, ~2 s each). Measured: 0.92–0.97·α."""
    n = 100_000
    counts = _real_size_rejections(REAL_SHAPES[shape], n, 11, "saddlepoint")
    for a, x in counts.items():
        assert x <= stats.binom.ppf(1 - BINOM_LEVEL, n, a), f"{shape}: {x}/{n} below α={a}"
        assert x >= stats.binom.ppf(BINOM_LEVEL, n, 0.7 * a), f"{shape}: {x}/{n}, too conservative"


@pytest.mark.xfail(
    strict=True,
    reason="finding: the moment-matched Beta (SPEC §4) rejects 1.4× (α = 1e-2) and 2.4× "
    "(α = 1e-3) too often for weight-diff spectra at d = 576, k = 8; claims use the saddlepoint",
)
def test_beta_p_is_calibrated_at_the_real_size_for_weight_spectra():
    n = 100_000
    counts = _real_size_rejections(REAL_SHAPES["weight"], n, 12, "beta")
    assert all(x <= stats.binom.ppf(1 - BINOM_LEVEL, n, a) for a, x in counts.items()), counts


def test_layer_mean_p_is_calibrated_at_the_real_size():
    """Slower check (~15 s): layer means of 8 layers at d = 576, k = 8 — the per-layer null
    (independent subspaces; ``layer_mean_saddlepoint_p_value``) and the global null (one
    shared subspace: the single-subspace p on Ā's spectrum) — at α = 1e-2 and 1e-3."""
    L, n = 8, 15_000
    layers = [label_like_spectrum(top) for top in np.linspace(0.98, 0.86, L)]
    weights = [weight_like_spectrum(ex) for ex in np.linspace(1.0, 1.4, L)]
    for name, specs in (("label", layers), ("weight", weights)):
        r = np.zeros(n)
        for l, lam in enumerate(specs):
            r += nu.diagonal_null_energies(lam, K_REAL, D_REAL, n, 100 + l) * (D_REAL / K_REAL) / L
        p_of = lambda x: nu.layer_mean_saddlepoint_p_value(x, specs, [K_REAL] * L, D_REAL)  # noqa: E731,B023
        for a in (1e-2, 1e-3):
            x = count_below(r, p_of, a)
            assert x <= stats.binom.ppf(1 - BINOM_LEVEL, n, a), f"per-layer {name}: {x}/{n} at {a}"
    bar = mean_like_spectrum(weights, D_REAL, seed=4)
    bar = bar[bar > 1e-10 * bar[0]]
    bar = bar / bar.sum()
    e = nu.diagonal_null_energies(bar, K_REAL, D_REAL, n, 200)
    for a in (1e-2, 1e-3):
        x = count_below(e, lambda v: nu.saddlepoint_p_value(v, bar, K_REAL, D_REAL), a)
        assert x <= stats.binom.ppf(1 - BINOM_LEVEL, n, a), f"global weight Ā: {x}/{n} at {a}"
