"""Machinery tests run on the tiny random model; this file provides its session and a diff that steers it."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ws_harness.capture import capture_last_token
from ws_harness.session import HarnessSession
from ws_harness.steering import answer_token_ids

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def tiny(ws_session: HarnessSession) -> HarnessSession:
    """A HarnessSession on `random:tiny` (3 layers, d=64, GQA 4/2) sharing the run's cache;
    forwards on the CPU in float32 on every machine (the machinery tests compare with CPU numbers)."""
    return HarnessSession(replace(ws_session.config, model="random:tiny", device="cpu",
                                  dtype="float32"))


def make_steering_diff(session: HarnessSession, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """A hand-made diff that steers a random model: each layer's down_proj writes along
    W_U[Yes] − W_U[No] in proportion to the MLP's mean FIT activation (rank 1 per layer)."""
    arch = session.arch
    yes, no = answer_token_ids(session.tokenizer, session.behaviour.answer_tokens)
    u = arch.unembedding[yes] - arch.unembedding[no]
    caps = capture_last_token(session.model, arch, session.probes("fit"), mlp=True)
    w = {}
    for layer in range(arch.n_layers):
        weights = arch.layer(layer)
        h = caps["up_in"][layer]
        v = (F.silu(h @ weights.gate.T) * (h @ weights.up.T)).mean(0)
        w[arch.param_name(layer, "down")] = scale * torch.outer(u / u.norm(), v / v.norm().square())
    return w


@pytest.fixture(scope="session")
def steering_diff() -> Callable[..., dict[str, torch.Tensor]]:
    """make_steering_diff, for tests that build steering diffs on their own sessions."""
    return make_steering_diff


@pytest.fixture(scope="session")
def tiny_diff_files(tiny: HarnessSession, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two steering diffs for the tiny model saved as .pt files (stand-ins for two seeds)."""
    folder = tmp_path_factory.mktemp("diffs")
    paths = []
    for i, scale in enumerate((0.5, 0.8)):
        path = folder / f"w{i}.pt"
        torch.save(make_steering_diff(tiny, scale), path)
        paths.append(path)
    return paths


def _write_tiny_project(pytester: pytest.Pytester, cache: Path, diffs: list[Path]) -> Path:
    """A pytester project on random:tiny with the given diff files; returns its hypotheses/ folder."""
    pytester.makeconftest('pytest_plugins = ["ws_harness.plugin"]\n')
    pytester.makefile(".toml", pyproject=textwrap.dedent(f"""
        [tool.ws_harness]
        model = "random:tiny"
        diff = "{','.join(str(p) for p in diffs)}"
        rank = 4
        cache_dir = "{cache}"
        out = "out"
    """))
    folder = pytester.path / "hypotheses"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def write_tiny_project() -> Callable[[pytest.Pytester, Path, list[Path]], Path]:
    """The project writer shared by the pytester sweeps (contract and snapshot-gate tests)."""
    return _write_tiny_project
