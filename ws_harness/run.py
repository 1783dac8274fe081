"""The pytest run's session object: the harness inputs, the scoreboard, and the end-of-run merge and reports.

Registered as a plugin in ``pytest_configure`` and kept in ``config.stash`` (the way
pytest-xdist's ``DSession`` and syrupy's ``SnapshotSession`` work): its hook methods gather
every xdist worker's results on the controller, write the tables and reports once, and print
the ranking at the end of the terminal output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from ws_harness import progress
from ws_harness.results import RunResults, collect_results, write_tables
from ws_harness.scoreboard import Scoreboard
from ws_harness.session import HarnessSession
from ws_harness.snapshot import RANKING_NODEID

__all__ = ["RunSession"]


class RunSession:
    """One per pytest process.

    harness: config, cache, model, captures and diffs (:class:`HarnessSession`);
    scoreboard: bases, scores and claims of the collected hypotheses;
    ran: whether an item of this process ran (only then are its results reported);
    results: the merged results (controller, at session finish); reports: what was written.
    The controller (or a -n 0 run) shows the progress of every process of the run on one
    status line (:mod:`ws_harness.progress`) from session start to session finish.
    """

    def __init__(self, harness: HarnessSession) -> None:
        self.harness = harness
        self.scoreboard = Scoreboard(harness)
        self.ran = False
        self.results: RunResults | None = None
        self.reports: dict[str, Any] | None = None
        self._progress = ExitStack()  # the status line's renderer, while it runs
        # The run record (ws_harness.warm): which entries this run used, and whether it ran
        # hypothesis items only (a test-suite run leaves no record). Workers report theirs.
        self.in_process_note: str | None = None  # set when a cached sweep skipped its workers
        self.harness_only: bool | None = None
        self._used: set[str] = set()

    def _add(self, results: RunResults) -> None:
        self.results = results if self.results is None else self.results.merge(results)

    def local_results(self) -> RunResults | None:
        """This process's results, or None when it ran no hypothesis item."""
        board = self.scoreboard
        if not board.hypotheses or not self.ran:
            return None
        try:
            return collect_results(board)
        except Exception as exc:  # noqa: BLE001 - the items already reported it; keep the reason
            return RunResults(errors={"<run>": f"{type(exc).__name__}: {exc}"})

    # ---- hooks -------------------------------------------------------------------------
    @pytest.hookimpl(trylast=True)  # after -k/-m deselection: preflight only what will run
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        from ws_harness.collect import check_inputs

        check_inputs(session, config, items)
        self._expect_progress(items)
        from ws_harness.collect import HarnessItem
        from ws_harness.snapshot import RankingGateItem

        self.harness_only = any(isinstance(i, HarnessItem) for i in items) and all(
            isinstance(i, (HarnessItem, RankingGateItem)) for i in items)

    def _expect_progress(self, items: list[pytest.Item]) -> None:
        """The status line's totals, from what this process collected (with xdist every worker
        reports the same ones): a basis per hypothesis (per diff for ceilings), a score per
        hypothesis and diff, a built diff per seed. The catalog's hypotheses that were not
        collected are scored too (the BH family); their items raise the shown total as they come."""
        from ws_harness.collect import HarnessItem

        if not any(isinstance(item, HarnessItem) for item in items):
            return  # no hypothesis runs (or an input error stands in for them): nothing to count
        hypotheses = list(self.scoreboard.hypotheses.values())
        n_diffs = len(self.harness.config.diff_plan())
        ceilings = sum(h.is_ceiling for h in hypotheses)
        progress.expect("basis", len(hypotheses) - ceilings + ceilings * n_diffs)
        progress.expect("scores", len(hypotheses) * n_diffs)
        if self.harness.config.builds_diffs:
            progress.expect("diff", n_diffs)

    @pytest.hookimpl(tryfirst=True)  # before xdist's DSession (trylast) starts the workers
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        config = session.config
        if hasattr(config, "workeroutput"):
            return  # an xdist worker: it only writes events, the controller shows them
        # The run folder's variable is set here, so the workers started next inherit it.
        stream = self._progress.enter_context(progress.own_stderr())
        renderer = self._progress.enter_context(progress.rendering(stream))
        self._progress.enter_context(_sharing_terminal(config, renderer))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist controller: gather each worker's results."""
        output = getattr(node, "workeroutput", {})
        text = output.get("ws_results")
        if text:
            self._add(RunResults.from_json(text))
        self._used |= set(output.get("ws_cache_used", ()))
        worker_only = output.get("ws_harness_only")
        self.harness_only = bool(worker_only) and self.harness_only is not False

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        try:
            self._finish(session)
        finally:
            self._progress.close()  # the final status line, before pytest's summary

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self._progress.close()  # a session that never finished still stops its renderer

    def _finish(self, session: pytest.Session) -> None:
        config = session.config
        results = self.local_results()
        if hasattr(config, "workeroutput"):  # an xdist worker: hand results to the controller
            if results is not None:
                config.workeroutput["ws_results"] = results.to_json()
            config.workeroutput["ws_cache_used"] = sorted(self.harness.cache.used)
            config.workeroutput["ws_harness_only"] = bool(self.harness_only)
            return
        if results is not None:
            self._add(results)
        if self.results is not None and not self.results.empty:
            self.results = self.results.ordered()  # one order, however many workers
            write_tables(self.results, self.harness.config.out)
            self._write_reports(self.results)
            self._write_run_record(config)

    def _write_run_record(self, config: pytest.Config) -> None:
        """Record the entries a sweep of hypothesis items used (ws_harness.warm)."""
        from ws_harness.warm import run_fingerprint, write_record

        if not self.harness_only:
            return
        try:
            write_record(self.harness.config.cache_dir, run_fingerprint(config, self.harness),
                         self._used | self.harness.cache.used)
        except Exception:  # noqa: BLE001 - no record only means the next run starts its workers
            pass

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int,
                                config: pytest.Config) -> None:
        from ws_harness.ranking import summary_lines

        if self.results is None:
            return
        tr = terminalreporter
        tr.write_sep("=", "ws-harness results")
        for line in summary_lines(self.results):  # the tables, Kendall τ and stability per table
            tr.write_line(line)
        for line in _ranking_gate_lines(terminalreporter):
            tr.write_line(line)
        if self.in_process_note:  # the header that says so is hidden by -q
            tr.write_line(self.in_process_note)
        tr.write_line(f"tables written to {self.harness.config.out}")
        for line in self._report_lines():
            tr.write_line(line)

    # ---- reports -----------------------------------------------------------------------
    def _write_reports(self, results: RunResults) -> None:
        from ws_harness.report import write_reports

        try:
            self.reports = {"written": write_reports(results, self.harness.config.out)}
        except Exception as exc:  # noqa: BLE001 - a broken plot must not hide the run's results
            self.reports = {"error": f"{type(exc).__name__}: {exc}"}

    def _report_lines(self) -> list[str]:
        if self.reports is None:
            return []
        if "error" in self.reports:
            return [f"REPORTS FAILED: {self.reports['error']} (rerun them with: ws-harness report)"]
        return ["reports: " + ", ".join(p.name for p in self.reports["written"].values())]


@contextmanager
def _sharing_terminal(config: pytest.Config, renderer: progress.Renderer | None) -> Iterator[None]:
    """Route pytest's own output through the renderer, which then knows where pytest's line
    stands: on a terminal it lifts the status line off while pytest writes (test letters,
    xdist's lines) and puts it back after; in a log its lines do not split pytest's."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    writer = getattr(reporter, "_tw", None)
    inner = getattr(writer, "_file", None)  # pytest keeps its terminal file here (no public API)
    if renderer is None or inner is None:
        yield
        return
    writer._file = renderer.share(inner, column=max(writer.width_of_current_line, 0))
    try:
        yield
    finally:
        writer._file = inner


def _ranking_gate_lines(terminalreporter: Any) -> list[str]:
    for reports in terminalreporter.stats.values():
        for report in reports:
            if (getattr(report, "nodeid", None) == RANKING_NODEID
                    and getattr(report, "when", None) == "call"):
                for key, value in getattr(report, "user_properties", []):
                    if key == "ws_ranking":
                        return [f"ranking gate ({report.outcome}): {value}"]
    return []

