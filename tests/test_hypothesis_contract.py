"""The hypothesis plugin contract, end to end with pytester on the tiny model."""

from __future__ import annotations

import csv
import gc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ws_harness.hypothesis import FitContext, per_layer
from ws_harness.scoreboard import Scoreboard
from ws_harness.session import HarnessSession

WriteProject = Callable[[pytest.Pytester, Path, list[Path]], Path]  # conftest fixture

GOOD = '''
"""my_write: top-k left singular vectors of W_o (a user-added hypothesis)."""
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="W:write", axis="write"{refuted})
def basis(fit, layer):
    return left_basis(fit.weights(layer).o, fit.k)
'''

# The tiny test diffs write along W_U[Yes] − W_U[No]: this hypothesis must recover them.
ANSWER = '''
"""answer_direction: the unembedding difference W_U[Yes] − W_U[No] (global, rank 1)."""
from ws_harness.hypothesis import global_basis
from ws_harness.linalg import orthonormalize


@global_basis(family="W:unembed", axis="mixed"{refuted})
def basis(fit):
    yes, no = fit.answer_ids
    return orthonormalize((fit.unembedding[yes] - fit.unembedding[no])[:, None])
'''

BROKEN = {
    "raises": 'raise RuntimeError("no such weights")',
    "wrong_shape": "return torch.eye(fit.d + 1)[:, :2]",
    "has_nan": "return torch.full((fit.d, 2), float('nan'))",
    "rank_zero": "return torch.zeros(fit.d, 0)",
    "not_orthonormal": "return torch.ones(fit.d, 2)",
}


def write_project(
    writer: WriteProject, pytester: pytest.Pytester, cache: Path, diffs: list[Path], *,
    my_write_refuted: str = "", answer_refuted: str = "",
) -> None:
    folder = writer(pytester, cache, diffs)
    (folder / "test_my_write.py").write_text(GOOD.format(refuted=my_write_refuted))
    (folder / "test_answer_direction.py").write_text(ANSWER.format(refuted=answer_refuted))


# The ranking gate has its own tests (test_snapshot_gate.py); here it has no snapshot to meet.
SWEEP = ("hypotheses", "-p", "no:cacheprovider", "-rA", "--deselect", "ws_ranking")
ALL_REFUTED = ', refuted=["r_act", "r_causal", "r_w_combined", "r_w_struct", "r_act_specific"]'


