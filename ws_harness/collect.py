"""Hypothesis files → pytest items: the collector, the basis, claim and ceiling items, the gate item."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pytest

from ws_harness import schema
from ws_harness.hypothesis import Hypothesis, HypothesisError
from ws_harness.session import InputError
from ws_harness.snapshot import RANKING_NODEID, RankingGateItem

if TYPE_CHECKING:
    from ws_harness.run import RunSession

__all__ = [
    "HypothesisCollector",
    "HarnessItem",
    "BasisItem",
    "ClaimItem",
    "CeilingItem",
    "ClaimFailed",
    "pytest_pycollect_makeitem",
    "pytest_collection_modifyitems",
    "check_inputs",
    "check_ceiling",
    "InputErrorItem",
    "INPUTS_NODEID",
]


def _run(config: pytest.Config) -> RunSession:
    from ws_harness.plugin import get_run

    return get_run(config)


def pytest_pycollect_makeitem(
    collector: pytest.Collector, name: str, obj: object
) -> pytest.Collector | None:
    # Only the module that defines the hypothesis collects it (not modules importing it).
    if isinstance(obj, Hypothesis) and isinstance(collector, pytest.Module):
        if obj.module == collector.module.__name__:
            return HypothesisCollector.from_parent(collector, name=obj.name, hyp=obj)
    return None



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


def check_inputs(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Preflight the run's inputs once; if one is unusable, one item reports it instead of all.

    Every xdist worker reaches the same verdict (same inputs), so collections stay identical.
    """
    harness_items = [i for i in items if isinstance(i, (HarnessItem, RankingGateItem))]
    if not harness_items:
        return
    try:
        _run(config).harness.preflight()
    except InputError as exc:
        config.hook.pytest_deselected(items=harness_items)
        items[:] = [i for i in items if i not in harness_items]
        items.append(InputErrorItem.from_parent(session, name=INPUTS_NODEID, nodeid=INPUTS_NODEID,
                                                message=str(exc)))


INPUTS_NODEID = "ws_inputs"


