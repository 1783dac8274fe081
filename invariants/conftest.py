"""Hypothesis profile and data-factory fixtures of the property-based invariants.

The strategies and factories themselves live in strategies.py (one definition each); the
fixtures below hand the factories to tests that take them as arguments.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from strategies import haar, samples, weight

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
