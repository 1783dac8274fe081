"""p-values of the anisotropy-aware claims (SPEC §6 claim 4; issue 10, item 7).

r_w_struct against the structured null (Monte Carlo, (b+1)/(n+1)) and r_act_specific in the
clean-PC complement (exact-null saddlepoint; shared-subspace linearisation for global bases):
calibrated under their nulls, small under a planted signal, and aggregated over layers the
way R_act is (per-layer: independent subspaces; global: one shared subspace).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ws_harness import nulls as nu
from ws_harness import scores as sc

SLACK = 1e-4  # binomial false-alarm level of every rate bound below


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _anisotropic_w(d: int, seed: int, m: int | None = None) -> torch.Tensor:
    """A full-row-rank base write matrix with an uneven spectrum (like [W_o | W_down])."""
    g = _gen(seed)
    U = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0.0, -1.5, d, dtype=torch.float64)
    return (U * s) @ torch.randn(d, m or 3 * d, generator=g, dtype=torch.float64)


def _weight_target(d: int, seed: int, W: torch.Tensor, align: float = 0.0) -> sc.Target:
    """A rank-4 weight target; ``align`` > 0 tilts it towards W's top directions."""
    g = _gen(seed)
    M = torch.randn(d, 4, generator=g, dtype=torch.float64)
    if align:
        U = torch.linalg.svd(W, full_matrices=False)[0]
        M = M + align * U[:, :4] @ torch.randn(4, 4, generator=g, dtype=torch.float64)
    return sc.weight_target(M)


def _structured_bases(W: torch.Tensor, k: int, n: int, seed: int) -> torch.Tensor:
    """n bases drawn from the structured null itself: orth(W·G), G Gaussian (the old draw)."""
    G = torch.randn(n, W.shape[1], k, generator=_gen(seed), dtype=torch.float64)
    return torch.linalg.qr(W @ G)[0]


def test_structured_draws_have_the_law_of_structured_null():
    d, k = 24, 3
    W = _anisotropic_w(d, 0)
    t = _weight_target(d, 1, W)
    old = nu.structured_null(W, t.factor, k, 20_000, generator=2).numpy()
    new = nu.structured_null_draws(W, t.factor, 5, 20_000, generator=3).energies(k).numpy()
    assert stats.ks_2samp(old, new).pvalue > 1e-3
    # W ∝ I: the structured null is the ordinary (Haar) null, exact moments.
    iso = nu.structured_null_energies(2.0 * torch.eye(d), t.factor, k, 20_000, 4).numpy()
    mean, var = nu.null_moments(1.0, t.tr_a2, k, d)
    assert abs(iso.mean() - mean) < 4 * math.sqrt(var / iso.size)
    assert abs(iso.var() / var - 1) < 0.05
    # Deterministic by seed; the same seed shares Z across layers (global coupling).
    a = nu.structured_null_draws(W, t.factor, k, 300, generator=9).energies(k)
    assert torch.equal(a, nu.structured_null_draws(W, t.factor, k, 300, generator=9).energies(k))


def test_coupled_layers_get_the_per_layer_draws_bit_for_bit():
    """A global basis's null draws each chunk of Z once for every layer: the energies must be
    exactly those of one structured_null_draws per layer with the same seed (chunks of 70 so
    a partial last chunk is covered), and a layer of another width is refused."""
    d, k_max, n = 20, 4, 300
    Ws = [_anisotropic_w(d, s) for s in (20, 21, 22)]
    targets = [_weight_target(d, 30 + i, W) for i, W in enumerate(Ws)]
    coupled = nu.coupled_structured_energies(Ws, [t.factor for t in targets], k_max, n,
                                             generator=5, chunk=70)
    for W, t, table in zip(Ws, targets, coupled, strict=True):
        alone = nu.structured_null_draws(W, t.factor, k_max, n, generator=5, chunk=70)
        assert table.shape == (k_max, n)
        for k in range(1, k_max + 1):
            assert torch.equal(table[k - 1], alone.energies(k))
    with pytest.raises(ValueError, match="one residual width"):
        wide = _anisotropic_w(d + 1, 3)
        nu.coupled_structured_energies([Ws[0], wide],
                                       [targets[0].factor, _weight_target(d + 1, 4, wide).factor],
                                       k_max, n)


