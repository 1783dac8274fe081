"""The ranking snapshot and its regression gate (SPEC §6): the rule on synthetic records, and the
`ws_ranking` item end to end with pytester on the tiny model."""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from ws_harness.results import RunResults
from ws_harness.session import HarnessSession
from ws_harness.snapshot import (
    TAU_MIN,
    UPDATE_COMMAND,
    RankingSnapshotExtension,
    build_record,
    check_ranking,
    compare,
    read_snapshot,
    serialize,
    snapshot_name,
    write_snapshot,
)

# ---- the rule, on synthetic runs -------------------------------------------------------------

INPUTS = {
    "model": {"spec": "random:tiny", "fingerprint": "f" * 64},
    "diff": {"mode": "files", "diffs": [{"name": f"w{i}", "seed": None, "fingerprint": f"{i}" * 64}
                                        for i in range(3)]},
    "rank": 4,
    "behaviour": {"name": "sycophancy", "source": "ws_harness/behaviours/sycophancy.json",
                  "fingerprint": "b" * 64},
}


def run(scores: dict[str, tuple[str, list[tuple[float, float]]]], **inputs: object) -> RunResults:
    """{name: (axis, [(R_act, R_w_combined) per seed])} → a RunResults as a sweep produces."""
    summaries = []
    for name, (axis, values) in scores.items():
        for i, (r_act, r_w) in enumerate(values):
            summaries.append({
                "diff": f"w{i}", "seed": None, "hypothesis": name, "family": "f", "axis_kind": axis,
                "scope": "global", "r_act": r_act, "r_w_combined": r_w,
                "joint": math.sqrt(r_act * r_w), "r_causal": math.sqrt(r_act * r_w),
                "r_causal_read": r_act, "r_act_ci_lo": r_act * 0.99,
                "r_act_ci_hi": r_act * 1.01,
            })
    return RunResults(summaries=summaries, inputs={**INPUTS, **inputs})


BASE = {
    "top": ("mixed", [(40.0, 30.0), (42.0, 31.0), (41.0, 29.0)]),
    "second": ("write", [(4.0, 2.0), (4.2, 2.1), (3.9, 2.0)]),
    "near_a": ("mixed", [(1.30, 1.20), (1.10, 1.05), (1.25, 1.15)]),
    "near_b": ("mixed", [(1.20, 1.10), (1.28, 1.22), (1.05, 1.00)]),
    "reader": ("read", [(2.0, 8.0), (2.1, 8.0), (1.9, 8.0)]),
    "oracle": ("ceiling", [(60.0, 70.0)] * 3),
}


def scaled(name: str, factor: float, scores: dict = BASE) -> dict:
    axis, values = scores[name]
    return {**scores, name: (axis, [(a * factor, w * factor) for a, w in values])}


def test_snapshot_names_follow_the_configuration(tmp_path: Path) -> None:
    name = snapshot_name(INPUTS)
    assert re.fullmatch(r"ranking__random-tiny__files-[0-9a-f]{12}__k4__sycophancy\.json", name)
    other = {**INPUTS,
             "diff": {"mode": "files", "diffs": [{"name": "w0", "fingerprint": "9" * 64}]}}
    assert snapshot_name(other) != name and snapshot_name({**INPUTS, "rank": 8}) != name
    built = {**INPUTS, "model": {"spec": "smollm2-135m-instruct"},
             "diff": {"mode": "build", "diffs": [
                 {"name": f"seed{s}", "seed": s, "source": "built:scripted"} for s in (0, 1, 2)]}}
    assert snapshot_name({**built, "rank": 8}) == (
        "ranking__smollm2-135m-instruct__build-scripted-s0.1.2__k8__sycophancy.json")
    # float32 forwards share a snapshot on any device; bfloat16 ones keep their own.
    assert snapshot_name({**built, "rank": 8, "forward": {"device": "cuda", "dtype": "float32"}}) \
        == snapshot_name({**built, "rank": 8})
    assert snapshot_name({**built, "rank": 8, "forward": {"device": "cuda", "dtype": "bfloat16"}}) \
        == "ranking__smollm2-135m-instruct__build-scripted-s0.1.2__k8__sycophancy__bfloat16.json"
    local = {**INPUTS, "model": {"spec": str(tmp_path), "fingerprint": "1234abcd" * 8},
             "behaviour": {"name": "mine", "source": "/x/mine.json", "fingerprint": "9" * 64}}
    assert snapshot_name(local) == (
        f"ranking__{tmp_path.name}-1234abcd__{snapshot_name(INPUTS).split('__')[2]}__k4__mine-99999999"
        ".json")


