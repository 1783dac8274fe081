"""End-of-run reports (SPEC §7) and `ws-harness report [OUT]`, on a small synthetic run."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest

from ws_harness import schema
from ws_harness.report import conclusion_md, definitions_md, main, write_reports
from ws_harness.results import RunResults, write_tables

PNG = b"\x89PNG\r\n\x1a\n"

# name: (axis, family, [(R_act, R_w_combined) per seed])
SCORES = {
    "leader": ("mixed", "act:persona", [(8.0, 3.0), (9.0, 3.2), (10.0, 2.8)]),
    "writer": ("write", "W:write", [(6.0, 0.95), (6.5, 0.9), (7.0, 0.97)]),
    "flat": ("mixed", "act:baseline", [(1.0, 1.0), (1.1, 0.9), (0.9, 1.1)]),
    "reader": ("read", "W:read", [(2.0, 5.0), (2.1, 5.0), (1.9, 5.0)]),
    "act_oracle": ("ceiling", "ceiling", [(18.0, 4.0)] * 3),
    "w_oracle": ("ceiling", "ceiling", [(12.0, 16.4)] * 3),
}
N_LAYERS, TOUCHED = 6, {2, 3, 4}


def synthetic_run() -> RunResults:
    summaries, rows, claims, hypotheses = [], [], [], {}
    for name, (axis, family, per_seed) in SCORES.items():
        hypotheses[name] = {
            "family": family, "axis_kind": axis, "scope": "per_layer",
            "definition": f"{name}: a synthetic hypothesis for the report test.\n\nSecond line.",
            "module": f"test_{name}", "oracle_of": None,
            "refuted": {"r_w_combined": None} if name == "writer" else {},
        }
        for i, (r_act, r_w) in enumerate(per_seed):
            seed = f"seed{i}"  # the diff's name; its integer seed is i
            summaries.append({
                "diff": seed, "seed": i, "hypothesis": name, "family": family, "axis_kind": axis,
                "scope": "per_layer", "rank": 4.0, "n_layers": len(TOUCHED), "r_act": r_act,
                "z_act": 3.0, "p_act": 1e-3, "r_w_oproj": r_w, "r_w_downproj": r_w,
                "r_w_combined": r_w, "z_w_combined": 2.0, "p_w_combined": 1e-2,
                "pct_oracle_act": min(1.0, r_act / 18),
                "pct_oracle_w_combined": min(1.0, r_w / 16.4),
                "overlap_w": 0.2, "r_act_ci_lo": r_act * 0.9, "r_act_ci_hi": r_act * 1.1,
                "joint": math.sqrt(r_act * r_w), "act_w_gap_log2": math.log2(r_act / r_w),
            })
            for layer in range(N_LAYERS):
                rows.append({
                    "diff": seed, "seed": i, "hypothesis": name, "family": family,
                    "axis_kind": axis, "layer": layer, "touched": layer in TOUCHED, "rank": 4,
                    "r_act": r_act * (0.5 + layer / N_LAYERS),
                    "z_act": 1.0, "r_w_oproj": math.nan, "r_w_downproj": math.nan,
                    "r_w_combined": (r_w * (0.5 + layer / N_LAYERS) if layer in TOUCHED
                                     else math.nan),
                    "z_w_combined": 1.0, "pct_oracle_act": 0.1, "pct_oracle_w_combined": 0.1,
                    "overlap_w": 0.1,
                })
            if axis != "ceiling":
                for claim, value in (("r_act", r_act), ("r_w_combined", r_w)):
                    if claim == "r_w_combined" and axis == "read":
                        continue
                    holds = value > 1.5
                    recorded = name == "writer" and claim == "r_w_combined"
                    claims.append({
                        "hypothesis": name, "diff": seed, "seed": i, "claim": claim,
                        "value": value, "z": 2.0, "p": 0.001, "p_adj": 0.002 if holds else 0.5,
                        "holds": holds, "expected_refuted": recorded,
                        "status": schema.classify(holds, recorded),
                    })
    inputs = {
        "model": {"spec": "random:tiny", "fingerprint": "ab" * 32},
        "diff": {"mode": "build", "diffs": [
            {"name": f"seed{i}", "seed": i, "fingerprint": f"{i}" * 64, "source": "built:scripted"}
            for i in range(3)]},
        "rank": 4, "behaviour": {"name": "sycophancy", "source": "ws_harness/behaviours/x.json",
                                 "fingerprint": "cd" * 32},
    }
    return RunResults(rows=rows, summaries=summaries, claims=claims, hypotheses=hypotheses,
                      errors={"broken": "hypothesis 'broken': builder raised RuntimeError"},
                      inputs=inputs)


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_reports(synthetic_run(), tmp_path_factory.mktemp("out"))


def test_every_report_is_written(reports: dict[str, Path]) -> None:
    assert set(reports) == {"ranking", "ranking_per_seed", "kendall_tau", "joint_scatter",
                            "layer_heatmap", "definitions", "conclusion"}
    for name in ("joint_scatter", "layer_heatmap"):
        data = reports[name].read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000, name
    ranking = pl.read_parquet(reports["ranking"].with_suffix(".parquet"))
    assert ranking["hypothesis"].to_list()[:3] == ["leader", "writer", "flat"]
    assert pl.read_csv(reports["ranking"])["rank_median"].to_list()[:3] == [1.0, 2.0, 3.0]
    taus = pl.read_csv(reports["kendall_tau"])
    assert set(taus["table"]) == {"write/mixed"} and taus.height == 3  # one read: no τ


def test_plots_have_the_promised_panels_and_lines(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """Inspect the scatter's figure before it is closed: two log-log panels, null lines at 1,
    oracles starred on the write/mixed panel, the read-side hypothesis alone on the other."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection

    from ws_harness import report

    figures, real_close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    report.scatter_plot(synthetic_run(), tmp_path / "s.png")
    (fig,) = figures
    try:
        left, right = fig.axes[:2]
        for ax in (left, right):
            assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
            lines = {(tuple(l.get_xdata()), tuple(l.get_ydata())) for l in ax.get_lines()}
            assert ((1, 1), (0, 1)) in lines and ((0, 1), (1, 1)) in lines  # null lines at 1
        texts_left = {t.get_text() for t in left.texts}
        assert {"leader", "act_oracle", "w_oracle"} <= texts_left and "reader" not in texts_left
        assert {t.get_text() for t in right.texts} == {"reader"}
        markers = [c for c in left.collections if isinstance(c, PathCollection)]
        assert sum(c.get_sizes()[0] > 100 for c in markers) == 2  # the two ceilings, starred
        assert len(markers) == 5
    finally:
        real_close(fig)


