"""`ws-harness compare` (issue 12 item 3): two runs' rankings side by side, Kendall τ between them.

Two sweeps of the tiny random model with eight hypotheses (six write/mixed, two read), each
into its own --ws-out on the shared cache: ``two_seeds`` over two steering diffs with a little
noise through W_o and W_up, ``other_diff`` over a third with more noise (so the two runs rank
the hypotheses differently, as two adapter families would). Copies of them with an
edited results.json stand for runs of named families or of another configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
from run_folders import copy_run, set_at  # tests/run_folders.py
from scipy.stats import kendalltau

from ws_harness.cli import main
from ws_harness.compare import (
    EXIT_OK,
    EXIT_REFUSED,
    MARKDOWN_FILE,
    PLOT_FILE,
    RANKING_FILE,
    TAU_FILE,
    CompareError,
    compare_runs,
)
from ws_harness.session import HarnessSession

_MIXED = '''
"""{name}: {doc}"""
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import {helper}


@per_layer(family="{family}", axis="{axis}")
def basis(fit, layer):
    return {body}
'''
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
    "o_write": _MIXED.format(name="o_write", doc="top-k left singular vectors of W_o.",
                             helper="left_basis", family="W:write", axis="write",
                             body="left_basis(fit.weights(layer).o, fit.k)"),
    "down_write": _MIXED.format(name="down_write", doc="top-k left singular vectors of W_down.",
                                helper="left_basis", family="W:write", axis="write",
                                body="left_basis(fit.weights(layer).down, fit.k)"),
    "clean_pca": _MIXED.format(name="clean_pca", doc="PCA of the clean FIT residuals.",
                               helper="pca_basis", family="act:baseline", axis="mixed",
                               body="pca_basis(fit.clean.resid[layer], fit.k)"),
    "positive_pca": _MIXED.format(name="positive_pca", doc="PCA of the positive FIT residuals.",
                                  helper="pca_basis", family="act:persona", axis="mixed",
                                  body="pca_basis(fit.positive.resid[layer], fit.k)"),
    "taskdiff_pca": _MIXED.format(name="taskdiff_pca", doc="PCA of positive − negative residuals.",
                                  helper="pca_basis", family="act:persona", axis="mixed",
                                  body="pca_basis(fit.taskdiff[layer], fit.k)"),
    "lm_head_read": '''
"""lm_head_read: the top-k right singular vectors of the unembedding W_U (global; read side)."""
from ws_harness.hypothesis import global_basis
from ws_harness.linalg import right_basis


@global_basis(family="W:unembed", axis="read")
def basis(fit):
    return right_basis(fit.unembedding, fit.k)
''',
    "q_read": _MIXED.format(name="q_read", doc="top-k right singular vectors of W_q.",
                            helper="right_basis", family="W:read", axis="read",
                            body="right_basis(fit.weights(layer).q, fit.k)"),
}
RANKED = ("write/mixed", "read")


def _sweep(project: Path, out: str, diffs: list[Path], cache: Path) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WS_", "PYTEST_XDIST"))}
    # `--opt=value`: pytest takes separate path-like arguments into its rootdir search.
    cmd = [sys.executable, "-m", "pytest", "hypotheses", "-q", "-p", "no:cacheprovider",
           "--deselect", "ws_ranking", f"--ws-out={out}", f"--ws-cache-dir={cache}",
           "--ws-diff=" + ",".join(str(p) for p in diffs)]
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    # Claim items may pass or fail (findings); what is compared is what the run wrote.
    assert (project / out / "ranking.csv").is_file(), done.stdout[-4000:] + done.stderr[-2000:]
    return project / out


def _noisy_diff(session: HarnessSession, steering_diff: Callable[..., Any], scale: float,
                noise: float, seed: int) -> dict[str, torch.Tensor]:
    """A steering diff plus seeded noise through every W_o and W_up: the noise moves the
    write-side scores and, touching a read matrix, gives the read table its causal ranking."""
    diff = steering_diff(session, scale)
    generator = torch.Generator().manual_seed(seed)
    for layer in range(session.arch.n_layers):
        for role in ("o", "up"):
            shape = getattr(session.arch.layer(layer), role).shape
            diff[session.arch.param_name(layer, role)] = noise * torch.randn(shape, generator=generator)
    return diff


@pytest.fixture(scope="module")
def runs(tiny: HarnessSession, steering_diff: Callable[..., Any],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"two_seeds", "other_diff"}: the output folders of the two sweeps (module docstring)."""
    project = tmp_path_factory.mktemp("compare_project")
    (project / "conftest.py").write_text('pytest_plugins = ["ws_harness.plugin"]\n')
    (project / "pyproject.toml").write_text(textwrap.dedent("""
        [tool.ws_harness]
        model = "random:tiny"
        rank = 4
    """))
    (project / "hypotheses").mkdir()
    for name, source in HYPOTHESES.items():
        (project / "hypotheses" / f"test_{name}.py").write_text(source)
    files = {}
    for name, scale, noise, seed in (("w0", 0.5, 0.02, 1), ("w1", 0.8, 0.02, 2),
                                     ("w_other", 0.6, 0.03, 3)):
        files[name] = project / f"{name}.pt"
        torch.save(_noisy_diff(tiny, steering_diff, scale, noise, seed), files[name])
    cache = tiny.config.cache_dir
    return {"two_seeds": _sweep(project, "two_seeds", [files["w0"], files["w1"]], cache),
            "other_diff": _sweep(project, "other_diff", [files["w_other"]], cache)}