def test_records_are_rounded_to_the_spread_and_byte_stable() -> None:
    record = build_record(run(BASE))
    text = serialize(record)
    assert text == serialize(build_record(run(BASE)))  # same run, same bytes
    assert json.loads(text) == json.loads(json.dumps(record))
    top = record["hypotheses"]["top"]
    assert top["joint_tol_log2"] == 0.15  # the floor: the seed IQR is tiny
    assert top["r_act"] == 41.0 and top["rank"] == 1 and top["rank_range"] == [1, 1]
    assert "rank" not in record["hypotheses"]["oracle"]  # ceilings: scores only
    # one line per hypothesis, in ranking order
    lines = [l for l in text.splitlines() if l.startswith('    "') and '"table"' in l]
    assert [json.loads("{" + l.rstrip(",") + "}").popitem()[0] for l in lines] == [
        "top", "second", "near_a", "near_b", "reader", "oracle"]
    # a tiny float wobble (another machine) rounds away
    wobble = {k: (a, [(x * (1 + 1e-9), y) for x, y in v]) for k, (a, v) in BASE.items()}
    assert serialize(build_record(run(wobble))) == text
    assert record["kendall_tau_seeds"]["write/mixed"]["w0~w1"] == pytest.approx(0.67, abs=0.01)


def test_identical_and_within_noise_runs_pass() -> None:
    old = build_record(run(BASE))
    assert compare(old, build_record(run(BASE))).ok
    within = compare(old, build_record(run(scaled("second", 1.08))))  # ×1.08 < ×1.11 floor
    assert within.ok and within.taus["write/mixed"] == 1.0
    # near_a and near_b overlap across seeds: each moving within the floor may swap them
    swapped = scaled("near_b", 1.07, scaled("near_a", 0.93))
    assert compare(old, build_record(run(swapped))).ok


def test_the_recorded_tolerance_applies_not_the_current_spread() -> None:
    # 'second' drops ×0.5 while its seeds get noisy: the current spread must not excuse it
    old = build_record(run(BASE))
    noisy = {**BASE, "second": ("write", [(0.5, 0.25), (2.0, 1.0), (8.0, 4.0)])}
    result = compare(old, build_record(run(noisy)))
    assert not result.ok and "second" in result.regressions
    assert any("R_act 4 → 2" in r for r in result.regressions["second"])


def test_one_seed_collapsing_is_a_regression_even_when_the_median_holds() -> None:
    old = build_record(run(BASE))
    axis, values = BASE["second"]
    collapsed = {**BASE, "second": (axis, [values[0], values[1], (0.9, 0.5)])}  # seed w2 only
    result = compare(old, build_record(run(collapsed)))
    assert not result.ok and list(result.regressions) == ["second"]
    text = "\n".join(result.regressions["second"])
    assert "R_act on w2: 3.9 → 0.9" in text and "the median moved less" in text


def test_a_move_beyond_the_spread_names_the_hypothesis_with_old_and_new_numbers() -> None:
    old = build_record(run(BASE))
    result = compare(old, build_record(run(scaled("second", 1 / 3.5))))  # 2.83 → 0.81
    assert not result.ok and list(result.regressions) == ["second"]
    text = "\n".join(result.lines())
    assert "second (write/mixed, rank 2 → 4):" in text
    assert "joint 2.83 → 0.808 (×0.286; seed spread allows ×/÷1.11)" in text
    assert "R_act 4 → 1.14" in text and "R_w_combined 2 → 0.571" in text
    assert "now below near_a, near_b, that it led with non-overlapping recorded R_causal" in text


def test_the_tolerance_grows_with_the_seed_spread() -> None:
    noisy = {**BASE, "second": ("write", [(2.0, 1.0), (4.0, 2.0), (8.0, 4.0)])}  # 4× range
    old = build_record(run(noisy))
    assert old["hypotheses"]["second"]["joint_tol_log2"] == 2.0  # 2 × IQR of log2 = 2 × 1
    assert compare(old, build_record(run(scaled("second", 1.5, noisy)))).ok  # within ×4, ±4.2
    assert not compare(old, build_record(run(scaled("second", 5.0, noisy)))).ok


