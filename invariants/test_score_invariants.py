"""Properties of E/R scores: invariances, ranges, Ky Fan, specificity, bootstrap, summaries."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import SPECTRA, build, seeds, target_cases

from ws_harness import linalg as la
from ws_harness import scores as sc

PROFILE = settings.get_profile("ws-invariants")
E_TOL = 1e-5  # float32 factors and bases; E ≤ 1 is accumulated in float64
F32_EPS = torch.finfo(torch.float32).eps


def f32_dot_tol(d: int, scale: float) -> float:
    """Rounding allowance for a quantity built from length-d float32 dot products.

    The worst-case error of a float32 dot product is ~d·eps relative, and the summation
    order (SIMD width, blocking) differs between CPUs, so two mathematically equal results
    may differ by that much: tolerances follow the dtype, not one machine's rounding.
    """
    return 4 * d * F32_EPS * max(abs(scale), 1.0)


def dense_a(target: sc.Target) -> np.ndarray:
    F = target.factor.double().numpy()
    return F @ F.T


@settings(PROFILE)
@given(case=target_cases(), data=st.data())
def test_r_invariant_to_rotation_and_sign(case, data, make_samples, make_weight, make_haar):
    t, _ = build(case, make_samples, make_weight)
    k = data.draw(st.integers(1, t.d), label="k")
    B = make_haar(case[1] + 11, t.d, k)
    Q = make_haar(case[1] + 12, k, k)  # random orthogonal k×k
    signs = torch.where(
        torch.rand(k, generator=torch.Generator().manual_seed(case[1])) < 0.5, -1.0, 1.0
    )
    base = sc.recovery(B, t)
    for B2 in (B @ Q, B * signs):
        s = sc.recovery(B2, t)
        assert abs(s.e - base.e) <= E_TOL
        assert abs(s.r - base.r) <= E_TOL * t.d / k
        assert s.k == base.k and s.d == base.d


@settings(PROFILE)
@given(case=target_cases(), data=st.data())
def test_energy_in_unit_interval_and_matches_trace(
    case, data, make_samples, make_weight, make_haar
):
    t, _ = build(case, make_samples, make_weight)
    k = data.draw(st.integers(1, t.d), label="k")
    B = make_haar(case[1] + 21, t.d, k)
    s = sc.recovery(B, t)
    assert -E_TOL <= s.e <= 1.0 + E_TOL
    assert math.isclose(s.r, s.e * t.d / k, rel_tol=1e-12)
    # E = tr(BᵀAB) with A built densely and independently.
    Bn = B.double().numpy()
    assert abs(s.e - float(np.trace(Bn.T @ dense_a(t) @ Bn))) <= E_TOL
    # tr A = 1 and tr A² from the small Gram agree with the dense A.
    A = dense_a(t)
    assert abs(np.trace(A) - 1.0) < 1e-5
    assert abs(t.tr_a2 - float(np.sum(A * A))) < 1e-5
    assert 0.0 <= s.p <= 1.0


@settings(PROFILE)
@given(case=target_cases())
def test_full_rank_basis_gives_r_one(case, make_samples, make_weight, make_haar):
    t, _ = build(case, make_samples, make_weight)
    s = sc.recovery(make_haar(case[1] + 31, t.d, t.d), t)
    assert abs(s.r - 1.0) <= E_TOL
    assert s.null_sd_r == 0.0 and s.z == 0.0 and s.p == 1.0  # the null is a point mass at k = d
    assert abs(sc.pct_oracle(make_haar(case[1] + 32, t.d, t.d), t) - 1.0) <= E_TOL


@settings(PROFILE)
@given(case=target_cases(), data=st.data())
def test_scaling_samples_or_diff_leaves_r_unchanged(
    case, data, make_samples, make_weight, make_haar
):
    t, raw = build(case, make_samples, make_weight)
    k = data.draw(st.integers(1, t.d), label="k")
    B = make_haar(case[1] + 41, t.d, k)
    g = torch.Generator().manual_seed(case[1] + 42)
    if case[0] == "act":  # each prompt's label rescaled independently (x̂_i is what counts)
        c = torch.exp(torch.empty(raw.shape[0]).uniform_(-6.0, 6.0, generator=g))
        t2 = sc.activation_target(raw * c[:, None])
    else:
        t2 = sc.weight_target(
            raw * math.exp(float(torch.empty(1).uniform_(-6.0, 6.0, generator=g)))
        )
    s1, s2 = sc.recovery(B, t), sc.recovery(B, t2)
    assert abs(s1.e - s2.e) <= E_TOL
    assert abs(s1.null_sd_r - s2.null_sd_r) <= 1e-4 * max(s1.null_sd_r, 1e-3)


@settings(PROFILE)
@given(case=target_cases(), data=st.data())
def test_ky_fan_no_basis_beats_its_oracle(case, data, make_samples, make_weight, make_haar):
    t, _ = build(case, make_samples, make_weight)
    k = data.draw(st.integers(1, t.d), label="k")
    evals = np.sort(np.linalg.eigvalsh(dense_a(t)))[::-1]  # independent of the code under test
    bound = float(evals[:k].sum())
    assert abs(sc.oracle_energy(t, k) - bound) <= 1e-6
    O = sc.oracle_basis(t, k)
    assert O.shape[1] <= k
    assert abs(t.energy(O) - bound) <= E_TOL  # dropped directions carry ~0 eigenvalue
    assert sc.pct_oracle(O, t) >= 1.0 - 1e-4
    # Competitors: a random basis and a perturbed oracle (close to optimal, never above it).
    eps = data.draw(st.sampled_from([1e-3, 1e-1, 1.0]), label="eps")
    noise = torch.randn(t.d, k, generator=torch.Generator().manual_seed(case[1] + 51))
    padded = (
        torch.cat([O, make_haar(case[1] + 52, t.d, k - O.shape[1])], 1) if O.shape[1] < k else O
    )
    for B in (make_haar(case[1] + 53, t.d, k), la.orthonormalize(padded + eps * noise)):
        assert t.energy(B) <= sc.oracle_energy(t, B.shape[1]) + E_TOL
        assert 0.0 <= sc.pct_oracle(B, t) <= 1.0
    assert 0.0 <= sc.diff_overlap(make_haar(case[1] + 54, t.d, k), t) <= 1.0 + 1e-6
    assert abs(sc.diff_overlap(O, t) - 1.0) <= 1e-5


@settings(PROFILE)
@given(seed=seeds, d=st.integers(6, 40), n=st.integers(2, 20), data=st.data())
def test_specificity_scores_in_the_complement(seed, d, n, data, make_samples, make_haar):
    kc = data.draw(st.integers(1, d - 2), label="k_clean")
    k = data.draw(st.integers(1, d - kc), label="k")
    C = make_haar(seed, d, kc)
    X = make_samples(seed + 1, n, d, data.draw(st.sampled_from(SPECTRA), label="spectrum"))
    # Samples and basis already orthogonal to C: removal changes only the ambient dimension.
    X_perp = la.project_out(X.T.double(), C.double()).T.float()
    # A sample inside span(C) has no specific part (that raises; covered in tests/).
    assume(not bool((X_perp.norm(dim=1) < 1e-3 * X.norm(dim=1)).any()))
    B = la.remove_subspace(make_haar(seed + 2, d, k + kc), C)[:, :k]
    plain = sc.recovery(B, sc.activation_target(X_perp))
    spec = sc.specificity(B, X_perp, C)
    assert spec.d == d - kc and spec.k == k
    assert abs(spec.e - plain.e) <= E_TOL
    assert abs(spec.r - plain.e * (d - kc) / k) <= E_TOL * d
    # A basis inside span(C) has nothing specific left.
    inside = sc.specificity(C[:, : min(k, kc)], X, C)
    assert not inside.defined and inside.k == 0
    # A mixed basis keeps exactly its part outside C.
    mixed = la.orthonormalize(torch.cat([C[:, :1], B], 1))
    assert sc.specificity(mixed, X_perp, C).k == k


@settings(PROFILE, max_examples=15)
@given(seed=seeds, d=st.integers(4, 32), n=st.integers(2, 20), data=st.data())
def test_bootstrap_ci_is_seeded_and_scale_free(seed, d, n, data, make_samples, make_haar):
    k = data.draw(st.integers(1, d), label="k")
    X = make_samples(seed, n, d, data.draw(st.sampled_from(SPECTRA), label="spectrum"))
    B = make_haar(seed + 1, d, k)
    lo, hi = sc.bootstrap_r_act_ci(B, X, n_boot=200, seed=3)
    assert (lo, hi) == sc.bootstrap_r_act_ci(B, X, n_boot=200, seed=3)
    assert lo <= hi
    r = sc.recovery(B, sc.activation_target(X)).r
    # Every resample's mean lies within the per-sample range, hence so does the CI.
    e_i = (B.double().T @ (X.double() / X.double().norm(dim=1, keepdim=True)).T).square().sum(0)
    tol = f32_dot_tol(d, d / k)  # the CI's per-prompt energies come from a float32 matmul
    assert float(e_i.min()) * d / k - tol <= lo and hi <= float(e_i.max()) * d / k + tol
    c = torch.exp(torch.linspace(-3, 3, n))[:, None]
    lo2, hi2 = sc.bootstrap_r_act_ci(B, X * c, n_boot=200, seed=3)
    assert abs(lo2 - lo) <= 1e-4 * max(r, 1.0) and abs(hi2 - hi) <= 1e-4 * max(r, 1.0)
    # n identical prompts: the CI collapses to a point, up to float32 rounding of the
    # per-prompt energies (columns of one matmul may round differently; 4.1e-8 relative was
    # measured on an AMD EPYC for d = 8), never to a width of the order of R itself.
    same = sc.bootstrap_r_act_ci(B, X[:1].repeat(n, 1), n_boot=50, seed=0)
    assert abs(same[0] - same[1]) <= f32_dot_tol(d, same[0])


@settings(PROFILE)
@given(case=target_cases(d_max=32), n_layers=st.integers(1, 5), data=st.data())
def test_layer_summaries(case, n_layers, data, make_samples, make_weight, make_haar):
    kind, seed, d, size, spectrum = case
    k = data.draw(st.integers(1, d), label="k")
    targets = [
        build((kind, seed + 100 * l, d, size, spectrum), make_samples, make_weight)[0]
        for l in range(n_layers)
    ]
    B = make_haar(seed + 61, d, k)
    scores = [sc.recovery(B, t) for t in targets]
    for basis_kind in ("per_layer", "global"):
        s = sc.summarize_layers(scores, targets, basis_kind)
        assert s.n_layers == n_layers
        assert abs(s.mean_r - float(np.mean([x.r for x in scores]))) <= 1e-12
        if n_layers == 1:  # one layer: the summary is the layer's own score
            assert abs(s.null_sd_r - scores[0].null_sd_r) <= 1e-9 * max(scores[0].null_sd_r, 1.0)
            assert abs(s.p - scores[0].p) <= 1e-6 and abs(s.z - scores[0].z) <= 1e-6
            sp = sc.summarize_layers(scores, targets, basis_kind, p_method="saddlepoint")
            sp_single = sc.recovery(B, targets[0], p_method="saddlepoint").p
            assert abs(sp.p - sp_single) <= 1e-9
        # Untouched layers (None targets → NaN scores) are excluded, not counted as 0.
        padded_t = [None] + targets + [None]
        padded_s = [sc.recovery(B, None)] + scores + [sc.recovery(B, None)]
        s2 = sc.summarize_layers(padded_s, padded_t, basis_kind)
        assert (s2.n_layers, s2.mean_r, s2.null_sd_r, s2.p) == (
            s.n_layers,
            s.mean_r,
            s.null_sd_r,
            s.p,
        )
    # Same target at every layer: a shared subspace does not average out, independent ones do.
    same = [targets[0]] * n_layers
    same_scores = [scores[0]] * n_layers
    g = sc.summarize_layers(same_scores, same, "global")
    p = sc.summarize_layers(same_scores, same, "per_layer")
    assert abs(g.null_sd_r - scores[0].null_sd_r) <= 1e-9 * max(scores[0].null_sd_r, 1.0)
    assert abs(p.null_sd_r - scores[0].null_sd_r / math.sqrt(n_layers)) <= 1e-9 * max(
        scores[0].null_sd_r, 1
    )
