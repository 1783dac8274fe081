"""The pytest run's session object: the harness inputs, the scoreboard, and the end-of-run merge and reports.

Registered as a plugin in ``pytest_configure`` and kept in ``config.stash`` (the way
pytest-xdist's ``DSession`` and syrupy's ``SnapshotSession`` work): its hook methods gather
every xdist worker's results on the controller, write the tables and reports once, and print
the ranking at the end of the terminal output.
"""

from __future__ import annotations

from typing import Any

import pytest

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
    """

    def __init__(self, harness: HarnessSession) -> None:
        self.harness = harness
        self.scoreboard = Scoreboard(harness)
        self.ran = False
        self.results: RunResults | None = None
        self.reports: dict[str, Any] | None = None

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

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist controller: gather each worker's results."""
        text = getattr(node, "workeroutput", {}).get("ws_results")
        if text:
            self._add(RunResults.from_json(text))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        config = session.config
        results = self.local_results()
        if hasattr(config, "workeroutput"):  # an xdist worker: hand results to the controller
            if results is not None:
                config.workeroutput["ws_results"] = results.to_json()
            return
        if results is not None:
            self._add(results)
        if self.results is not None and not self.results.empty:
            self.results = self.results.ordered()  # one order, however many workers
            write_tables(self.results, self.harness.config.out)
            self._write_reports(self.results)

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


def _ranking_gate_lines(terminalreporter: Any) -> list[str]:
    for reports in terminalreporter.stats.values():
        for report in reports:
            if (getattr(report, "nodeid", None) == RANKING_NODEID
                    and getattr(report, "when", None) == "call"):
                for key, value in getattr(report, "user_properties", []):
                    if key == "ws_ranking":
                        return [f"ranking gate ({report.outcome}): {value}"]
    return []

