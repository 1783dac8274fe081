"""The pytest plugin: --ws-* options, config validation at startup, shared session fixtures."""

from __future__ import annotations

import os
from typing import Any

import pytest

from ws_harness.arch import Architecture
from ws_harness.config import ENV_VARS, ConfigError, HarnessConfig, resolve_config
from ws_harness.data import Behaviour
from ws_harness.hypothesis import Hypothesis
from ws_harness.models import LoadedModel
from ws_harness.ranking import summary_lines
from ws_harness.results import RunResults, collect_results, write_tables
from ws_harness.scoreboard import HypothesisError, Scoreboard
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
def ws_diffs(ws_session: HarnessSession) -> list[Any]:
    """The run's diffs (built or loaded, validated, each checked to steer), in diff_plan order."""
    return ws_session.diffs()


@pytest.fixture(scope="session")
def ws_labels(ws_session: HarnessSession, ws_diffs: list[Any]) -> dict[str, dict[str, Any]]:
    """B side per diff name: {'eval': label [L, n_eval, d], 'fit': label_fit [L, n_fit, d]}."""
    return {diff.name: ws_session.labels(diff) for diff in ws_diffs}


@pytest.fixture(scope="session")
def ws_fit_captures(ws_session: HarnessSession) -> dict[str, Any]:
    """FIT-side last-token captures per condition: {'clean': {...}, 'positive': {...}, ...}."""
    return {cond: ws_session.capture("fit", cond, "mlp") for cond in ("clean", "positive", "negative")}


# ---- hypothesis files → test items ---------------------------------------------------------


def _scoreboard(config: pytest.Config) -> Scoreboard:
    session = get_session(config)
    if not hasattr(session, "scoreboard"):
        session.scoreboard = Scoreboard(session)
    return session.scoreboard


def pytest_pycollect_makeitem(
    collector: pytest.Collector, name: str, obj: object
) -> pytest.Collector | None:
    # Only the module that defines the hypothesis collects it (not modules importing it).
    if isinstance(obj, Hypothesis) and isinstance(collector, pytest.Module):
        if obj.module == collector.module.__name__:
            return HypothesisCollector.from_parent(collector, name=obj.name, hyp=obj)
    return None


