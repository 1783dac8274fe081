"""Machinery tests run on the tiny random model; this file provides its session."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ws_harness.session import HarnessSession

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def tiny(ws_session: HarnessSession) -> HarnessSession:
    """A HarnessSession on `random:tiny` (3 layers, d=64, GQA 4/2) sharing the run's cache."""
    return HarnessSession(replace(ws_session.config, model="random:tiny"))
