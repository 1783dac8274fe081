"""Runs that must fail fast, fail once, or refuse what would change the numbers (pytester, tiny model)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest

from ws_harness.session import HarnessSession

WriteProject = Callable[[pytest.Pytester, Path, list[Path]], Path]  # conftest fixture

SWEEP = ("hypotheses", "-p", "no:cacheprovider", "-rA", "--deselect", "ws_ranking")

HYPOTHESIS = '''
"""{name}: {doc}"""
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis, orthonormalize
import torch


@per_layer(family="test", axis="write",
           refuted=["r_act", "r_causal", "r_w_combined", "r_w_struct", "r_act_specific"])
def basis(fit, layer):
    {body}
'''

W_O = "return left_basis(fit.weights(layer).o, fit.k)"


def _hypothesis(folder: Path, name: str, body: str, doc: str = "a test hypothesis") -> None:
    (folder / f"test_{name}.py").write_text(HYPOTHESIS.format(name=name, doc=doc, body=body))


def _summary(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path / "out" / "summary.csv") as fh:
        return {(r["hypothesis"], r["diff"]): r for r in csv.DictReader(fh)}


def _set(pytester: pytest.Pytester, key: str, value: str) -> None:
    """Rewrite one [tool.ws_harness] key of the pytester project's pyproject.toml."""
    path = pytester.path / "pyproject.toml"
    lines = [line for line in path.read_text().splitlines() if not line.startswith(f"{key} =")]
    path.write_text("\n".join(lines + [f"{key} = {value}"]) + "\n")


def test_a_builder_that_edits_the_fit_context_is_refused_and_corrupts_nothing(
    pytester: pytest.Pytester, tiny_diff_files: list[Path], write_tiny_project: WriteProject,
    tmp_path: Path,
) -> None:
    # A fresh cache: the victim's basis must really be built after the vandal's edit.
    folder = write_tiny_project(pytester, tmp_path / "cache", tiny_diff_files)
    _hypothesis(folder, "victim_resid_pca", "from ws_harness.linalg import pca_basis\n"
                "    return pca_basis(fit.clean.resid[layer], fit.k)")
    _hypothesis(folder, "a_vandal", "fit.clean.resid[layer][:, :8].mul_(10.0)\n    " + W_O)
    result = pytester.runpytest_subprocess(*SWEEP, "-p", "no:randomly")
    result.stdout.fnmatch_lines([
        "*hypothesis 'a_vandal' (*test_a_vandal.py): its builder modified fit.clean.resid in "
        "place; builders must not change what other hypotheses see*",
    ])
    with_vandal = _summary(pytester.path)
    assert {h for h, _ in with_vandal} == {"victim_resid_pca"}  # the vandal is excluded

    # The same victim without the vandal, in another fresh cache: identical numbers.
    (folder / "test_a_vandal.py").unlink()
    _set(pytester, "cache_dir", f'"{tmp_path / "cache2"}"')
    pytester.runpytest_subprocess(*SWEEP).assert_outcomes(passed=1, xfailed=8, skipped=2)
    alone = _summary(pytester.path)
    for key, row in alone.items():
        assert with_vandal[key]["r_act"] == row["r_act"], key


def test_a_rank_without_room_for_a_null_is_refused_once(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject,
) -> None:
    folder = write_tiny_project(pytester, tiny.config.cache_dir, tiny_diff_files)
    _hypothesis(folder, "my_write", W_O)
    result = pytester.runpytest_subprocess("hypotheses", "-p", "no:cacheprovider",
                                           "--ws-rank", "10000")
    result.assert_outcomes(failed=1, deselected=None)
    result.stdout.fnmatch_lines([
        "*ws-harness cannot run the hypotheses: --ws-rank: rank 10000 is too large for model "
        "'random:tiny' (d_model = 64): k must be at most d/4 = 16*pass --ws-rank 16 or less*",
    ])
    assert not (pytester.path / "out" / "summary.csv").exists()


def test_a_bad_model_is_reported_once_not_per_item(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject, tmp_path: Path,
) -> None:
    folder = write_tiny_project(pytester, tiny.config.cache_dir, tiny_diff_files)
    for name in ("one", "two", "three"):
        _hypothesis(folder, name, W_O)
    empty = tmp_path / "empty_model"
    empty.mkdir()
    result = pytester.runpytest_subprocess("hypotheses", "-p", "no:cacheprovider",
                                           "--ws-model", str(empty))
    result.assert_outcomes(failed=1, deselected=None)
    result.stdout.fnmatch_lines([f"*ws-harness cannot run the hypotheses: model '{empty}': *"])
    assert len(result.stdout.lines) < 60, "\n".join(result.stdout.lines)


