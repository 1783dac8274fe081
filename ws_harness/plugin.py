"""The pytest plugin: --ws-* options, config validation at startup, shared session fixtures."""

from __future__ import annotations

import os
from typing import Any

import pytest

from ws_harness.arch import Architecture
from ws_harness.config import ENV_VARS, ConfigError, HarnessConfig, resolve_config
from ws_harness.data import Behaviour
from ws_harness.models import LoadedModel
from ws_harness.session import HarnessSession

__all__ = ["session_key", "get_session"]

session_key = pytest.StashKey[HarnessSession]()

_OPTIONS = {
    "model": "model spec: smollm2-135m-instruct, random:<preset>, a local dir or a cached HF id",
    "diff": "'build' (train one diff per seed) or .pt/.safetensors files, comma-separated, or a dir",
    "seeds": "comma-separated diff seeds to build, e.g. 0,1,2",
    "rank": "basis rank k of every hypothesis",
    "out": "output folder for tables, plots and the conclusion",
    "cache_dir": "on-disk cache for converted models, diffs and captures",
    "behaviour": "behaviour data: a shipped name (sycophancy) or a .json path",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ws-harness", "weight-steering hypothesis harness")
    for key, help_text in _OPTIONS.items():
        group.addoption(
            f"--ws-{key.replace('_', '-')}", dest=f"ws_{key}", default=None,
            help=f"{help_text} (env {ENV_VARS[key]}; default from [tool.ws_harness])",
        )


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Each xdist worker gets one thread: N workers on N cores beat N×N oversubscription.
        import torch

        torch.set_num_threads(1)
    cli = {key: config.getoption(f"ws_{key}") for key in _OPTIONS}
    try:
        harness_config = resolve_config(config.rootpath, cli)
    except ConfigError as exc:
        raise pytest.UsageError(f"ws-harness configuration: {exc}") from None
    config.stash[session_key] = HarnessSession(harness_config)


def get_session(config: pytest.Config) -> HarnessSession:
    try:
        return config.stash[session_key]
    except KeyError:
        raise RuntimeError("the ws-harness plugin is not configured for this pytest run") from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    cfg = get_session(config).config
    diff = cfg.diff if isinstance(cfg.diff, str) else ", ".join(str(p) for p in cfg.diff)
    return [
        f"ws-harness: model={cfg.model} diff={diff} seeds={','.join(map(str, cfg.seeds))} "
        f"rank={cfg.rank} behaviour={cfg.behaviour}",
        f"ws-harness: cache={cfg.cache_dir} out={cfg.out}",
    ]


@pytest.fixture(scope="session")
def ws_session(request: pytest.FixtureRequest) -> HarnessSession:
    """The run's HarnessSession (config, cache, model, captures)."""
    return get_session(request.config)


@pytest.fixture(scope="session")
def ws_config(ws_session: HarnessSession) -> HarnessConfig:
    return ws_session.config


@pytest.fixture(scope="session")
def ws_model(ws_session: HarnessSession) -> LoadedModel:
    return ws_session.loaded


@pytest.fixture(scope="session")
def ws_arch(ws_session: HarnessSession) -> Architecture:
    return ws_session.arch


@pytest.fixture(scope="session")
def ws_behaviour(ws_session: HarnessSession) -> Behaviour:
    return ws_session.behaviour


@pytest.fixture(scope="session")
def ws_fit_captures(ws_session: HarnessSession) -> dict[str, Any]:
    """FIT-side last-token captures per condition: {'clean': {...}, 'positive': {...}, ...}."""
    return {cond: ws_session.capture("fit", cond, "mlp") for cond in ("clean", "positive", "negative")}
