"""Properties of the Benjamini–Hochberg adjustment used across all claims of a run."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ws_harness.scores import benjamini_hochberg

PROFILE = settings.get_profile("ws-invariants")
LEVELS = (0.001, 0.0137, 0.05, 0.1, 0.2718)  # FDR levels q for the rejection-set check


def step_up_reference(p: np.ndarray) -> np.ndarray:
    """BH from its definition, O(m²) and without running minima or scatter-back:
    adj_i = min(1, min over sorted positions j (1-based) with p_(j) ≥ p_i of p_(j)·m/j)."""
    m = p.size
    srt = sorted(float(x) for x in p)
    return np.array(
        [min(1.0, min(srt[j] * m / (j + 1) for j in range(m) if srt[j] >= x)) for x in p]
    )


def step_up_rejections(p: np.ndarray, q: float) -> np.ndarray:
    """The BH procedure at level q: reject the k smallest, k = max{j: p_(j) ≤ j·q/m}."""
    m = p.size
    srt = np.sort(p)
    k = max((j for j in range(1, m + 1) if srt[j - 1] <= j * q / m), default=0)
    return p <= srt[k - 1] if k else np.zeros(m, dtype=bool)


p_lists = st.lists(
    st.one_of(st.floats(0.0, 1.0), st.just(math.nan), st.sampled_from([0.0, 0.01, 0.01, 1.0])),
    min_size=0,
    max_size=60,
)


@settings(PROFILE, max_examples=200)
@given(p_lists)
def test_bh_is_monotone_bounded_and_nan_aware(values):
    p = np.array(values, dtype=float)
    adj = benjamini_hochberg(p)
    assert adj.shape == p.shape
    nan = np.isnan(p)
    assert np.array_equal(np.isnan(adj), nan)  # NaNs stay NaN, nothing else becomes NaN
    q, raw = adj[~nan], p[~nan]
    assert (q >= raw - 1e-15).all() and (q <= 1.0).all()
    order = np.argsort(raw, kind="stable")
    assert (np.diff(q[order]) >= -1e-15).all()  # monotone in the order of the raw p-values
    # NaNs are not counted in m: same as adjusting the finite ones alone, and as the definition.
    assert np.allclose(q, benjamini_hochberg(raw), rtol=0, atol=1e-15)
    assert np.allclose(q, step_up_reference(raw), rtol=0, atol=1e-15)
    # adj ≤ q is exactly the step-up rejection set at level q (skipping levels that a scaled
    # p-value hits to within rounding, where either side of the boundary is correct).
    scaled = np.sort(raw) * raw.size / np.arange(1, raw.size + 1)
    for level in LEVELS:
        if not (np.abs(scaled - level) < 1e-12).any():
            assert np.array_equal(q <= level, step_up_rejections(raw, level)), level
