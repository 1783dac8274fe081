"""Recorded findings: refuted= derived from a run's claims, and rewritten in hypothesis files."""

from __future__ import annotations

from pathlib import Path

import pytest

from ws_harness import cli
from ws_harness.findings import finding_lines, refuted_claims, write_findings
from ws_harness.results import RunResults

SOURCE = '''"""h: a hypothesis."""
from ws_harness.hypothesis import per_layer


@per_layer(family="f", axis="mixed"{refuted})  # a comment that must survive
def basis(fit, layer):
    return None
'''


def _claims(failing: dict[str, list[int]]) -> list[dict]:
    rows = []
    for seed in (0, 1, 2):
        for claim in ("r_act", "r_w_combined"):
            holds = seed not in failing.get(claim, [])
            rows.append({"hypothesis": "h", "diff": f"seed{seed}", "seed": seed, "claim": claim,
                         "holds": holds, "expected_refuted": False,
                         "status": "held" if holds else "surprise"})
    return rows


def _run(path: Path, failing: dict[str, list[int]]) -> RunResults:
    return RunResults(claims=_claims(failing), hypotheses={"h": {"file": str(path)}})


@pytest.mark.parametrize(("before", "failing", "after"), [
    ("", {"r_w_combined": [0, 1, 2]}, ', refuted=["r_w_combined"]'),
    (', refuted=["r_act"]', {"r_act": [1]}, ', refuted={"r_act": [1]}'),
    (', refuted=["r_act", "r_w_combined"]', {}, ""),
    (",\n           refuted={\"r_act\": [0]}", {"r_act": [0, 2], "r_w_combined": [0, 1, 2]},
     ', refuted={"r_act": [0, 2], "r_w_combined": None}'),
])
def test_write_findings_rewrites_only_the_refuted_keyword(
    tmp_path: Path, before: str, failing: dict[str, list[int]], after: str
) -> None:
    path = tmp_path / "test_h.py"
    path.write_text(SOURCE.format(refuted=before))
    results = _run(path, failing)
    changed = write_findings(results)
    assert path.read_text() == SOURCE.format(refuted=after)
    assert changed == ([] if before == after else [path])
    assert write_findings(results) == []  # idempotent
    if failing:
        assert finding_lines(results) == [f"h: refuted={after.removeprefix(', refuted=')}"]
    assert refuted_claims(results).get("h", {}).keys() == failing.keys()


def test_write_findings_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="hypothesis 'h': its file"):
        write_findings(_run(tmp_path / "gone.py", {}))


# ---- the `ws-harness findings` command: 0 up to date, 1 stale, 2 no run to read ----------------
def _write_run(out: Path, results: RunResults) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(results.to_json())
    return out


def test_findings_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "test_h.py"
    path.write_text(SOURCE.format(refuted=', refuted=["r_act"]'))
    up_to_date = _run(path, {"r_act": [0, 1, 2]})
    for row in up_to_date.claims:
        row["status"] = "refuted" if not row["holds"] else "held"
    assert cli.main(["findings", str(_write_run(tmp_path / "a", up_to_date))]) == cli.EXIT_OK
    assert capsys.readouterr().out == 'h: refuted=["r_act"]\n'
    stale = _run(path, {})
    for row in stale.claims:
        row["status"] = "stale" if row["claim"] == "r_act" else "held"
    assert cli.main(["findings", str(_write_run(tmp_path / "b", stale))]) == 1
    assert "out of date: h: r_act on seed0 now holds" in capsys.readouterr().out


def test_findings_without_a_run_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-run"
    assert cli.main(["findings", str(missing)]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert err == (f"error: {missing / 'results.json'} not found; run the sweep first (make "
                   "sweep) or pass its --ws-out folder\n"), err
    _write_run(tmp_path / "broken", RunResults())
    (tmp_path / "broken" / "results.json").write_text('{"claims": [')
    assert cli.main(["findings", str(tmp_path / "broken")]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'broken' / 'results.json'} is not a readable "
                          "results file") and err.count("\n") == 1, err