def _family(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["inputs"]["diff"]["adapter_family"] = name
    return edit


def _ranks(run: Path, table: str) -> dict[str, float]:
    """Hypothesis → median rank in `table`, as the run's own ranking.csv holds it."""
    frame = pl.read_csv(run / "ranking.csv").filter(
        (pl.col("table") == table) & pl.col("rank_median").is_not_null())
    return dict(zip(frame["hypothesis"], frame["rank_median"], strict=True))


def test_tau_between_runs_is_scipys_on_their_ranking_csvs(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = runs["two_seeds"], runs["other_diff"]
    out = tmp_path / "compare"
    rc = main(["compare", str(a), str(b), "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == EXIT_OK, printed.err
    taus = pl.read_csv(out / TAU_FILE, schema_overrides={"p_value": pl.Float64})
    # A table gets a τ where both runs ranked two hypotheses or more (on the tiny model the
    # read table's R_causal_read can be undefined: "no first-order steering" on the read side).
    shared = {t: sorted(set(_ranks(a, t)) & set(_ranks(b, t))) for t in RANKED}
    assert taus["table"].to_list() == [t for t in RANKED if len(shared[t]) >= 2]
    assert len(shared["write/mixed"]) == 6
    for row in taus.iter_rows(named=True):
        # Built from files, the runs have no adapter family: named by their folders.
        assert (row["run_a"], row["run_b"]) == ("two_seeds", "other_diff")
        ranks_a, ranks_b = _ranks(a, row["table"]), _ranks(b, row["table"])
        common = shared[row["table"]]
        expected = kendalltau([ranks_a[h] for h in common], [ranks_b[h] for h in common])
        assert row["n"] == len(common)
        assert row["tau"] == pytest.approx(expected.statistic, abs=1e-12)
        assert row["p_value"] == pytest.approx(expected.pvalue, abs=1e-12)
        assert f"{row['table']}: Kendall τ two_seeds~other_diff {row['tau']:.2f}" in printed.out
    # The fixture's runs do rank differently, so τ here pins more than "same input, τ = 1".
    assert taus.filter(pl.col("table") == "write/mixed")["tau"][0] < 1

    ranking = pl.read_csv(out / RANKING_FILE)
    for name, run in (("two_seeds", a), ("other_diff", b)):
        for table in RANKED:
            part = ranking.filter((pl.col("table") == table) & pl.col(f"rank_{name}").is_not_null())
            assert dict(zip(part["hypothesis"], part[f"rank_{name}"], strict=True)) == _ranks(run, table)
    assert set(ranking.filter(pl.col("table") == "write/mixed")["primary_score"]) == {"r_causal"}
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_against_itself_has_tau_one(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["two_seeds"]
    outcome = compare_runs([run, run], tmp_path / "self", names=["first", "again"])
    assert outcome.taus["table"].to_list() == list(RANKED)  # this run ranks both tables
    for table in RANKED:
        row = outcome.taus.filter(pl.col("table") == table).row(0, named=True)
        assert (row["run_a"], row["run_b"]) == ("first", "again")
        assert row["tau"] == pytest.approx(1.0)
        assert row["n"] == len(_ranks(run, table))
    markdown = (tmp_path / "self" / MARKDOWN_FILE).read_text()
    assert "| **first** | 1.00 | 1.00 |" in markdown


def _first_row(markdown: str, table: str) -> list[str]:
    """The cells of row 1 of the markdown's side-by-side top list of `table`."""
    section = markdown.split(f"## {table}: top 10 per run", 1)[1]
    line = next(line for line in section.splitlines() if line.startswith("| 1 |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_markdown_shows_each_runs_top_hypothesis(runs: dict[str, Path], tmp_path: Path) -> None:
    lora = copy_run(runs["two_seeds"], tmp_path / "out-lora", _family("lora"))
    ia3 = copy_run(runs["other_diff"], tmp_path / "out-ia3", _family("ia3"))
    outcome = compare_runs([lora, ia3], tmp_path / "compare")
    assert [r.name for r in outcome.runs] == ["lora", "ia3"]  # named by their adapter family
    markdown = (tmp_path / "compare" / MARKDOWN_FILE).read_text()
    assert "# Comparison of lora, ia3" in markdown
    assert "+1 is the same order, 0 orders that are unrelated, −1 the reverse order" in markdown
    for table in RANKED:
        firsts = _first_row(markdown, table)
        for cell, run in zip(firsts, (lora, ia3), strict=True):
            ranks = _ranks(run, table)
            if not ranks:  # a table this run did not rank: its column says so
                assert cell == "(none ranked)", (table, cell)
                continue
            top = min(sorted(ranks), key=ranks.__getitem__)
            assert cell.startswith(f"{top} (1, "), (table, cell)
    tau = outcome.taus.filter(pl.col("table") == "write/mixed")["tau"][0]
    assert f"| **lora** | 1.00 | {tau:.2f} |" in markdown
    assert {"rank_lora", "score_lora", "rank_ia3", "score_ia3"} <= set(outcome.ranking.columns)


@pytest.mark.parametrize(("edit", "expected"), [
    (set_at("inputs.rank", 3), "rank differs: {a} has 4, {b} has 3."),
    (set_at("inputs.model.fingerprint", "0" * 64), "model.fingerprint differs: {a} has \""),
    (set_at("inputs.model.spec", "random:qwen3-0.6b"),
     "model.spec differs: {a} has \"random:tiny\", {b} has \"random:qwen3-0.6b\"."),
    (set_at("inputs.behaviour.name", "flattery"),
     "behaviour.name differs: {a} has \"sycophancy\", {b} has \"flattery\"."),
])
def test_runs_of_another_model_behaviour_or_rank_are_refused(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    edit: Callable[[dict[str, Any]], None], expected: str,
) -> None:
    a = runs["two_seeds"]
    odd = copy_run(runs["other_diff"], tmp_path / "odd", edit)
    out = tmp_path / "compare"
    rc = main(["compare", str(a), str(odd), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == EXIT_REFUSED
    assert err.count("\n") == 1 and err.startswith(f"error: cannot compare {odd} with {a}: "), err
    assert expected.replace("{a}", str(a)).replace("{b}", str(odd)) in err, err
    assert not out.exists()  # nothing written


def test_repeated_or_miscounted_names_are_refused(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = str(runs["two_seeds"]), str(runs["other_diff"])
    out = tmp_path / "compare"
    assert main(["compare", a, b, "--out", str(out), "--names", "x,x"]) == EXIT_REFUSED
    assert "error: run name 'x' is given twice" in capsys.readouterr().err
    assert main(["compare", a, b, "--out", str(out), "--names", "x"]) == EXIT_REFUSED
    assert "--names gives 1 names (x) for 2 runs" in capsys.readouterr().err
    assert main(["compare", a, b, "--out", str(out), "--names", "x,a b"]) == EXIT_REFUSED
    assert "run name 'a b'" in capsys.readouterr().err
    # Two runs of one family need names of their own.
    first = copy_run(runs["two_seeds"], tmp_path / "first", _family("dora"))
    second = copy_run(runs["other_diff"], tmp_path / "second", _family("dora"))
    with pytest.raises(CompareError, match=r"run name 'dora' is given twice .* --names run1,run2"):
        compare_runs([first, second], out)
    assert not out.exists()
    assert main(["compare", str(first), str(second), "--out", str(out),
                 "--names", "dora_a,dora_b"]) == EXIT_OK


def test_missing_runs_and_self_targets_are_refused(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    a = str(runs["two_seeds"])
    assert main(["compare", a, str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == EXIT_REFUSED
    assert "results.json not found" in capsys.readouterr().err
    assert main(["compare", a, str(runs["other_diff"]), "--out", a]) == EXIT_REFUSED
    assert "is one of the runs being compared" in capsys.readouterr().err
    assert main(["compare", a, "--out", str(tmp_path / "c")]) == EXIT_REFUSED
    assert "at least two runs" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