def test_two_builders_in_one_file_are_refused(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject,
) -> None:
    folder = write_tiny_project(pytester, tiny.config.cache_dir, tiny_diff_files)
    _hypothesis(folder, "twice", W_O + "\n\n\n@per_layer(family='test', axis='write')\n"
                "def other(fit, layer):\n    return left_basis(fit.weights(layer).down, fit.k)")
    result = pytester.runpytest_subprocess(*SWEEP)
    assert result.ret != 0
    result.stdout.fnmatch_lines([
        "*test_twice.py: defines 2 decorated builders ('basis' and 'other'); a hypothesis file "
        "holds exactly one*",
    ])


def test_a_basis_wider_than_allowed_is_excluded_from_claims_and_ranking(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject,
) -> None:
    folder = write_tiny_project(pytester, tiny.config.cache_dir, tiny_diff_files)
    _hypothesis(folder, "my_write", W_O)
    _hypothesis(folder, "too_wide", "return left_basis(fit.weights(layer).o, 2 * fit.k)")
    result = pytester.runpytest_subprocess(*SWEEP)
    # my_write: basis + 10 recorded findings; too_wide: basis + 10 claims fail (never judged)
    result.assert_outcomes(passed=1, xfailed=10, failed=11)
    result.stdout.fnmatch_lines_random([
        "*hypothesis 'too_wide': basis rank 8 at layer 0 exceeds 4 (k=4 × rank_factor=1)*",
        "EXCLUDED too_wide: *",
    ])
    assert {h for h, _ in _summary(pytester.path)} == {"my_write"}
    with open(pytester.path / "out" / "claims.csv") as fh:
        assert {r["hypothesis"] for r in csv.DictReader(fh)} == {"my_write"}


@pytest.mark.parametrize("setting", ["out", "cache_dir"])
def test_an_output_or_cache_folder_that_is_a_file_fails_at_startup(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject, setting: str,
) -> None:
    folder = write_tiny_project(pytester, tiny.config.cache_dir, tiny_diff_files)
    _hypothesis(folder, "my_write", W_O)
    (pytester.path / "a_file").write_text("not a folder")
    option = "--ws-" + setting.replace("_", "-")
    result = pytester.runpytest_subprocess("hypotheses", "-p", "no:cacheprovider", option,
                                           str(pytester.path / "a_file"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*ws-harness configuration: {option}: {option} *a_file is a "
                                 "file, not a folder; pass a folder path*"])


ANSWER = '''
"""answer_direction: the unembedding difference W_U[Yes] − W_U[No] (global, rank 1)."""
from ws_harness.hypothesis import global_basis
from ws_harness.linalg import orthonormalize


@global_basis(family="W:unembed", axis="mixed")
def basis(fit):
    yes, no = fit.answer_ids
    return orthonormalize((fit.unembedding[yes] - fit.unembedding[no])[:, None])
'''


def _claims(path: Path) -> dict[tuple[str, str, str], str]:
    with open(path / "out" / "claims.csv") as fh:
        return {(r["hypothesis"], r["diff"], r["claim"]): r["p_adj"] for r in csv.DictReader(fh)}


def test_verdicts_do_not_depend_on_which_files_ran(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject,
) -> None:
    folder = write_tiny_project(pytester, tiny.config.cache_dir, tiny_diff_files)
    _hypothesis(folder, "my_write", W_O)
    _hypothesis(folder, "my_down", "return left_basis(fit.weights(layer).down, fit.k)")
    (folder / "test_answer_direction.py").write_text(ANSWER)
    pytester.runpytest_subprocess(*SWEEP).assert_outcomes(passed=3 + 10, xfailed=20)
    full = _claims(pytester.path)
    result = pytester.runpytest_subprocess("hypotheses/test_answer_direction.py",
                                           *SWEEP[1:])
    result.assert_outcomes(passed=1 + 10)
    alone = _claims(pytester.path)
    assert set(alone) == {k for k in full if k[0] == "answer_direction"}
    # BH ran over the whole catalog both times: identical adjusted p-values
    assert alone == {k: full[k] for k in alone}
    inputs = (pytester.path / "out" / "inputs.json").read_text()
    assert '"bh_family": [\n  "answer_direction",\n  "my_down",\n  "my_write"\n ]' in inputs