def test_a_dropped_in_file_is_built_scored_claimed_and_ranked(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject,
) -> None:
    write_project(write_tiny_project, pytester, tiny.config.cache_dir, tiny_diff_files,
                  my_write_refuted=ALL_REFUTED)
    result = pytester.runpytest_subprocess(*SWEEP)
    # W_o of a random model has nothing to do with the diff: its claims are recorded findings.
    result.assert_outcomes(passed=2 + 10, xfailed=10)
    result.stdout.fnmatch_lines_random([
        "PASSED hypotheses/test_my_write.py::my_write::basis",
        "PASSED hypotheses/test_answer_direction.py::answer_direction::r_w_combined[[]w1[]]",
        "XFAIL hypotheses/test_my_write.py::my_write::r_act[[]w0[]] - recorded finding holds:"
        " r_act not > 1 on w0: R = *",
        "*ws-harness results*",
        "*1.0 answer_direction*W:unembed",
        "*2.0 my_write*W:write",
    ])
    with open(pytester.path / "out" / "per_layer.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["hypothesis"] for r in rows} == {"my_write", "answer_direction"}
    assert {r["diff"] for r in rows} == {"w0", "w1"}
    assert {r["seed"] for r in rows} == {""}  # loaded files have no seed (null)
    assert len(rows) == 2 * 2 * 3  # 2 hypotheses × 2 diffs × 3 layers
    assert (pytester.path / "out" / "inputs.json").is_file()
    with open(pytester.path / "out" / "summary.csv") as fh:
        summary = {(r["hypothesis"], r["diff"]): r for r in csv.DictReader(fh)}
    # The diff lies along one direction the answer basis contains: it beats the structured
    # null (random directions shaped like [W_o | W_down]) by far; W_o's own top SVs do not.
    for seed in ("w0", "w1"):
        assert float(summary[("answer_direction", seed)]["r_w_struct"]) > 5
        assert float(summary[("my_write", seed)]["r_w_struct"]) < 2
        assert float(summary[("answer_direction", seed)]["r_act_specific"]) > 1


def test_recorded_findings_fail_when_stale_or_missing(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject,
) -> None:
    # Swap the records: the claims that hold are recorded refuted, the failing ones are not.
    write_project(write_tiny_project, pytester, tiny.config.cache_dir, tiny_diff_files,
                  answer_refuted=', refuted={"r_act": ["w0", "w1"]}')
    result = pytester.runpytest_subprocess(*SWEEP)
    result.assert_outcomes(passed=2 + 8, failed=10 + 2)
    result.stdout.fnmatch_lines_random([
        "*answer_direction: recorded finding is stale: r_act now holds on w0*",
        "*my_write: claim r_act > 1 fails on w1: R = *record it: refuted=[[]'r_act'[]]*",
    ])


def test_broken_hypotheses_fail_alone_and_are_excluded(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject,
) -> None:
    write_project(write_tiny_project, pytester, tiny.config.cache_dir, tiny_diff_files,
                  my_write_refuted=ALL_REFUTED)
    for name, body in BROKEN.items():
        (pytester.path / "hypotheses" / f"test_{name}.py").write_text(
            f'"""{name}: a deliberately broken hypothesis."""\nimport torch\n'
            "from ws_harness.hypothesis import per_layer\n\n\n"
            f'@per_layer(family="test", axis="mixed")\ndef basis(fit, layer):\n    {body}\n'
        )
    result = pytester.runpytest_subprocess(*SWEEP)
    # each broken one: basis + 5 claims × 2 diffs fail; the good ones are unaffected
    result.assert_outcomes(passed=12, xfailed=10, failed=5 * 11)
    result.stdout.fnmatch_lines_random([
        "*hypothesis 'raises': builder raised RuntimeError: no such weights*",
        "*hypothesis 'wrong_shape' layer 0*65*64*",
        "*hypothesis 'has_nan' layer 0*non-finite*",
        "*hypothesis 'rank_zero' layer 0*rank 0*",
        "*hypothesis 'not_orthonormal' layer 0*orthonormal*",
        "EXCLUDED raises: *",
    ])
    with open(pytester.path / "out" / "summary.csv") as fh:
        assert {r["hypothesis"] for r in csv.DictReader(fh)} == {"my_write", "answer_direction"}


def test_builders_cannot_reach_the_session_or_a_diff(tiny: HarnessSession) -> None:
    """Walk everything reachable from a FitContext: no session, scoreboard or diff in it."""
    board = Scoreboard(tiny)
    fit = board.fit
    assert isinstance(fit, FitContext)
    seen, frontier, found = set(), [fit], []
    while frontier:
        obj = frontier.pop()
        if id(obj) in seen or isinstance(obj, (type, type(gc))):
            continue
        seen.add(id(obj))
        if isinstance(obj, (HarnessSession, Scoreboard, torch.nn.Module)):
            found.append(type(obj).__name__)
            continue
        if type(obj).__name__ == "Diff":
            found.append("Diff")
        if not isinstance(obj, torch.Tensor):
            frontier.extend(gc.get_referents(obj))
    assert found == []
    assert not any(hasattr(fit, name) for name in ("label", "label_fit", "w", "delta", "diffs"))


def test_module_without_docstring_is_rejected() -> None:
    def basis(fit, layer):
        return None

    basis.__module__ = "tests.fake_module_without_doc"
    with pytest.raises(ValueError, match="has no docstring"):
        per_layer(family="x", axis="mixed")(basis)
    with pytest.raises(ValueError, match="axis 'sideways'"):
        per_layer(family="x", axis="sideways")


def test_session_fixtures_expose_diffs_and_labels(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject,
) -> None:
    write_project(write_tiny_project, pytester, tiny.config.cache_dir, tiny_diff_files)
    pytester.makepyfile(test_fixtures="""
        def test_b_side(ws_diffs, ws_labels, ws_arch):
            assert [d.name for d in ws_diffs] == ["w0", "w1"]
            for name, labels in ws_labels.items():
                assert labels["eval"].shape == (ws_arch.n_layers, 20, ws_arch.d_model)
                assert labels["fit"].shape == (ws_arch.n_layers, 20, ws_arch.d_model)
                assert labels["eval"].abs().sum() > 0
    """)
    pytester.runpytest_subprocess("test_fixtures.py", "-p", "no:cacheprovider").assert_outcomes(
        passed=1
    )