def test_kendall_tau_against_the_snapshot_has_a_threshold() -> None:
    # six hypotheses with wide seed ranges, ordered by their middle seed: reversing that
    # order moves every median and every seed within its tolerance
    wide = {f"h{i}": ("mixed", [(1.0, 1.0), (2.0 ** (i / 3) * 16, 1.0), (256.0, 1.0)])
            for i in range(6)}
    old = build_record(run(wide))
    reversed_ = {f"h{i}": wide[f"h{5 - i}"] for i in range(6)}
    result = compare(old, build_record(run(reversed_)))
    # R_causal (the rank key) is stored rounded to its absolute tolerance, which at this
    # spread ties a few neighbours: τ is near −1, not exactly −1.
    tau = result.taus["write/mixed"]
    assert not result.regressions and -1.0 <= tau < -0.8
    assert result.tau_failures == [
        f"Kendall τ of the write/mixed ranking against the snapshot is {tau:.2f} < {TAU_MIN} "
        "(n = 6 hypotheses by R_causal)"]


def test_missing_broken_and_new_hypotheses() -> None:
    old = build_record(run(BASE))
    without = {k: v for k, v in BASE.items() if k != "second"}
    deselected = compare(old, build_record(run(without)), collected=set(without))
    assert deselected.ok and any("second: in the snapshot but not collected" in n
                                 for n in deselected.notes)
    broken = compare(old, build_record(run(without)), errors={"second": "builder raised X"},
                     collected=set(BASE))
    assert broken.regressions == {"second": [
        "recorded (R_causal 2.83) but not scored in this run: builder raised X"]}
    added = compare(old, build_record(run({**BASE, "extra": ("mixed", [(1.0, 1.0)] * 3)})))
    assert added.ok and any(n.startswith("extra: new") for n in added.notes)
    other_diffs = compare(old, build_record(run(BASE, model={"spec": "random:tiny",
                                                             "fingerprint": "0" * 64})))
    assert other_diffs.ok and "model weights differ" in " ".join(other_diffs.notes)


def test_check_records_compares_and_refuses_silence(tmp_path: Path) -> None:
    snaps = tmp_path / "snapshots"
    missing = check_ranking(run(BASE), snaps)
    assert missing.failed and missing.status == "missing"
    assert f"record it (then commit it) with: {UPDATE_COMMAND}" in missing.message
    recorded = check_ranking(run(BASE), snaps, update=True, lock_dir=tmp_path / "locks")
    assert recorded.status == "recorded" and not recorded.failed
    assert [p.name for p in snaps.iterdir()] == [snapshot_name(INPUTS)]  # no temp or lock left
    again = check_ranking(run(BASE), snaps, update=True, lock_dir=tmp_path / "locks")
    assert again.status == "unchanged"
    assert check_ranking(run(BASE), snaps).status == "match"
    moved = check_ranking(run(scaled("top", 0.1)), snaps)
    assert moved.status == "regression"
    assert moved.message.splitlines()[0].startswith(
        f"ranking regression against {snaps / snapshot_name(INPUTS)} (3 seeds; 1 hypothesis")
    assert moved.message.splitlines()[-1].endswith(UPDATE_COMMAND)
    other = check_ranking(run(BASE, rank=8), snaps)
    assert other.status == "missing" and snapshot_name(INPUTS) in other.message