def test_structured_p_is_calibrated_and_detects_a_planted_signal():
    """Bases drawn from the structured null get p ≤ α no more often than α allows (α = 1%, 5%);
    a basis on the target's top directions (where W writes weakly) gets p = 1/(n+1)."""
    d, k, n_ref, n_test = 24, 3, 4000, 3000
    W = _anisotropic_w(d, 10)
    t = _weight_target(d, 11, W, align=2.0)
    ref = sc.structured_reference(t, W, k, n_samples=n_ref, generator=12)
    ps = np.array([sc.structured_test(B, t, ref)[1] for B in _structured_bases(W, k, n_test, 13)])
    for a in (0.01, 0.05):
        assert (ps <= a).sum() <= stats.binom.ppf(1 - SLACK, n_test, a), (a, (ps <= a).mean())
    assert (ps <= 0.05).sum() >= stats.binom.ppf(SLACK, n_test, 0.03)  # not stuck at 1
    planted = sc.oracle_basis(t, k).double()
    r, p = sc.structured_test(planted, t, ref)
    assert r > 1.5 and p == pytest.approx(1 / (n_ref + 1))
    # r_w_struct is the ratio to the structured mean; untouched layers are NaN.
    assert math.isnan(sc.structured_test(planted, None, None)[1])


@pytest.mark.parametrize("coupled", [False, True])
def test_structured_layer_mean_p_is_calibrated(coupled):
    """Layer mean of r_w_struct: per-layer bases vs independent draws (seed per layer) and a
    global basis (one G for every layer) vs shared draws (one seed); rate ≤ α + binomial slack."""
    d, k, L, n_ref, n_test = 16, 2, 3, 3000, 1200
    Ws = [_anisotropic_w(d, 20 + l) for l in range(L)]
    # Targets share direction structure, so a shared draw correlates the layers.
    ts = [_weight_target(d, 30, Ws[0], align=1.0) for _ in range(L)]
    refs = [sc.structured_reference(t, W, k, n_samples=n_ref, generator=0 if coupled else 40 + l)
            for l, (t, W) in enumerate(zip(ts, Ws, strict=True))]
    g = _gen(50)
    ps = []
    for _ in range(n_test):
        if coupled:  # one Gaussian Z in R^d, the subspace shaped by each layer: Σ_l^{1/2} Z
            Z = torch.randn(d, k, generator=g, dtype=torch.float64)
            Bs = []
            for W in Ws:
                ev, V = torch.linalg.eigh(W @ W.T)
                Bs.append(torch.linalg.qr((V * ev.clamp_min(0).sqrt()) @ V.T @ Z)[0])
        else:
            Bs = [torch.linalg.qr(W @ torch.randn(W.shape[1], k, generator=g,
                                                  dtype=torch.float64))[0] for W in Ws]
        ps.append(sc.structured_layer_mean(Bs, ts, refs)[1])
    ps = np.array(ps)
    for a in (0.01, 0.05):
        assert (ps <= a).sum() <= stats.binom.ppf(1 - SLACK, n_test, a), (a, (ps <= a).mean())
    planted = [sc.oracle_basis(t, k).double() for t in ts]
    r, p = sc.structured_layer_mean(planted, ts, refs)
    assert r > 1.5 and p == pytest.approx(1 / (n_ref + 1))


def _labels(d: int, n: int, seed: int, u: torch.Tensor, top: float = 3.0) -> torch.Tensor:
    """Label-like samples: a dominant shared direction u plus isotropic noise."""
    g = _gen(seed)
    return top * torch.randn(n, 1, generator=g, dtype=torch.float64).abs() * u + torch.randn(
        n, d, generator=g, dtype=torch.float64
    ) * 0.3


def _clean(d: int, kc: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, kc, generator=_gen(seed), dtype=torch.float64))[0]


def test_specificity_p_is_calibrated_and_detects_a_planted_signal():
    """Per layer: Haar bases of R^d scored in the clean complement reject at ≤ α; the label's
    dominant specific direction gets a tiny p."""
    d, k, kc, n = 32, 3, 4, 2000
    u = torch.nn.functional.normalize(torch.randn(d, generator=_gen(1), dtype=torch.float64), dim=0)
    X, C = _labels(d, 20, 2, u), _clean(d, kc, 3)
    Q = torch.linalg.qr(torch.randn(n, d, k, generator=_gen(4), dtype=torch.float64))[0]
    ps = np.array([sc.specificity(B, X, C, p_method="saddlepoint").p for B in Q])
    for a in (0.01, 0.05):
        assert (ps <= a).sum() <= stats.binom.ppf(1 - SLACK, n, a), (a, (ps <= a).mean())
    assert (ps <= 0.05).sum() >= stats.binom.ppf(SLACK, n, 0.03)
    B = torch.linalg.qr(torch.cat([u[:, None], Q[0][:, : k - 1]], 1))[0]
    s = sc.specificity(B, X, C, p_method="saddlepoint")
    assert s.r > 3 and s.p < 1e-6