def test_conclusion_has_the_numbers(reports: dict[str, Path]) -> None:
    text = reports["conclusion"].read_text()
    assert "random:tiny" in text and "rank k = 4" in text
    # the leader, with its medians, CI and rank range
    assert "1. **leader** (act:persona): joint 5.29 (IQR 0.23)" in text
    assert "R_act 9.00" in text and "bootstrap 95% CI 8.10–9.90" in text
    assert "**reader** (W:read): R_act 2.00" in text  # read side apart, by R_act
    assert "act_oracle R_act 18.00" in text and "w_oracle R_act 12.00, R_w_combined 16.40" in text
    # claims: 3 seeds × (leader 2 + writer 1 (R_act) + reader 1) hold; writer's R_w recorded
    assert "**12 held**, 3 failed as recorded findings, 6 failed unexpectedly" in text
    assert "| writer | 3/3 (R 6.50, p_BH 0.002) | 0/3 (R 0.95, p_BH 0.5) recorded refuted |" in text
    assert "Hypotheses whose every claim holds on every seed: leader, reader." in text
    assert "- write/mixed: Kendall τ between seed rankings seed0~seed1 1.00" in text
    assert "- read: Kendall τ needs at least two hypotheses; 1 of 1 stable" in text
    assert "broken: hypothesis 'broken': builder raised RuntimeError" in text


def test_definitions_come_from_the_docstrings(reports: dict[str, Path]) -> None:
    text = reports["definitions"].read_text()
    assert "### leader" in text and "leader: a synthetic hypothesis for the report test." in text
    assert text.index("## write/mixed") < text.index("## read") < text.index("## ceiling")
    assert "*recorded refuted* `{'r_w_combined': None}`" in text


def test_markdown_is_deterministic() -> None:
    run = synthetic_run()
    assert conclusion_md(run) == conclusion_md(synthetic_run())
    assert definitions_md(run) == definitions_md(synthetic_run())


def test_cli_regenerates_the_reports_from_the_tables(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    write_tables(synthetic_run(), tmp_path)
    assert not (tmp_path / "conclusion.md").exists()
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "--- write/mixed (median over 3 seeds; rank by joint) ---" in out
    assert "reports written to" in out and "joint_scatter.png" in out
    for name in ("conclusion.md", "definitions.md", "joint_scatter.png", "layer_heatmap.png",
                 "ranking.csv"):
        assert (tmp_path / name).is_file(), name


def test_cli_explains_a_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "results.json not found; run the sweep first" in capsys.readouterr().err