class InputErrorItem(pytest.Item):
    """Stands in for every hypothesis item when an input is unusable: one failure, one message."""

    def __init__(self, *, message: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.message = message

    def runtest(self) -> None:
        raise InputError(self.message)

    def reportinfo(self) -> tuple[Any, int, str]:
        return self.path, 0, INPUTS_NODEID

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        return (f"ws-harness cannot run the hypotheses: {self.message}\n"
                "(no hypothesis item ran; fix this input and run again)")


class HypothesisCollector(pytest.Collector):
    """One hypothesis: its basis item, then per diff its SPEC §6 claims (or oracle checks)."""

    def __init__(self, *, hyp: Hypothesis, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hyp = hyp
        self.add_marker("ws_hypothesis")

    def collect(self) -> list[pytest.Item]:
        run = _run(self.config)
        run.scoreboard.register(self.hyp)
        items: list[pytest.Item] = []
        if not self.hyp.is_ceiling:
            items.append(BasisItem.from_parent(self, name="basis", hyp=self.hyp))
        for diff_name, seed in run.harness.config.diff_plan():
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


class ClaimFailed(AssertionError):
    """A claim that was not recorded as refuted did not hold (or a record went stale)."""


class HarnessItem(pytest.Item):
    """An item of one hypothesis; failures show the harness's own message, not a traceback."""

    def __init__(self, *, hyp: Hypothesis, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hyp = hyp

    @property
    def run(self) -> RunSession:
        return _run(self.config)

    def setup(self) -> None:
        self.run.ran = True  # this process has results worth reporting

    def reportinfo(self) -> tuple[Any, int, str]:
        return self.path, 0, f"{self.hyp.name}::{self.name}"

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        # Our own errors and the recorded-finding xfails are messages, not bugs: a traceback
        # would say nothing more, and formatting one (pytest parses every frame's source)
        # cost ~0.28 s per xfail, 76 s of a 108 s warm single-process sweep.
        if isinstance(excinfo.value, (HypothesisError, ClaimFailed, pytest.xfail.Exception)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)


class BasisItem(HarnessItem):
    """SPEC §6 claim 1: right shape, finite, orthonormal (schema.BASIS_ORTHONORMAL_TOL), rank ≥ 1."""

    def runtest(self) -> None:
        # bases() validates shape, finiteness, orthonormality and the rank limit k·rank_factor,
        # so a basis that fails here is also excluded from claims, BH and the ranking.
        self.run.scoreboard.bases(self.hyp)


def _fmt(result: dict[str, Any]) -> str:
    return (f"R = {result['value']:.3f}, z = {result['z']:.2f}, p = {result['p']:.3g}, "
            f"BH-adjusted p = {result['p_adj']:.3g}")


class ClaimItem(HarnessItem):
    """SPEC §6 claims: metric > 1 with one-sided p < schema.ALPHA after BH across the run."""

    def __init__(self, *, diff_name: str, claim: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.diff_name, self.claim = diff_name, claim

    def runtest(self) -> None:
        board = self.run.scoreboard
        if self.hyp.name not in board.errors:
            board.bases(self.hyp)  # raises the hypothesis's own error, if any
        result = board.claims.get((self.hyp.name, self.diff_name, self.claim))
        if result is None:
            raise HypothesisError(
                f"hypothesis {self.hyp.name!r}: no scores for {self.diff_name} "
                f"({board.errors.get(self.hyp.name, 'unknown reason')})"
            )
        recorded = any(m.name == "xfail" for m in self.iter_markers())
        if not all(math.isfinite(result[k]) for k in ("value", "p", "p_adj")):
            if result.get("n_layers") == 0:
                pytest.skip(f"{self.claim} is undefined on {self.diff_name}: no layer with a "
                            "basis has a target, or the deltas there carry no steering at first "
                            "order (not in the BH family)")
            # A NaN is no finding: "not > 1" would otherwise pass as a recorded refutation.
            raise ClaimFailed(
                f"{self.hyp.name}: claim {self.claim} on {self.diff_name} has no number: "
                f"{_fmt(result)}; a recorded or open claim needs a finite value and p-value"
            )
        status = schema.classify(result["holds"], recorded)
        if status == "refuted":
            pytest.xfail(f"recorded finding holds: {self.claim} not > 1 on {self.diff_name}: "
                         f"{_fmt(result)}")
        if status == "surprise":
            raise ClaimFailed(
                f"{self.hyp.name}: claim {self.claim} > 1 fails on {self.diff_name}: {_fmt(result)}."
                f" If this is a finding, record it: refuted=[{self.claim!r}] in {self.hyp.module}"
            )
        if status == "stale":
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
        check_ceiling(self.hyp, self.run.scoreboard.scores(self.hyp, self.diff_name)["summary"],
                      self.diff_name)


def check_ceiling(hyp: Hypothesis, summary: dict[str, Any], diff_name: str) -> None:
    """What every ceiling must satisfy on one diff (raises ClaimFailed):

    - no metric above its rank-k optimum (pct_oracle ≤ 1: Ky Fan; a ceiling beating an oracle
      means the oracle or the ceiling is wrong), and some metric defined at all;
    - an oracle (`oracle_of`) sits at pct_oracle = 1 of its metric and beats the null widely.
    """
    pcts = {m.name: summary.get(m.pct_oracle) for m in schema.metrics() if m.pct_oracle}
    defined = {k: v for k, v in pcts.items() if v is not None and math.isfinite(v)}
    if not defined:
        raise ClaimFailed(f"{hyp.name}: no score is defined on {diff_name} (every pct_oracle "
                          "is NaN): the ceiling measures nothing")
    above = {k: v for k, v in defined.items() if v > 1 + (1 - schema.ORACLE_PCT_MIN)}
    if above:
        shown = ", ".join(f"{schema.label(k)} pct_oracle = {v:.6f}" for k, v in above.items())
        raise ClaimFailed(f"{hyp.name}: beats the rank-k optimum on {diff_name} ({shown}); "
                          "no basis of rank ≤ k can (Ky Fan): the oracle or this ceiling is wrong")
    if hyp.oracle_of is None:
        return
    m = schema.metric(hyp.oracle_of)
    pct, r, z = summary[m.pct_oracle], summary[m.name], summary[m.z]
    if not pct > schema.ORACLE_PCT_MIN:
        raise ClaimFailed(f"{hyp.name}: {m.pct_oracle} = {pct:.6f} on "
                          f"{diff_name}, expected 1 (it is the rank-k optimum)")
    if not (r > schema.ORACLE_MIN_R and z > schema.ORACLE_MIN_Z):
        raise ClaimFailed(
            f"{hyp.name}: {m.label} = {r:.2f} (z = {z:.1f}) on {diff_name}; an "
            f"oracle must beat the null widely (R > {schema.ORACLE_MIN_R}, "
            f"z > {schema.ORACLE_MIN_Z})"
        )