@pytest.mark.parametrize("basis_kind", ["per_layer", "global"])
def test_specificity_summary_p_is_calibrated(basis_kind):
    """Layer mean of r_act_specific: per-layer bases (independent Haar per layer) and a global
    basis (one Haar subspace for every layer, each layer with its own clean PCs); the labels
    share a dominant direction, so a shared subspace correlates the layers. Rate ≤ α + slack."""
    d, k, kc, L, n = 32, 3, 4, 3, 1200
    u = torch.nn.functional.normalize(torch.randn(d, generator=_gen(5), dtype=torch.float64), dim=0)
    Xs = [_labels(d, 20, 6 + l, u) for l in range(L)]
    Cs = [_clean(d, kc, 10 + l) for l in range(L)]
    g = _gen(20)
    ps = []
    for _ in range(n):
        if basis_kind == "global":
            B = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
            Bs = [B] * L
        else:
            Bs = [torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
                  for _ in range(L)]
        ps.append(sc.specificity_summary(Bs, Xs, Cs, basis_kind).p)
    ps = np.array(ps)
    for a in (0.01, 0.05):
        assert (ps <= a).sum() <= stats.binom.ppf(1 - SLACK, n, a), (a, (ps <= a).mean())
    assert (ps <= 0.05).sum() >= stats.binom.ppf(SLACK, n, 0.02)
    planted = torch.linalg.qr(torch.cat([u[:, None], _clean(d, k - 1, 30)], 1))[0]
    summ = sc.specificity_summary([planted] * L, Xs, Cs, basis_kind)
    assert summ.mean_r > 3 and summ.p < 1e-6


def test_global_specificity_needs_the_shared_null():
    """For a global basis the independent per-layer null understates the variance of the mean
    (the layers' labels share a direction): it rejects random global bases too often, which is
    why specificity_summary(global) uses the shared-subspace p."""
    d, k, kc, L, n = 32, 3, 4, 4, 1500
    u = torch.nn.functional.normalize(torch.randn(d, generator=_gen(5), dtype=torch.float64), dim=0)
    Xs = [_labels(d, 20, 6 + l, u, top=5.0) for l in range(L)]
    Cs = [_clean(d, kc, 10 + l) for l in range(L)]
    g = _gen(21)
    wrong, right = [], []
    for _ in range(n):
        B = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
        wrong.append(sc.specificity_summary([B] * L, Xs, Cs, "per_layer").p)
        right.append(sc.specificity_summary([B] * L, Xs, Cs, "global").p)
    a = 0.01
    assert (np.array(wrong) <= a).sum() > stats.binom.ppf(1 - SLACK, n, a)
    assert (np.array(right) <= a).sum() <= stats.binom.ppf(1 - SLACK, n, a)


def test_specificity_summary_wiring():
    """per_layer is summarize_layers on the complement targets; one layer reduces to the
    single-layer saddlepoint p; layers with no basis are skipped."""
    d, k, kc = 24, 2, 3
    u = torch.nn.functional.normalize(torch.randn(d, generator=_gen(7), dtype=torch.float64), dim=0)
    X, C = _labels(d, 12, 8, u), _clean(d, kc, 9)
    B = torch.linalg.qr(torch.randn(d, k, generator=_gen(10), dtype=torch.float64))[0]
    one = sc.specificity(B, X, C, p_method="saddlepoint")
    for kind in ("per_layer", "global"):
        s = sc.specificity_summary([B, None], [X, X], [C, C], kind)
        assert s.n_layers == 1 and s.mean_r == pytest.approx(one.r)
        assert s.p == pytest.approx(one.p, rel=1e-9)
    with pytest.raises(ValueError, match="basis_kind"):
        sc.specificity_summary([B], [X], [C], "both")