def test_storage_goes_through_the_syrupy_extension(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    record = build_record(run(BASE))
    assert read_snapshot(path) is None
    assert write_snapshot(path, record) is True and write_snapshot(path, record) is False
    assert read_snapshot(path) == json.loads(serialize(record))
    ext = RankingSnapshotExtension()
    near = serialize(build_record(run(scaled("second", 1.05))))
    far = serialize(build_record(run(scaled("second", 2.0))))
    assert ext.matches(serialized_data=near, snapshot_data=path.read_text())
    assert not ext.matches(serialized_data=far, snapshot_data=path.read_text())


# ---- the gate in a sweep, end to end (pytester, tiny model) ----------------------------------

ANSWER = '''
"""answer_direction: the unembedding difference W_U[Yes] − W_U[No] (global, rank 1)."""
import torch

from ws_harness.hypothesis import global_basis
from ws_harness.linalg import orthonormalize
{extra}

@global_basis(family="W:unembed", axis="mixed")
def basis(fit):
{body}
'''
RECOVERS = """    yes, no = fit.answer_ids
    return orthonormalize((fit.unembedding[yes] - fit.unembedding[no])[:, None])"""
RANDOM = """    generator = torch.Generator().manual_seed(0)
    return torch.linalg.qr(torch.randn(fit.d, 1, generator=generator))[0]"""
UNRELATED = '''

# An unrelated edit: a comment and a helper nobody calls.
def _describe(fit):
    return f"d = {fit.d}"
'''
MY_WRITE = '''
"""my_write: top-k left singular vectors of W_o (a user-added hypothesis)."""
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="W:write", axis="write",
           refuted=["r_act", "r_causal", "r_w_combined", "r_w_struct", "r_act_specific"])
def basis(fit, layer):
    return left_basis(fit.weights(layer).o, fit.k)
'''
LM_HEAD_READ = '''
"""lm_head_read: the top-k right singular vectors of the unembedding W_U (global; read side)."""
from ws_harness.hypothesis import global_basis
from ws_harness.linalg import right_basis


@global_basis(family="W:unembed", axis="read", refuted=["r_act", "r_causal_read"])
def basis(fit):
    return right_basis(fit.unembedding, fit.k)
'''
SNAPSHOT = "snapshots/ranking__random-tiny__files-*__k4__sycophancy.json"


def write_project(
    writer: Callable[[pytest.Pytester, Path, list[Path]], Path], pytester: pytest.Pytester,
    cache: Path, diffs: list[Path],
) -> None:
    folder = writer(pytester, cache, diffs)
    set_answer(pytester, RECOVERS)
    (folder / "test_my_write.py").write_text(MY_WRITE)
    (folder / "test_lm_head_read.py").write_text(LM_HEAD_READ)


def set_answer(pytester: pytest.Pytester, body: str, extra: str = "") -> None:
    (pytester.path / "hypotheses" / "test_answer_direction.py").write_text(
        ANSWER.format(body=body, extra=extra))


def sweep(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("hypotheses", "-p", "no:cacheprovider", "-rA", *args)


def the_snapshot(pytester: pytest.Pytester) -> Path:
    (path,) = (pytester.path / "snapshots").glob("ranking__*.json")
    return path


def test_the_gate_records_passes_unrelated_edits_and_fails_a_random_basis(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: Callable[[pytest.Pytester, Path, list[Path]], Path],
) -> None:
    write_project(write_tiny_project, pytester, tiny.config.cache_dir, tiny_diff_files)
    # 1. No snapshot yet: the gate fails and says how to record one (never a silent pass).
    result = sweep(pytester, "-k", "ws_ranking")
    result.assert_outcomes(failed=1, deselected=27)
    result.stdout.fnmatch_lines([
        f"no ranking snapshot for this configuration: {SNAPSHOT}",
        f"record it (then commit it) with: {UPDATE_COMMAND}",
    ])

    # 2. Record with the whole sweep under xdist: the one ws_ranking item writes, under a lock.
    result = sweep(pytester, "-n", "2", "--ws-update-snapshots")
    # answer: basis + 5 claims × 2 diffs; my_write: basis; lm_head_read: basis; the gate
    # (my_write's 5 claims per diff are recorded findings; lm_head_read's R_act is one too, and
    # its R_causal_read is undefined, skipped: the tiny diffs change no read-side weight)
    result.assert_outcomes(passed=11 + 1 + 1 + 1, xfailed=10 + 2, skipped=2)
    result.stdout.fnmatch_lines_random([
        "PASSED ws_ranking",
        f"ranking gate (passed): recorded ranking snapshot {SNAPSHOT} (new; 3 hypotheses, "
        "2 seeds)",
    ])
    path = the_snapshot(pytester)
    recorded = path.read_bytes()
    record = json.loads(recorded)
    assert list(record["hypotheses"]) == ["answer_direction", "my_write", "lm_head_read"]
    assert record["hypotheses"]["lm_head_read"]["table"] == "read"
    old = record["hypotheses"]["answer_direction"]

    # 3. Re-recording on the same machine writes the same bytes.
    result = sweep(pytester, "-k", "ws_ranking", "--ws-update-snapshots")
    result.assert_outcomes(passed=1, deselected=27)
    result.stdout.fnmatch_lines([f"ranking gate (passed): ranking snapshot {SNAPSHOT} is up to "
                                 "date"])
    assert path.read_bytes() == recorded

    # 4. An unrelated code change (comment + helper) rebuilds the basis: same ranking, passes.
    set_answer(pytester, RECOVERS, extra=UNRELATED)
    result = sweep(pytester)
    result.assert_outcomes(passed=14, xfailed=12, skipped=2)
    result.stdout.fnmatch_lines([f"ranking gate (passed): ranking matches {SNAPSHOT} "
                                 "(write/mixed τ=1.00)"])
    assert path.read_bytes() == recorded

    # 5. Replacing the basis by a random orthonormal one fails the ranking check, readably.
    set_answer(pytester, RANDOM)
    result = sweep(pytester)
    result.stdout.fnmatch_lines([
        "FAILED ws_ranking - ranking regression against snapshots/ranking__*",
    ], consecutive=False)
    result.stdout.fnmatch_lines([
        f"ranking regression against {SNAPSHOT} (2 seeds; 1 hypothesis moved beyond the seed "
        "spread):",
        "  answer_direction (write/mixed, rank 1 → *):",
        f"      R_causal {old['r_causal']:.3g} → * (*; seed spread allows ±*)",
        f"      joint {old['joint']:.3g} → * (×*; seed spread allows ×/÷1.11)",
        f"      R_act {old['r_act']:.3g} → * (×*; seed spread allows ×/÷*)",
        f"      R_w_combined {old['r_w_combined']:.3g} → * (×*; seed spread allows ×/÷1.11)",
        "  Kendall τ against the snapshot: write/mixed τ=*",
        f"if this change is intended, re-record the snapshot: {UPDATE_COMMAND}",
    ])
    text = result.stdout.str()
    new_joint = float(re.search(r"joint [\d.]+ → ([\d.e+-]+)", text).group(1))
    assert new_joint < old["joint"] / 4  # the recovered direction is gone
    assert "  my_write (" not in text and "  lm_head_read (" not in text  # unmoved: not blamed
    assert path.read_bytes() == recorded  # a failing check never rewrites the record


def test_no_gate_without_hypothesis_items(pytester: pytest.Pytester, tiny: HarnessSession) -> None:
    pytester.makeconftest('pytest_plugins = ["ws_harness.plugin"]\n')
    pytester.makefile(".toml", pyproject=textwrap.dedent(f"""
        [tool.ws_harness]
        model = "random:tiny"
        cache_dir = "{tiny.config.cache_dir}"
    """))
    pytester.makepyfile(test_plain="def test_one():\n    pass\n")
    result = pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["test_plain.py::test_one"])
    result.stdout.no_fnmatch_line("*ws_ranking*")


def test_a_snapshot_recorded_under_another_rule_is_refused(tmp_path: Path) -> None:
    """A record that gates other scores (e.g. from before R_causal) must not pass vacuously."""
    snaps = tmp_path / "snapshots"
    check_ranking(run(BASE), snaps, update=True, lock_dir=tmp_path / "locks")
    path = snaps / snapshot_name(INPUTS)
    record = json.loads(path.read_text())
    record["rule"]["scores"] = ["joint", "r_act", "r_w_combined"]
    for entry in record["hypotheses"].values():
        for key in [k for k in entry if k.startswith("r_causal")]:
            del entry[key]
    path.write_text(json.dumps(record))
    outcome = check_ranking(run(BASE), snaps)
    assert outcome.failed and outcome.status == "invalid"
    assert "was recorded gating ['joint', 'r_act', 'r_w_combined']" in outcome.message
    assert outcome.message.endswith(UPDATE_COMMAND)


def test_linear_scale_scores_move_in_absolute_units() -> None:
    """R_causal can be ≤ 0, so its tolerance is absolute, never a log2 of a clamped value."""
    old = build_record(run(BASE))
    assert "r_causal_tol" in old["hypotheses"]["near_a"]
    assert "r_causal_tol_log2" not in old["hypotheses"]["near_a"]
    flipped = run(BASE)
    for row in flipped.summaries:
        if row["hypothesis"] == "near_a":
            row["r_causal"] = -row["r_causal"]  # ~1.2 → ~−1.2: a real move of ~2.4
    result = compare(old, build_record(flipped))
    assert "near_a" in result.regressions
    assert any("R_causal" in r and "seed spread allows ±" in r for r in result.regressions["near_a"])
