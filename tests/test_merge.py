"""`ws-harness merge` (scale-out, issue 13): runs of one diff each, merged, equal the run of both.

Three sweeps of the tiny random model with three hypotheses (write/mixed, write, read):
``ab`` over both diff files on the shared cache, ``a`` (w0) on a fresh cache of its own, as
another machine would compute it, and ``b`` (w1) on the shared cache again. The merged folder
must hold the same bytes as ``ab``'s: tables, inputs.json, ranking, Kendall τ, plots,
conclusion, and the same gate verdict.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from run_folders import copy_run, set_at  # tests/run_folders.py

from ws_harness import merge
from ws_harness.merge import (
    GATE_FILE,
    PROVENANCE_FILE,
    MergeError,
    Shard,
    check_compatible,
    load_run,
    main_merge,
    merge_results,
    merge_runs,
    record_settings,
)
from ws_harness.results import RunResults, read_tables
from ws_harness.scoreboard import Scoreboard
from ws_harness.session import HarnessSession
from ws_harness.snapshot import check_ranking

HYPOTHESES = {
    "answer_direction": '''
"""answer_direction: the unembedding difference W_U[Yes] − W_U[No] (global, rank 1)."""
from ws_harness.hypothesis import global_basis
from ws_harness.linalg import orthonormalize


@global_basis(family="W:unembed", axis="mixed")
def basis(fit):
    yes, no = fit.answer_ids
    return orthonormalize((fit.unembedding[yes] - fit.unembedding[no])[:, None])
''',
    "my_write": '''
"""my_write: top-k left singular vectors of W_o (a user-added hypothesis)."""
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="W:write", axis="write",
           refuted=["r_act", "r_causal", "r_w_combined", "r_w_struct", "r_act_specific"])
def basis(fit, layer):
    return left_basis(fit.weights(layer).o, fit.k)
''',
    "lm_head_read": '''
"""lm_head_read: the top-k right singular vectors of the unembedding W_U (global; read side)."""
from ws_harness.hypothesis import global_basis
from ws_harness.linalg import right_basis


@global_basis(family="W:unembed", axis="read", refuted=["r_act", "r_causal_read"])
def basis(fit):
    return right_basis(fit.unembedding, fit.k)
''',
}
# What a single run writes into its --ws-out, byte for byte (results.json apart: timings).
SAME_BYTES = [f"{t}.{ext}" for t in ("per_layer", "summary", "claims") for ext in ("csv", "parquet")]
SAME_BYTES += ["inputs.json", "ranking.csv", "ranking.parquet", "ranking_per_seed.csv",
               "kendall_tau.csv", "definitions.md", "conclusion.md", "joint_scatter.png",
               "layer_heatmap.png", "retention_agreement.png"]


def _sweep(project: Path, out: str, diffs: list[Path], cache: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WS_", "PYTEST_XDIST"))}
    # `--opt=value`: pytest takes separate path-like arguments into its rootdir search.
    cmd = [sys.executable, "-m", "pytest", "hypotheses", "-q", "-p", "no:cacheprovider",
           "--deselect", "ws_ranking", f"--ws-out={out}", f"--ws-cache-dir={cache}",
           "--ws-diff=" + ",".join(str(p) for p in diffs)]
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    # Claim items may pass or fail (findings); what is merged is what the run wrote.
    assert (project / out / "results.json").is_file(), done.stdout[-4000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def runs(tiny: HarnessSession, tiny_diff_files: list[Path],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"ab", "a", "b"}: the output folders of the three sweeps (see the module docstring)."""
    project = tmp_path_factory.mktemp("merge_project")
    (project / "conftest.py").write_text('pytest_plugins = ["ws_harness.plugin"]\n')
    (project / "pyproject.toml").write_text(textwrap.dedent("""
        [tool.ws_harness]
        model = "random:tiny"
        rank = 4
    """))
    (project / "hypotheses").mkdir()
    for name, source in HYPOTHESES.items():
        (project / "hypotheses" / f"test_{name}.py").write_text(source)
    tiny.loaded  # noqa: B018 - the shared cache holds the tokenizer
    fresh = project / "fresh-cache"  # another machine: nothing computed yet
    for kind in ("tokenizer", "hashes"):
        shutil.copytree(tiny.cache.root / kind, fresh / kind, dirs_exist_ok=True)
    w0, w1 = tiny_diff_files
    _sweep(project, "ab", [w0, w1], tiny.config.cache_dir)
    _sweep(project, "a", [w0], fresh)  # w0 computed again, alone: the same numbers
    _sweep(project, "b", [w1], tiny.config.cache_dir)  # warm (one cold shard is enough)
    return {name: project / name for name in ("ab", "a", "b")}


def _without_timings(out: Path) -> dict[str, Any]:
    data = json.loads((out / "results.json").read_text())
    data.pop("timings")
    return data


