"""Properties of the Benjamini–Hochberg adjustment used across all claims of a run."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ws_harness.scores import benjamini_hochberg

PROFILE = settings.get_profile("ws-invariants")

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
    # NaNs are not counted in m: same as adjusting the finite ones alone, and as scipy.
    assert np.allclose(q, benjamini_hochberg(raw), rtol=0, atol=1e-15)
    if raw.size:
        assert np.allclose(
            q, stats.false_discovery_control(raw, method="bh"), rtol=1e-12, atol=1e-15
        )
