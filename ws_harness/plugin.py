"""The pytest plugin: the --ws-* options, configuration at startup, and the shared session fixtures.

Everything else is delegated: collection and items live in :mod:`ws_harness.collect`, the
run's scoreboard, result merging and reports in :class:`ws_harness.run.RunSession` (registered
here and kept in ``config.stash``), the ranking gate in :mod:`ws_harness.snapshot`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from ws_harness.arch import Architecture
from ws_harness.config import (
    ConfigError,
    HarnessConfig,
    add_pytest_options,
    check_paths,
    cli_values,
    resolve_config,
)
from ws_harness.data import Behaviour
from ws_harness.diffs import Diff
from ws_harness.models import LoadedModel
from ws_harness.run import RunSession
from ws_harness.session import HarnessSession

if TYPE_CHECKING:
    import torch

__all__ = ["run_key", "get_run", "get_session"]

run_key = pytest.StashKey[RunSession]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ws-harness", "weight-steering hypothesis harness")
    add_pytest_options(group)
    group.addoption(
        "--ws-update-snapshots", dest="ws_update_snapshots", action="store_true", default=False,
        help="record the ranking snapshot of this configuration under snapshots/ instead of "
             "comparing with it",
    )


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Each xdist worker gets one thread: N workers on N cores beat N×N oversubscription.
        import torch

        torch.set_num_threads(1)
    config.addinivalue_line("markers", "ws_hypothesis: an item generated from a hypothesis file")
    try:
        harness_config = resolve_config(config.rootpath, cli_values(config))
        check_paths(harness_config)
    except ConfigError as exc:
        raise pytest.UsageError(f"ws-harness configuration: {exc}") from None
    from ws_harness import collect

    run = RunSession(HarnessSession(harness_config))
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        from ws_harness.warm import run_in_process_if_cached

        # Before xdist's own pytest_configure (trylast) decides whether to start workers.
        run.in_process_note = run_in_process_if_cached(config, run.harness)
    config.stash[run_key] = run
    config.pluginmanager.register(run, "ws-harness-run")
    config.pluginmanager.register(collect, "ws-harness-collect")


def get_run(config: pytest.Config) -> RunSession:
    """The RunSession of a configured pytest run."""
    try:
        return config.stash[run_key]
    except KeyError:
        raise RuntimeError("the ws-harness plugin is not configured for this pytest run") from None


def get_session(config: pytest.Config) -> HarnessSession:
    """The run's HarnessSession (config, cache, model, captures, diffs)."""
    return get_run(config).harness


def pytest_report_header(config: pytest.Config) -> list[str]:
    cfg = get_session(config).config
    diff = cfg.diff if isinstance(cfg.diff, str) else ", ".join(str(p) for p in cfg.diff)
    note = get_run(config).in_process_note
    return [
        f"ws-harness: model={cfg.model} diff={diff} seeds={','.join(map(str, cfg.seeds))} "
        f"rank={cfg.rank} behaviour={cfg.behaviour}",
        f"ws-harness: cache={cfg.cache_dir} out={cfg.out}",
    ] + ([note] if note else [])


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
def ws_diffs(ws_session: HarnessSession) -> list[Diff]:
    """The run's diffs (built or loaded, validated, each checked to steer), in diff_plan order."""
    return ws_session.diffs()


@pytest.fixture(scope="session")
def ws_labels(ws_session: HarnessSession, ws_diffs: list[Diff]) -> dict[str, dict[str, torch.Tensor]]:
    """B side per diff name: {'eval': label [L, n_eval, d], 'fit': label_fit [L, n_fit, d]}."""
    return {diff.name: ws_session.labels(diff) for diff in ws_diffs}


@pytest.fixture(scope="session")
def ws_fit_captures(ws_session: HarnessSession) -> dict[str, dict[str, torch.Tensor]]:
    """FIT-side last-token captures per condition: {'clean': {...}, 'positive': {...}, ...}."""
    return {cond: ws_session.capture("fit", cond, "mlp") for cond in ("clean", "positive", "negative")}