def _first_difference(a: Path, b: Path) -> str:
    if a.suffix in (".csv", ".md", ".json"):
        for i, (x, y) in enumerate(zip(a.read_text().splitlines(), b.read_text().splitlines())):
            if x != y:
                return f"line {i + 1}:\n  merged {x[:300]}\n  single {y[:300]}"
    return "binary or length difference"


def _assert_same_run(merged: Path, single: Path) -> None:
    for name in SAME_BYTES:
        same = (merged / name).read_bytes() == (single / name).read_bytes()
        assert same, f"{name} differs, {_first_difference(merged / name, single / name)}"
    assert _without_timings(merged) == _without_timings(single)


def test_two_one_diff_runs_merge_into_the_two_diff_run(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    single = read_tables(runs["ab"])
    snapshots = tmp_path / "snapshots"
    assert not check_ranking(single, snapshots, update=True).failed  # the record of the run
    expected_gate = check_ranking(single, snapshots)
    assert expected_gate.status == "match"

    out = tmp_path / "merged"
    rc = main_merge([str(runs["a"]), str(runs["b"]), "--out", str(out),
                     "--snapshots", str(snapshots)])
    printed = capsys.readouterr().out
    assert rc == merge.EXIT_OK, printed
    _assert_same_run(out, runs["ab"])  # tables, inputs, ranking, τ, plots, conclusion

    # The claim family is the merged run's: adjusted p equal the single run's and differ from
    # the shards' (each shard adjusted over half the claims).
    merged = read_tables(out)
    key = lambda c: (c["hypothesis"], c["diff"], c["claim"])  # noqa: E731
    assert [(key(c), c["p_adj"], c["holds"], c["status"]) for c in merged.claims] == [
        (key(c), c["p_adj"], c["holds"], c["status"]) for c in single.claims]
    shard_p = {key(c): c["p_adj"] for s in ("a", "b") for c in read_tables(runs[s]).claims}
    assert len(shard_p) == len(merged.claims) > 0
    assert any(shard_p[key(c)] != c["p_adj"] for c in merged.claims)

    gate = json.loads((out / GATE_FILE).read_text())
    assert gate == {"status": "match", "failed": False, "snapshot": str(expected_gate.path),
                    "message": expected_gate.message}
    assert f"ranking gate (passed): {expected_gate.message}" in printed
    assert "write/mixed" in printed and "Kendall τ between seed rankings: w0~w1" in printed
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["diffs"] == ["w0", "w1"]
    assert [r["diffs"] for r in provenance["runs"]] == [["w0"], ["w1"]]
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {f"{runs['a']}/main", f"{runs['b']}/main"}


def test_shard_order_only_orders_the_diffs_of_inputs(runs: dict[str, Path], tmp_path: Path) -> None:
    outcome = merge_runs([runs["b"], runs["a"]], tmp_path / "ba")
    assert [d["name"] for d in outcome.results.inputs["diff"]["diffs"]] == ["w1", "w0"]
    for name in SAME_BYTES:
        # inputs.json, the conclusion's first paragraph and the plots list the diffs in order
        if name not in ("inputs.json", "conclusion.md") and not name.endswith(".png"):
            assert (tmp_path / "ba" / name).read_bytes() == (runs["ab"] / name).read_bytes(), name
    assert outcome.gate is None  # no snapshot folder: no gate


def test_a_diff_identical_in_both_runs_is_counted_once(runs: dict[str, Path],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "merged"
    outcome = merge_runs([runs["ab"], runs["b"]], out)
    assert any("diff 'w1' is in" in n and "identical results: counted once" in n
               for n in outcome.notes)
    _assert_same_run(out, runs["ab"])


@pytest.mark.parametrize(("edit", "expected"), [
    (set_at("inputs.rank", 3), "rank differs: {a} has 4, {b} has 3."),
    (set_at("inputs.model.fingerprint", "0" * 64), "model.fingerprint differs: {a} has \"*"),
    (set_at("inputs.behaviour.name", "flattery"),
     "behaviour.name differs: {a} has \"sycophancy\", {b} has \"flattery\"."),
    (set_at("inputs.diff.mode", "build"), "diff.mode differs: {a} has \"files\", {b} has \"build\"."),
    (set_at("inputs.settings.measure", "all"),
     "settings.measure differs: {a} has \"top\", {b} has \"all\"."),
    (lambda data: data["inputs"].pop("settings"),
     "settings.harness_code differs: {a} has \"*\", {b} has (not recorded)*"),
    (set_at("hypotheses.my_write.refuted", {}),
     "hypothesis 'my_write' refuted differs: {a} has {\"r_act\": null, *}, {b} has {}."),
    (lambda data: data["hypotheses"].pop("lm_head_read"),
     "the hypothesis catalog differs: {a} has {\"only here\": [\"lm_head_read\"]}, "
     "{b} has {\"only here\": []}."),
])
def test_mismatched_runs_are_refused_naming_the_key_and_both_values(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    edit: Any, expected: str,
) -> None:
    odd = copy_run(runs["b"], tmp_path / "odd", edit)
    out = tmp_path / "merged"
    rc = main_merge([str(runs["a"]), str(odd), "--out", str(out), "--no-gate"])
    err = capsys.readouterr().err
    assert rc == merge.EXIT_REFUSED
    assert f"ws-harness merge: cannot merge {odd} with {runs['a']}: " in err
    assert _glob(expected.replace("{a}", str(runs["a"])).replace("{b}", str(odd)), err), err
    assert "rerun the odd one with the others' configuration" in err
    assert not out.exists()  # nothing written


def _glob(pattern: str, text: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(text, "*" + pattern.replace("[", "[[]") + "*")  # '[' is literal


def test_a_diff_in_two_runs_with_other_results_is_refused(runs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    def nudge(data: dict[str, Any]) -> None:
        data["summaries"][0]["r_act"] *= 1.0000001

    odd = copy_run(runs["b"], tmp_path / "odd", nudge)
    with pytest.raises(MergeError, match=r"diff 'w1' is in both .* with different results"):
        merge_runs([runs["ab"], odd], tmp_path / "merged")


def test_one_diff_under_two_names_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    def rename(data: dict[str, Any]) -> None:
        for part in ("rows", "summaries", "claims"):
            for record in data[part]:
                record["diff"] = "w0_copy"
        data["inputs"]["diff"]["diffs"][0]["name"] = "w0_copy"

    odd = copy_run(runs["a"], tmp_path / "odd", rename)
    with pytest.raises(MergeError, match=r"diff 'w0' and .*'s diff 'w0_copy' are the same "
                                         r"tensors .*count one diff twice"):
        merge_runs([runs["a"], odd], tmp_path / "merged")


def test_missing_empty_and_self_targets_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="results.json not found"):
        load_run(tmp_path / "nowhere")
    empty = copy_run(runs["a"], tmp_path / "empty", lambda d: d.update(summaries=[]))
    with pytest.raises(MergeError, match="holds no scores"):
        load_run(empty)
    with pytest.raises(MergeError, match="is one of the runs being merged"):
        merge_runs([runs["a"], runs["b"]], runs["b"])
    with pytest.raises(MergeError, match="nothing to merge"):
        check_compatible([])


def test_informational_differences_are_noted_not_refused(runs: dict[str, Path]) -> None:
    a, b = load_run(runs["a"]), load_run(runs["b"])
    b.results.inputs["model"]["source"] = "/elsewhere/model"
    b.results.hypotheses["my_write"]["file"] = "/elsewhere/test_my_write.py"
    merged, notes = merge_results([a, b])
    assert any(n.startswith("model.source differs") for n in notes)
    assert merged.inputs["model"]["source"] == a.results.inputs["model"]["source"]


def test_claims_are_adjusted_over_the_merged_family() -> None:
    """BH over the union, holds and status re-derived (a synthetic pair of shards)."""
    def shard(diff: str, p: float) -> Shard:
        claim = {"hypothesis": "h", "diff": diff, "seed": None, "family": "f",
                 "axis_kind": "mixed", "claim": "r_act", "value": 2.0, "z": 3.0, "p": p,
                 "p_adj": p, "holds": True, "expected_refuted": False, "status": "held"}
        summary = {k: claim[k] for k in ("hypothesis", "diff", "seed", "family", "axis_kind")}
        inputs = {"model": {"spec": "m"}, "rank": 4,
                  "diff": {"mode": "files", "diffs": [{"name": diff, "fingerprint": diff * 8}]}}
        return Shard(Path(diff), RunResults(summaries=[{**summary, "r_act": 2.0}],
                                            claims=[claim], inputs=inputs))

    merged, notes = merge_results([shard("x", 0.009), shard("y", 0.0095)])
    assert [c["p_adj"] for c in merged.claims] == [0.0095, 0.0095]  # min(p·2/1, p·2/2)
    merged, notes = merge_results([shard("x", 0.009), shard("y", 0.5)])
    assert [(c["p_adj"], c["holds"], c["status"]) for c in merged.claims] == [
        (0.018, False, "surprise"), (0.5, False, "surprise")]
    assert any("2 claim verdicts differ from their shard's" in n for n in notes)


def test_record_settings_names_what_decides_the_numbers(tiny: HarnessSession) -> None:
    board = Scoreboard(tiny)
    settings = record_settings(board)
    assert settings["measure"] == tiny.config.measure
    assert set(settings) == {"measure", "metrics", "harness_code", "hypothesis_code"}
    assert len(settings["harness_code"]) == 16 and settings["hypothesis_code"] == {}
    assert json.loads(json.dumps(settings)) == settings  # fits inputs.json
