"""Input validation of the scoring core (clear errors) and a few exact known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ws_harness import linalg as la
from ws_harness import nulls as nu
from ws_harness import scores as sc


def eye_cols(d: int, cols: list[int]) -> torch.Tensor:
    return torch.eye(d)[:, cols]


# --- validate_basis -------------------------------------------------------------------------


def test_validate_basis_accepts_orthonormal():
    B = eye_cols(5, [0, 2])
    assert la.validate_basis(B, 5) is B


@pytest.mark.parametrize(
    ("B", "exc", "match"),
    [
        ([[1.0, 0.0]], TypeError, "must be a torch.Tensor"),
        (torch.eye(4, dtype=torch.int64), TypeError, "floating"),
        (torch.ones(4), ValueError, "2-D"),
        (torch.eye(4)[:, :2].T.contiguous(), ValueError, "expected d=4"),
        (torch.zeros(4, 0), ValueError, "rank 0"),
        (torch.full((4, 1), math.nan), ValueError, "4 non-finite"),
        (2.0 * torch.eye(4)[:, :2], ValueError, r"max \|BᵀB − I\| = 3"),
    ],
)
def test_validate_basis_names_the_defect(B, exc, match):
    with pytest.raises(exc, match=match):
        la.validate_basis(B, 4, name="basis")


def test_validate_basis_reports_wrong_d_expected_vs_got():
    with pytest.raises(ValueError, match=r"has 3 rows, expected d=5"):
        la.validate_basis(torch.eye(3), 5)


# --- targets ---------------------------------------------------------------------------------


def test_activation_target_names_zero_rows():
    X = torch.randn(5, 8)
    X[3] = 0.0
    with pytest.raises(ValueError, match=r"row\(s\) \[3\]"):
        sc.activation_target(X)


def test_activation_target_rejects_bad_input():
    with pytest.raises(TypeError, match="torch.Tensor"):
        sc.activation_target(np.ones((3, 4)))
    with pytest.raises(ValueError, match="2-D"):
        sc.activation_target(torch.ones(4))
    X = torch.ones(3, 4)
    X[1, 2] = math.inf
    with pytest.raises(ValueError, match="1 non-finite"):
        sc.activation_target(X)


def test_untouched_layers_flow_as_nan_never_zero():
    d = 6
    assert sc.weight_target(None) is None
    assert sc.weight_target(torch.zeros(d, 4)) is None
    assert sc.combined_weight_target([None, torch.zeros(d, 9)]) is None
    B = eye_cols(d, [0, 1])
    s = sc.recovery(B, None)
    assert not s.defined and math.isnan(s.r) and math.isnan(s.p) and s.k == 2
    assert math.isnan(sc.pct_oracle(B, None)) and math.isnan(sc.diff_overlap(B, None))
    with pytest.raises(ValueError, match="untouched"):
        sc.oracle_basis(None, 2)
    # A malformed basis is still rejected without a target.
    with pytest.raises(ValueError, match="not orthonormal"):
        sc.recovery(2.0 * B, None)


def test_combined_target_balances_and_skips_untouched_parts():
    d = 4
    M_o = torch.zeros(d, 4)
    M_o[0, 0] = 1.0  # writes along e0
    M_down = torch.zeros(d, 12)
    M_down[1, :] = 100.0  # much larger, along e1
    t = sc.combined_weight_target([M_o, M_down])
    # Balanced: each tensor contributes half of tr A regardless of its norm or width.
    assert t.energy(eye_cols(d, [0])) == pytest.approx(0.5, abs=1e-6)
    assert t.energy(eye_cols(d, [1])) == pytest.approx(0.5, abs=1e-6)
    only_o = sc.combined_weight_target([M_o, torch.zeros(d, 12)])
    assert only_o.energy(eye_cols(d, [0])) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="expected d=4"):
        sc.combined_weight_target([M_o, torch.ones(5, 3)])
    with pytest.raises(TypeError, match="sequence"):
        sc.combined_weight_target(M_o)


def test_target_requires_unit_trace():
    with pytest.raises(ValueError, match="expected 1"):
        sc.Target(torch.ones(3, 2))


# --- exact known values ----------------------------------------------------------------------


def test_rank_one_known_values():
    """d = 4, k = 2, A = e0e0ᵀ, B = [e0, e1]: E = 1, R = 2, Var E = 2k(d−k)/(d²(d+2)) = 1/12."""
    d, k = 4, 2
    t = sc.weight_target(eye_cols(d, [0]) * 3.0)
    s = sc.recovery(eye_cols(d, [0, 1]), t)
    assert (s.k, s.d) == (2, 4)
    assert s.e == pytest.approx(1.0, abs=1e-7)
    assert s.r == pytest.approx(2.0, abs=1e-6)
    assert s.null_sd_e == pytest.approx(math.sqrt(1 / 12), rel=1e-12)
    assert s.null_sd_r == pytest.approx(math.sqrt(1 / 12) * d / k, rel=1e-12)
    assert s.z == pytest.approx(1.0 / (math.sqrt(1 / 12) * 2), rel=1e-6)
    assert s.p == pytest.approx(0.0, abs=1e-6)  # E = 1 is the top of the support
    # Orthogonal basis: E = 0, p = 1.
    s0 = sc.recovery(eye_cols(d, [2, 3]), t)
    assert s0.e == 0.0 and s0.p == pytest.approx(1.0)
    # Midway: p equals the exact Beta(k/2, (d−k)/2) tail.
    B = torch.tensor([[math.sqrt(0.3)], [math.sqrt(0.7)], [0.0], [0.0]])
    s1 = sc.recovery(B, t)
    assert s1.e == pytest.approx(0.3, abs=1e-6)
    assert s1.p == pytest.approx(stats.beta(0.5, 1.5).sf(s1.e), abs=1e-9)
    assert sc.recovery(B, t, p_method="saddlepoint").p == pytest.approx(s1.p, abs=1e-12)


def test_null_moments_known_values_and_errors():
    mean, var = nu.null_moments(1.0, 0.5, 3, 10)
    assert mean == pytest.approx(0.3)
    assert var == pytest.approx(2 * 3 * 7 / (10 * 9 * 12) * (0.5 - 0.1))
    assert nu.null_moments(1.0, 0.3, 10, 10) == (1.0, 0.0)
    with pytest.raises(ValueError, match=r"k must be in \[0, d=4\]"):
        nu.null_moments(1.0, 1.0, 5, 4)
    with pytest.raises(TypeError, match="k must be an int"):
        nu.null_moments(1.0, 1.0, 2.0, 4)


def test_degenerate_null_p_values():
    assert nu.beta_p_value(0.25, 0.25, 0.0) == 1.0  # isotropic A: every basis scores k/d
    assert nu.beta_p_value(1.0, 1.0, 0.0) == 1.0  # k = d
    assert math.isnan(nu.beta_p_value(math.nan, 0.5, 0.01))
    with pytest.raises(ValueError, match="null mean"):
        nu.beta_p_value(0.5, 1.5, 0.01)


def test_mc_p_value_is_b_plus_one_over_m_plus_one():
    samples = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert nu.mc_p_value(samples, 0.25) == pytest.approx(3 / 5)
    assert nu.mc_p_value(samples, 0.9) == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="at least one"):
        nu.mc_p_value(torch.zeros(0), 0.5)


def test_benjamini_hochberg_known_values():
    p = [0.01, 0.04, math.nan, 0.03, 0.5]
    adj = sc.benjamini_hochberg(p)
    np.testing.assert_allclose(adj[[0, 1, 3, 4]], [0.04, 0.16 / 3, 0.16 / 3, 0.5], rtol=1e-12)
    assert math.isnan(adj[2])
    assert sc.benjamini_hochberg([]).shape == (0,)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        sc.benjamini_hochberg([0.5, 1.5])


def test_summaries_known_values_and_errors():
    d = 4
    t = sc.weight_target(eye_cols(d, [0]))
    B = eye_cols(d, [0])
    s = sc.recovery(B, t)
    summary = sc.summarize_layers([s, sc.recovery(B, None), s], [t, None, t], "per_layer")
    assert summary.n_layers == 2 and summary.mean_r == pytest.approx(4.0, abs=1e-5)
    assert summary.null_sd_r == pytest.approx(s.null_sd_r / math.sqrt(2), rel=1e-12)
    glob = sc.summarize_layers([s, s], [t, t], "global")
    assert glob.null_sd_r == pytest.approx(s.null_sd_r, rel=1e-12)
    empty = sc.summarize_layers([sc.recovery(B, None)], [None], "global")
    assert empty.n_layers == 0 and math.isnan(empty.mean_r) and math.isnan(empty.p)
    with pytest.raises(ValueError, match="targets"):
        sc.summarize_layers([s], None, "global")
    with pytest.raises(ValueError, match="2 targets"):
        sc.summarize_layers([s], [t, t])
    with pytest.raises(ValueError, match="layer 0: score is defined but target is None"):
        sc.summarize_layers([s], [None])
    with pytest.raises(ValueError, match="basis_kind"):
        sc.summarize_layers([s], [t], "pooled")
    s2 = sc.recovery(eye_cols(d, [0, 1]), t)
    with pytest.raises(ValueError, match="one rank"):
        sc.summarize_layers([s, s2], [t, t], "global")


def test_specificity_errors_and_no_removal():
    d = 6
    X = torch.randn(5, d, generator=torch.Generator().manual_seed(0))
    B = eye_cols(d, [0, 1])
    same = sc.specificity(B, X, torch.zeros(d, 0))
    assert same == sc.recovery(B, sc.activation_target(X))
    with pytest.raises(ValueError, match="leaving nothing"):
        sc.specificity(B, X, torch.eye(d))
    X_in = torch.zeros(5, d)
    X_in[:, 0] = 1.0
    with pytest.raises(ValueError, match="inside the clean PCs"):
        sc.specificity(B, X_in, eye_cols(d, [0]))


def test_recovery_argument_errors():
    t = sc.activation_target(torch.randn(4, 5))
    B = eye_cols(5, [0])
    with pytest.raises(ValueError, match="null must be"):
        sc.recovery(B, t, null="bootstrap")
    with pytest.raises(ValueError, match="p_method must be"):
        sc.recovery(B, t, p_method="normal")
    with pytest.raises(TypeError, match="Target or None"):
        sc.recovery(B, torch.eye(5))
    with pytest.raises(ValueError, match="expected d=5"):
        sc.recovery(eye_cols(4, [0]), t)
    with pytest.raises(ValueError, match="level"):
        sc.bootstrap_r_act_ci(B, torch.randn(4, 5), level=95)


def test_structured_null_needs_rank():
    t = sc.weight_target(torch.randn(6, 3))
    W = torch.zeros(6, 10)
    W[0, 0] = 1.0
    with pytest.raises(ValueError, match=r"rank 1 < k=2"):
        sc.structured_recovery(eye_cols(6, [0, 1]), t, W)
    with pytest.raises(ValueError, match="expected d=6"):
        nu.structured_null(torch.eye(5), t.factor, 1)


def test_linalg_helpers_known_values():
    assert la.orthonormalize(torch.zeros(5, 3)).shape == (5, 0)
    assert la.pca_basis(torch.randn(1, 5), 3).shape == (5, 0)
    # Two samples support one centered direction: their difference.
    X = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    B = la.pca_basis(X, 3)
    assert B.shape == (3, 1)
    assert abs(float(B[:, 0] @ torch.tensor([1.0, -1.0, 0.0]))) == pytest.approx(
        math.sqrt(2), abs=1e-6
    )
    assert la.effective_rank(torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(2.0)
    assert la.effective_rank(torch.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="negative"):
        la.effective_rank(torch.tensor([1.0, -1.0]))
    angles = la.principal_angles(
        eye_cols(3, [0]), torch.tensor([[1.0], [1.0], [0.0]]) / math.sqrt(2)
    )
    assert float(angles[0]) == pytest.approx(math.pi / 4, abs=1e-6)
    with pytest.raises(ValueError, match="same R"):
        la.overlap(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match="at most 3"):
        la.bottom_right_basis(torch.randn(5, 3), 4)


def test_per_diff_memos_give_the_uncached_numbers():
    """oracle_basis and the layer-mean Gram are memoised per target (every basis scored against
    a diff needs them): the memo returns what a fresh computation gives, and a caller editing
    the returned basis does not corrupt the next one."""
    from ws_harness.linalg import left_basis
    from ws_harness.scores import _mean_gram, mean_spectrum, mean_tr_a2, oracle_basis, weight_target

    g = torch.Generator().manual_seed(0)
    targets = [weight_target(torch.randn(32, 6, generator=g, dtype=torch.float64)) for _ in range(3)]
    first = oracle_basis(targets[0], 4)
    assert torch.equal(first, left_basis(targets[0].factor, 4))
    first.zero_()
    assert torch.equal(oracle_basis(targets[0], 4), left_basis(targets[0].factor, 4))
    assert oracle_basis(targets[0], 2).shape == (32, 2)
    with_gap = [targets[0], None, targets[2]]
    for _ in range(2):  # second round: from the memo
        assert mean_tr_a2(with_gap) == float(_mean_gram(with_gap).square().sum())
        spectrum = mean_spectrum(with_gap)
        assert torch.equal(spectrum, torch.linalg.eigvalsh(_mean_gram(with_gap)).flip(0).clamp_min(0.0))
        spectrum.zero_()