class HypothesisCollector(pytest.Collector):
    """One hypothesis: its basis item, then per diff its SPEC §6 claims (or oracle checks)."""

    def __init__(self, *, hyp: Hypothesis, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hyp = hyp
        self.add_marker("ws_hypothesis")

    def collect(self) -> list[pytest.Item]:
        board = _scoreboard(self.config)
        board.register(self.hyp)
        items: list[pytest.Item] = []
        if not self.hyp.is_ceiling:
            items.append(BasisItem.from_parent(self, name="basis", hyp=self.hyp))
        for diff_name, seed in get_session(self.config).config.diff_plan():
            if self.hyp.is_ceiling:
                items.append(
                    CeilingItem.from_parent(self, name=f"ceiling[{diff_name}]", hyp=self.hyp,
                                            diff_name=diff_name)
                )
            for claim in self.hyp.claims():
                item = ClaimItem.from_parent(
                    self, name=f"{claim}[{diff_name}]", hyp=self.hyp, diff_name=diff_name,
                    claim=claim,
                )
                if self.hyp.expects_refuted(claim, seed, diff_name):
                    # Strict, and only ClaimItem's own pytest.xfail() (carrying the measured
                    # numbers) counts as the expected failure; a stale record fails loudly.
                    item.add_marker(pytest.mark.xfail(
                        strict=True, raises=pytest.xfail.Exception,
                        reason=f"recorded finding: {claim} refuted",
                    ))
                items.append(item)
        return items


class HarnessItem(pytest.Item):
    def __init__(self, *, hyp: Hypothesis, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hyp = hyp

    def setup(self) -> None:
        _scoreboard(self.config).ran = True  # this process has results worth reporting

    def reportinfo(self) -> tuple[Any, int, str]:
        return self.path, 0, f"{self.hyp.name}::{self.name}"

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, (HypothesisError, ClaimFailed)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)


class ClaimFailed(AssertionError):
    """A claim that was not recorded as refuted did not hold."""


class BasisItem(HarnessItem):
    """SPEC §6 claim 1: right shape, finite, orthonormal (‖BᵀB − I‖_max < 1e-4), rank ≥ 1."""

    def runtest(self) -> None:
        bases = _scoreboard(self.config).bases(self.hyp)
        ranks = sorted({b.shape[1] for b in bases if b is not None})
        k = get_session(self.config).config.rank
        limit = k * self.hyp.rank_factor
        if ranks and ranks[-1] > limit:
            raise HypothesisError(
                f"hypothesis {self.hyp.name!r}: basis rank {ranks[-1]} exceeds {limit} "
                f"(k={k} × rank_factor={self.hyp.rank_factor})"
            )


def _fmt(result: dict[str, Any]) -> str:
    return (f"R = {result['value']:.3f}, z = {result['z']:.2f}, p = {result['p']:.3g}, "
            f"BH-adjusted p = {result['p_adj']:.3g}")


class ClaimItem(HarnessItem):
    """SPEC §6 claims 2–3: R > 1 with one-sided p < 0.01 after BH across the run."""

    def __init__(self, *, diff_name: str, claim: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.diff_name, self.claim = diff_name, claim

    def runtest(self) -> None:
        board = _scoreboard(self.config)
        if self.hyp.name not in board.errors:
            board.bases(self.hyp)  # raises the hypothesis's own error, if any
        result = board.claims.get((self.hyp.name, self.diff_name, self.claim))
        if result is None:
            raise HypothesisError(
                f"hypothesis {self.hyp.name!r}: no scores for {self.diff_name} "
                f"({board.errors.get(self.hyp.name, 'unknown reason')})"
            )
        recorded = any(m.name == "xfail" for m in self.iter_markers())
        if recorded and not result["holds"]:
            pytest.xfail(f"recorded finding holds: {self.claim} not > 1 on {self.diff_name}: "
                         f"{_fmt(result)}")
        if not result["holds"]:
            raise ClaimFailed(
                f"{self.hyp.name}: claim {self.claim} > 1 fails on {self.diff_name}: {_fmt(result)}."
                f" If this is a finding, record it: refuted=[{self.claim!r}] in {self.hyp.module}"
            )
        if recorded:
            raise ClaimFailed(
                f"{self.hyp.name}: recorded finding is stale: {self.claim} now holds on "
                f"{self.diff_name} ({_fmt(result)}); remove it from refuted= in {self.hyp.module}"
            )


class CeilingItem(HarnessItem):
    """Ceilings: valid bases; an oracle sits at pct_oracle = 1 and beats the null widely."""

    def __init__(self, *, diff_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.diff_name = diff_name

    def runtest(self) -> None:
        summary = _scoreboard(self.config).scores(self.hyp, self.diff_name)["summary"]
        metric = self.hyp.oracle_of
        if metric is None:
            return
        pct, r, z = summary[f"pct_oracle_{metric}"], summary[f"r_{metric}"], summary[f"z_{metric}"]
        if not pct > 1 - 1e-4:
            raise ClaimFailed(f"{self.hyp.name}: pct_oracle_{metric} = {pct:.6f} on "
                              f"{self.diff_name}, expected 1 (it is the rank-k optimum)")
        if not (r > ORACLE_MIN_R and z > ORACLE_MIN_Z):
            raise ClaimFailed(
                f"{self.hyp.name}: R_{metric} = {r:.2f} (z = {z:.1f}) on {self.diff_name}; an "
                f"oracle must beat the null widely (R > {ORACLE_MIN_R}, z > {ORACLE_MIN_Z})"
            )


ORACLE_MIN_R = 2.0
ORACLE_MIN_Z = 5.0


# ---- end of run: results from every worker → tables and the terminal summary ---------------

_results_key = pytest.StashKey[RunResults]()


def _add_results(config: pytest.Config, results: RunResults) -> None:
    previous = config.stash.get(_results_key, None)
    config.stash[_results_key] = results if previous is None else previous.merge(results)


def _local_results(config: pytest.Config) -> RunResults | None:
    session = get_session(config)
    board = getattr(session, "scoreboard", None)
    if board is None or not board.hypotheses or not board.ran:
        return None
    try:
        return collect_results(board)
    except Exception as exc:  # noqa: BLE001 - the items already reported it; keep the reason
        return RunResults(errors={"<run>": f"{type(exc).__name__}: {exc}"})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: gather each worker's results."""
    text = getattr(node, "workeroutput", {}).get("ws_results")
    if text:
        _add_results(node.config, RunResults.from_json(text))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    results = _local_results(config)
    if hasattr(config, "workeroutput"):  # an xdist worker: hand results to the controller
        if results is not None:
            config.workeroutput["ws_results"] = results.to_json()
        return
    if results is not None:
        _add_results(config, results)
    merged = config.stash.get(_results_key, None)
    if merged is not None and not merged.empty:
        write_tables(merged, get_session(config).config.out)
        _write_reports(config, merged)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    merged = config.stash.get(_results_key, None)
    if merged is None:
        return
    tr = terminalreporter
    tr.write_sep("=", "ws-harness results")
    for line in summary_lines(merged):  # the tables, Kendall τ and stability per table
        tr.write_line(line)
    for line in _ranking_gate_lines(terminalreporter):
        tr.write_line(line)
    tr.write_line(f"tables written to {get_session(config).config.out}")
    for line in _report_lines(config):
        tr.write_line(line)


# ---- ranking gate and reports (issue 6) ----------------------------------------------------

RANKING_NODEID = "ws_ranking"
_reports_key = pytest.StashKey[dict[str, Any]]()


class RankingRegression(AssertionError):
    """The run's ranking moved beyond the seed spread, or no snapshot is recorded for it."""


class RankingGateItem(pytest.Item):
    """SPEC §6: the run's ranking across seeds against the snapshot of its configuration.

    One per session, added after the hypothesis items; it aggregates every hypothesis's scores
    (under xdist from the shared disk cache) and compares them with
    ``snapshots/ranking__<configuration>.json`` (see ws_harness.snapshot for the tolerance
    rule), or records that file with --ws-update-snapshots.
    """

    def runtest(self) -> None:
        from ws_harness.snapshot import SNAPSHOT_DIRNAME, check_ranking

        board = _scoreboard(self.config)
        board.ran = True
        results = collect_results(board)
        if results.empty:
            raise RankingRegression(
                "no hypothesis could be scored, so there is no ranking to check: "
                + "; ".join(f"{k}: {v}" for k, v in sorted(results.errors.items()))
            )
        update = bool(self.config.getoption("ws_update_snapshots", False))
        outcome = check_ranking(
            results, self.config.rootpath / SNAPSHOT_DIRNAME, update=update,
            lock_dir=get_session(self.config).config.cache_dir / "locks",
            collected=set(board.hypotheses),
        )
        self.user_properties.append(("ws_ranking", outcome.message.splitlines()[0]))
        if outcome.failed:
            raise RankingRegression(outcome.message)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, RANKING_NODEID

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, RankingRegression):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, which may then drop the gate
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Append the ranking gate whenever hypothesis items were collected (same on every worker)."""
    if any(isinstance(item, HarnessItem) for item in items) and not any(
        isinstance(item, RankingGateItem) for item in items
    ):
        gate = RankingGateItem.from_parent(session, name=RANKING_NODEID, nodeid=RANKING_NODEID)
        gate.add_marker("ws_hypothesis")
        items.append(gate)


def _write_reports(config: pytest.Config, results: RunResults) -> None:
    from ws_harness.report import write_reports

    out = get_session(config).config.out
    try:
        config.stash[_reports_key] = {"written": write_reports(results, out)}
    except Exception as exc:  # noqa: BLE001 - a broken plot must not hide the run's results
        config.stash[_reports_key] = {"error": f"{type(exc).__name__}: {exc}"}


def _report_lines(config: pytest.Config) -> list[str]:
    info = config.stash.get(_reports_key, None)
    if info is None:
        return []
    if "error" in info:
        return [f"REPORTS FAILED: {info['error']} (rerun them with: ws-harness report)"]
    return ["reports: " + ", ".join(p.name for p in info["written"].values())]


def _ranking_gate_lines(terminalreporter: Any) -> list[str]:
    for reports in terminalreporter.stats.values():
        for report in reports:
            if (getattr(report, "nodeid", None) == RANKING_NODEID
                    and getattr(report, "when", None) == "call"):
                for key, value in getattr(report, "user_properties", []):
                    if key == "ws_ranking":
                        return [f"ranking gate ({report.outcome}): {value}"]
    return []