def test_every_ceiling_is_checked_against_the_rank_k_optimum() -> None:
    from ws_harness import schema
    from ws_harness.collect import ClaimFailed, check_ceiling
    from ws_harness.hypothesis import Hypothesis

    informative = Hypothesis(name="informative", family="ceiling", axis="ceiling",
                             scope="per_layer", build=lambda ctx, layer: None,
                             definition="a ceiling with no oracle_of", module="m")
    pct = {m.name: m.pct_oracle for m in schema.metrics() if m.pct_oracle}
    nothing = {col: float("nan") for col in pct.values()}
    check_ceiling(informative, {**nothing, pct["r_act"]: 0.4}, "w0")  # below the optimum
    with pytest.raises(ClaimFailed, match="beats the rank-k optimum on w0 \\(R_act pct_oracle"):
        check_ceiling(informative, {**nothing, pct["r_act"]: 1.2}, "w0")
    with pytest.raises(ClaimFailed, match="the ceiling measures nothing"):
        check_ceiling(informative, nothing, "w0")


def test_tables_do_not_depend_on_the_worker_count_and_say_what_ran(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject, tmp_path: Path,
) -> None:
    import json

    from ws_harness import schema
    from ws_harness.diffs import load_diff

    folder = write_tiny_project(pytester, tmp_path / "cache_n0", tiny_diff_files)
    _hypothesis(folder, "my_write", W_O)
    (folder / "test_answer_direction.py").write_text(ANSWER)
    tables = {}
    for workers, cache in (("0", "cache_n0"), ("2", "cache_n2")):  # each builds its own cache
        _set(pytester, "cache_dir", f'"{tmp_path / cache}"')
        pytester.runpytest_subprocess(*SWEEP, "-n", workers).assert_outcomes(passed=2 + 10,
                                                                             xfailed=10)
        out = pytester.path / "out"
        tables[workers] = {name: (out / f"{name}.csv").read_bytes()
                           for name in ("per_layer", "summary", "claims")}
        if workers == "0":
            inputs = json.loads((out / "inputs.json").read_text())
            timings = json.loads((out / "timings.json").read_text())
            with open(out / "claims.csv") as fh:
                claims = list(csv.DictReader(fh))
    for name in tables["0"]:
        assert tables["0"][name] == tables["2"][name], f"{name}.csv differs between -n 0 and -n 2"

    # inputs.json: what ran, with fingerprints that identify the diffs
    assert inputs["model"]["spec"] == "random:tiny" and inputs["rank"] == 4
    assert inputs["hypotheses"] == ["answer_direction", "my_write"]
    assert [d["name"] for d in inputs["diff"]["diffs"]] == ["w0", "w1"]
    for entry, path in zip(inputs["diff"]["diffs"], tiny_diff_files, strict=True):
        assert entry["fingerprint"] == load_diff(path, tiny.arch).sha256
    # timings.json: seconds per phase of the one process
    # (one key: "main", or the outer xdist worker's name, which the subprocess inherits)
    assert len(timings) == 1 and next(iter(timings.values()))["scores"] > 0
    # claims: one row per hypothesis × diff × claim; holds is the schema's rule on p_adj
    assert len(claims) == 2 * 2 * 5
    for row in claims:
        value, p_adj = float(row["value"]), float(row["p_adj"])
        assert (row["holds"] == "true") == schema.holds(value, p_adj)
        assert row["status"] in ("held", "refuted", "surprise", "stale")
        assert float(row["p"]) <= p_adj + 1e-12  # BH never lowers a p-value



def test_a_builder_can_report_per_layer_columns_beside_its_basis(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject,
) -> None:
    folder = write_tiny_project(pytester, tiny.config.cache_dir, tiny_diff_files)
    _hypothesis(folder, "with_columns", "B = left_basis(fit.weights(layer).o, fit.k)\n"
                "    return B, {'layer_times_two': 2 * layer, 'width': B.shape[1]}")
    _hypothesis(folder, "bad_column", "B = left_basis(fit.weights(layer).o, fit.k)\n"
                "    return B, {'label': 'not a number'}")
    result = pytester.runpytest_subprocess(*SWEEP)
    result.stdout.fnmatch_lines(["*hypothesis 'bad_column' layer 0: column 'label' is str, "
                                 "not a number*"])
    with open(pytester.path / "out" / "per_layer.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["hypothesis"] == "with_columns"]
    assert rows and all(float(r["layer_times_two"]) == 2 * int(r["layer"]) for r in rows)
    assert {r["width"] for r in rows} == {"4.0"}
