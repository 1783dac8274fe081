"""End-of-run reports (SPEC §7) and `ws-harness report [OUT]`, on a small synthetic run
(with causal retention, SPEC §4.1, and an old run without it)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from ws_harness import schema
from ws_harness.report import conclusion_md, definitions_md, main, write_reports
from ws_harness.results import RunResults, write_tables

PNG = b"\x89PNG\r\n\x1a\n"
K, D = 4, 64  # rank k and d_model: a random subspace has c_lin = k/d
NULL_C = K / D

# name: (axis, family, [(R_act, R_w_combined, R_causal) per seed]); read: R_causal_read
SCORES = {
    "leader": ("mixed", "act:persona", [(8.0, 3.0, 3.0), (9.0, 3.2, 3.2), (10.0, 2.8, 2.8)]),
    "writer": ("write", "W:write", [(6.0, 0.95, 5.0), (6.5, 0.9, 5.2), (7.0, 0.97, 4.8)]),
    # beats 1 on both geometric axes by its medians, but its R_w claim fails on seed2
    "borderline": ("mixed", "act:cluster", [(3.0, 3.5, 2.0), (3.2, 3.6, 2.1), (2.8, 1.3, 1.9)]),
    "flat": ("mixed", "act:baseline", [(1.0, 1.0, 1.0), (1.1, 0.9, 0.9), (0.9, 1.1, 1.1)]),
    "reader": ("read", "W:read", [(2.0, 5.0, 2.0), (2.1, 5.0, 2.2), (1.9, 5.0, 1.8)]),
    "act_oracle": ("ceiling", "ceiling", [(18.0, 4.0, 4.0)] * 3),
    "w_oracle": ("ceiling", "ceiling", [(12.0, 16.4, 8.0)] * 3),
    "causal_oracle": ("ceiling", "ceiling", [(6.0, 2.0, 12.0)] * 3),
}
# measured c_keep per seed (None: not measured on that diff); flat and reader never measured
KEEPS = {
    "writer": (0.05, 0.20, 0.06),  # c_lin 0.31: the linear prediction's big miss
    "leader": (0.20, 0.22, 0.18),
    "borderline": (0.15, None, None),
    "act_oracle": (0.30, 0.32, 0.28),
    "w_oracle": (0.40, 0.45, 0.30),
    "causal_oracle": (0.70, 0.72, 0.68),
}
RANDOM = [0.02, 0.03, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10]  # + 0.005·seed, per diff
N_LAYERS, TOUCHED = 6, {2, 3, 4}
CAUSAL_COLUMNS = {c for m in schema.metrics() if m.kind in ("linear", "measured")
                  for c in m.summary_columns()}


def _causal_columns(name: str, axis: str, i: int, r_causal: float) -> dict[str, float]:
    nan = math.nan
    read = axis == "read"
    out = {"r_causal": nan if read else r_causal, "c_lin": nan if read else r_causal * NULL_C,
           "z_causal": nan if read else 4.0, "p_causal": nan if read else 1e-4,
           "pct_oracle_causal": nan if read else r_causal / 12.0,
           "r_causal_read": r_causal if read else nan,
           "c_lin_read": r_causal * NULL_C if read else nan,
           "z_causal_read": 3.0 if read else nan, "p_causal_read": 1e-3 if read else nan,
           "pct_oracle_causal_read": nan}
    keep = KEEPS.get(name, (None,) * 3)[i]
    if keep is not None:  # measured on this diff
        out.update({"c_keep": keep, "c_keep_lo": keep - 0.03, "c_keep_hi": keep + 0.03,
                    "c_drop": 1 - keep, "c_drop_lo": 0.96 - keep, "c_drop_hi": 1.04 - keep,
                    "c_keep_norm": keep * 1.1,
                    "keep_percentile": sum(r + 0.005 * i <= keep for r in RANDOM) / len(RANDOM)})
    return out


def synthetic_run() -> RunResults:
    summaries, rows, claims, hypotheses = [], [], [], {}
    for name, (axis, family, per_seed) in SCORES.items():
        hypotheses[name] = {
            "family": family, "axis_kind": axis, "scope": "per_layer",
            "definition": f"{name}: a synthetic hypothesis for the report test.\n\nSecond line.",
            "module": f"test_{name}", "oracle_of": None,
            "refuted": {"r_w_combined": None} if name == "writer" else {},
        }
        for i, (r_act, r_w, r_causal) in enumerate(per_seed):
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
                **_causal_columns(name, axis, i, r_causal),
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
                for claim in [c for c in ("r_causal", "r_causal_read", "r_act", "r_w_combined")
                              if c in schema.claims_for(axis)]:
                    value = {"r_act": r_act, "r_w_combined": r_w}.get(claim, r_causal)
                    holds = value > 1.5
                    recorded = name == "writer" and claim == "r_w_combined"
                    claims.append({
                        "hypothesis": name, "diff": seed, "seed": i, "claim": claim,
                        "value": value, "z": 2.0, "p": 0.001, "p_adj": 0.002 if holds else 0.5,
                        "holds": holds, "expected_refuted": recorded,
                        "status": schema.classify(holds, recorded),
                    })
    diffs = []
    for i in range(3):
        s_w = 2.0 + 0.1 * i
        diffs.append({
            "name": f"seed{i}", "seed": i, "fingerprint": f"{i}" * 64, "source": "built:scripted",
            "causal": {"random": [r + 0.005 * i for r in RANDOM], "s_w": s_w,
                       "s_write": 0.8 * s_w, "write_share": 0.8, "s_linear": s_w + 0.02,
                       "s_measured": s_w, "quadrature_error": 0.02,
                       "measured": sorted(n for n, keeps in KEEPS.items() if keeps[i] is not None)},
        })
    inputs = {
        "model": {"spec": "random:tiny", "fingerprint": "ab" * 32},
        "diff": {"mode": "build", "diffs": diffs},
        "rank": K, "d_model": D,
        "behaviour": {"name": "sycophancy", "source": "ws_harness/behaviours/x.json",
                      "fingerprint": "cd" * 32},
    }
    return RunResults(rows=rows, summaries=summaries, claims=claims, hypotheses=hypotheses,
                      errors={"broken": "hypothesis 'broken': builder raised RuntimeError"},
                      inputs=inputs)


def old_run() -> RunResults:
    """The synthetic run as a results.json from before SPEC §4.1: no causal columns at all."""
    run = synthetic_run()
    run.summaries = [{k: v for k, v in s.items() if k not in CAUSAL_COLUMNS}
                     for s in run.summaries]
    run.claims = [c for c in run.claims if c["claim"] not in CAUSAL_COLUMNS]
    run.inputs.pop("d_model")
    for d in run.inputs["diff"]["diffs"]:
        d.pop("causal")
    return run


def measured_rows() -> list[tuple[str, str, float, float]]:
    """(diff, hypothesis, c_lin, c_keep) of every measured row, straight from the synthetic run."""
    return [(s["diff"], s["hypothesis"], s["c_lin"], s["c_keep"])
            for s in synthetic_run().summaries if "c_keep" in s]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_reports(synthetic_run(), tmp_path_factory.mktemp("out"))


def test_every_report_is_written(reports: dict[str, Path]) -> None:
    assert set(reports) == {"ranking", "ranking_per_seed", "kendall_tau", "joint_scatter",
                            "retention_agreement", "layer_heatmap", "definitions", "conclusion"}
    for name in ("joint_scatter", "retention_agreement", "layer_heatmap"):
        data = reports[name].read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000, name
    assert reports["retention_agreement"].name == "retention_agreement.png"
    ranking = pl.read_parquet(reports["ranking"].with_suffix(".parquet"))
    # write/mixed ranked by R_causal
    assert ranking["hypothesis"].to_list()[:4] == ["writer", "leader", "borderline", "flat"]
    assert pl.read_csv(reports["ranking"])["rank_median"].to_list()[:4] == [1.0, 2.0, 3.0, 4.0]
    taus = pl.read_csv(reports["kendall_tau"])
    assert set(taus["table"]) == {"write/mixed"} and taus.height == 3  # one read: no τ


def _figure(monkeypatch: pytest.MonkeyPatch, plot: Any, *args: Any) -> Any:
    """Run a plot function and return its figure before it is closed."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    plot(*args)
    (fig,) = figures
    return fig


def _axes(fig: Any) -> dict[str, Any]:
    return {ax.get_gid(): ax for ax in fig.axes if ax.get_gid()}


def _texts(ax: Any) -> set[str]:
    return {t.get_text() for t in ax.texts}


def test_scatter_leads_with_causal_retention(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """Causal panel first (measured c_keep vs c_lin, random band, y = x, oracles starred,
    unmeasured on the strip), then the two log-log geometric panels with null lines at 1."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection

    from ws_harness import report

    fig = _figure(monkeypatch, report.scatter_plot, synthetic_run(), tmp_path / "s.png")
    try:
        axes = _axes(fig)
        assert list(axes) == ["causal", "unmeasured", "geometric", "read"]
        assert fig.axes[0] is axes["causal"]
        causal, strip = axes["causal"], axes["unmeasured"]
        # symlog: the data span > SYMLOG_SPAN × k/d (linear within ±k/d, log beyond)
        assert causal.get_xscale() == causal.get_yscale() == "symlog"
        assert "c_keep" in causal.get_ylabel()
        assert {"leader", "writer", "causal_oracle", "act_oracle", "w_oracle",
                "borderline (measured on 1/3 diffs)"} == _texts(causal)
        assert _texts(strip) == {"flat"}  # c_lin alone: not measured
        markers = [c for c in causal.collections if isinstance(c, PathCollection)]
        assert sum(c.get_sizes()[0] > 100 for c in markers) == 3  # three measured ceilings
        (flat,) = [c for c in strip.collections if isinstance(c, PathCollection)]
        assert flat.get_offsets()[0][0] == pytest.approx(1.0 * NULL_C)  # median c_lin
        legend = [t.get_text() for t in causal.get_legend().get_texts()]
        pooled = sorted(r + 0.005 * i for i in range(3) for r in RANDOM)
        assert "random subspaces: c_keep range (24 draws, 3 diffs)" in legend
        assert f"random subspaces: median c_keep {statistics.median(pooled):.3f}" in legend
        assert "c_keep = c_lin (the linear prediction)" in legend
        (band,) = [p for p in causal.patches if p.get_label().startswith("random subspaces")]
        corners = band.get_transform().transform(band.get_path().vertices)
        ys = causal.transData.inverted().transform(corners)[:, 1]
        assert (ys.min(), ys.max()) == pytest.approx((min(pooled), max(pooled)))
        geometric, read = axes["geometric"], axes["read"]
        for ax in (geometric, read):
            assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
            lines = {(tuple(l.get_xdata()), tuple(l.get_ydata())) for l in ax.get_lines()}
            assert ((1, 1), (0, 1)) in lines and ((0, 1), (1, 1)) in lines  # null lines at 1
        assert {"leader", "act_oracle", "w_oracle", "causal_oracle"} <= _texts(geometric)
        assert "reader" not in _texts(geometric) and _texts(read) == {"reader"}
        markers = [c for c in geometric.collections if isinstance(c, PathCollection)]
        assert sum(c.get_sizes()[0] > 100 for c in markers) == 3 and len(markers) == 7
    finally:
        plt.close(fig)


def test_retention_agreement_numbers_and_plot(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    from scipy.stats import spearmanr

    from ws_harness import report

    rows = measured_rows()
    rho = spearmanr([r[2] for r in rows], [r[3] for r in rows]).statistic
    got = report.retention_agreement(synthetic_run())
    assert got["n"] == len(rows) == 16 and got["spearman"] == pytest.approx(rho)
    hyps = [r for r in rows if not r[1].endswith("oracle")]
    assert got["n_hypotheses"] == 7
    assert got["spearman_hypotheses"] == pytest.approx(
        spearmanr([r[2] for r in hyps], [r[3] for r in hyps]).statistic)
    worst = sorted(rows, key=lambda r: -abs(r[3] - r[2]))[:3]
    assert [(m["diff"], m["hypothesis"]) for m in got["misses"]] == [r[:2] for r in worst]
    assert worst[0][:2] == ("seed0", "writer")

    fig = _figure(monkeypatch, report.retention_agreement_plot, synthetic_run(),
                  tmp_path / "a.png")
    try:
        (ax,) = fig.axes
        assert f"Spearman ρ = {rho:.2f} over n = 16" in ax.get_title()
        assert {f"{h} ({d}): {k - c:+.3f}" for d, h, c, k in worst} == _texts(ax)
        lines = {(tuple(l.get_xdata()), tuple(l.get_ydata())) for l in ax.get_lines()}
        lo, hi = ax.get_xlim()
        assert ((lo, hi), (lo, hi)) in lines  # y = x
    finally:
        plt.close(fig)
    assert (tmp_path / "a.png").read_bytes().startswith(PNG)


def test_conclusion_leads_with_causal_retention(reports: dict[str, Path]) -> None:
    from scipy.stats import spearmanr

    text = reports["conclusion"].read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[:3] == ["## Causal retention", "## Leaders (geometry: R_act, R_w_combined)",
                            "## Claims"]
    causal = text[text.index("## Causal retention"):text.index("## Leaders")]
    # leaders by R_causal, with c_lin, z, the claim's held count and measured CIs
    assert ("1. **writer** (W:write): R_causal 5.00 (IQR 0.20), c_lin 0.312, z 4.0; R_causal > 1 "
            "held on every diff (3/3); measured on 3/3 diffs: c_keep 0.060 (0.030–0.090), "
            "c_drop 0.940 (0.900–0.980)") in causal
    assert "3. **borderline** (act:cluster): R_causal 2.00" in causal
    assert "measured on 1/3 diffs: c_keep 0.150 (0.120–0.180)" in causal
    assert "3 of 4 write/mixed hypotheses have their R_causal > 1 claim held on every diff" in causal
    assert "1. **reader** (W:read): R_causal_read 2.00 (IQR 0.20), c_lin_read 0.125" in causal
    assert "| writer | 3 | 0.312 | 0.060 (0.030–0.090) | 0.940 (0.900–0.980) |" in causal
    assert "| flat |" not in causal  # not measured
    pooled = sorted(r + 0.005 * i for i in range(3) for r in RANDOM)
    assert (f"24 draws pooled over 3 diffs: median {statistics.median(pooled):.3f}, range "
            f"{min(pooled):.3f}–{max(pooled):.3f}") in causal
    assert "causal_oracle c_lin 0.750, c_keep 0.700 (0.670–0.730)" in causal
    assert "| seed1 | 2.100 | 1.680 | 0.80 | 2.120 | 0.02 (1.0% of S(w)) |" in causal
    rows = measured_rows()
    rho = spearmanr([r[2] for r in rows], [r[3] for r in rows]).statistic
    assert f"Spearman ρ = {rho:.2f}" in causal and "over n = 16 measured" in causal
    d, h, c, k = max(rows, key=lambda r: abs(r[3] - r[2]))
    assert f"Largest misses |c_keep − c_lin|: {h} on {d} (c_lin {c:.3f}, c_keep {k:.3f}" in causal


def test_conclusion_counts_held_claims_not_point_estimates(reports: dict[str, Path]) -> None:
    """borderline's medians beat 1 on both axes, but its R_w claim fails on seed2: the count is
    of claims held on every diff, and each axis's leader says whether its claim held."""
    text = reports["conclusion"].read_text()
    assert ("1 of 4 write/mixed hypotheses have both their R_act > 1 and R_w_combined > 1 claims "
            "held (one-sided p < 0.01 after Benjamini–Hochberg) on every diff: leader. By point "
            "estimates alone (median R_act > 1 and R_w_combined > 1) 2 would") in text
    assert "beat the null on both axes" not in text
    assert ("by R_causal: **writer** (5.00; R_causal > 1 held on every diff (3/3)); by R_act: "
            "**leader** (9.00; R_act > 1 held on every diff (3/3)); by R_w_combined: "
            "**borderline** (3.50; R_w_combined > 1 held on only 2/3 diffs (not recorded)); "
            "by joint: **leader** (5.29; joint makes no claim;") in text
    # geometric leaders ranked by joint, with their claims
    assert "1. **leader** (act:persona): joint 5.29 (IQR 0.23)" in text
    assert "R_act 9.00" in text and "bootstrap 95% CI 8.10–9.90" in text
    assert ("3. **writer** (W:write): joint 2.42" in text
            and "R_w_combined > 1 refuted on every diff (0/3; a recorded finding)" in text)


def test_conclusion_has_the_numbers(reports: dict[str, Path]) -> None:
    text = reports["conclusion"].read_text()
    assert "random:tiny" in text and "rank k = 4" in text
    assert "**reader** (W:read): R_act 2.00" in text  # read side apart, by R_act
    assert "act_oracle R_act 18.00" in text and "w_oracle R_act 12.00, R_w_combined 16.40" in text
    # claims per seed: leader 3, writer 2 (R_w recorded refuted), borderline 3 (R_w fails on
    # seed2), flat 0 of 3, reader 2
    assert "over all 42 claims of the run: **29 held**, 3 failed as recorded findings, " \
           "10 failed unexpectedly" in text
    assert ("| writer | 3/3 (R 5.00, p_BH 0.002) | — | 3/3 (R 6.50, p_BH 0.002) | 0/3 (R 0.95, "
            "p_BH 0.5) recorded refuted |") in text
    assert "Hypotheses whose every claim holds on every seed: leader, reader." in text
    assert "- write/mixed: Kendall τ between seed rankings seed0~seed1 1.00" in text
    assert "- read: Kendall τ needs at least two hypotheses; 1 of 1 stable" in text
    assert "broken: hypothesis 'broken': builder raised RuntimeError" in text


def test_old_results_without_causal_columns_still_report(tmp_path: Path) -> None:
    from ws_harness import report

    run = old_run()
    written = write_reports(run, tmp_path)
    assert "retention_agreement" not in written
    assert not (tmp_path / "retention_agreement.png").exists()
    for name in ("joint_scatter", "layer_heatmap"):
        assert written[name].read_bytes().startswith(PNG), name
    text = written["conclusion"].read_text()
    assert "No causal scores in this run" in text
    assert "1. **leader** (act:persona): joint 5.29 (IQR 0.23)" in text
    assert "1 of 4 write/mixed hypotheses have both their R_act > 1" in text
    got = report.retention_agreement(run)
    assert got["n"] == 0 and math.isnan(got["spearman"]) and got["misses"] == []
    report.retention_agreement_plot(run, tmp_path / "empty.png")  # says so, does not raise
    # measured retention absent but c_lin present (measure = none): no agreement, no KeyError
    linear_only = synthetic_run()
    measured = {c for m in schema.measured_metrics() for c in m.summary_columns()}
    linear_only.summaries = [{k: v for k, v in s.items() if k not in measured}
                             for s in linear_only.summaries]
    for d in linear_only.inputs["diff"]["diffs"]:
        d["causal"] = {"s_linear": 2.0, "s_measured": 1.9}
    text = conclusion_md(linear_only)
    assert "1. **writer** (W:write): R_causal 5.00" in text and "not measured" in text
    assert "No hypothesis was measured in this run" in text
    assert "| seed0 | 1.900 | n/a | n/a | 2.000 | 0.1 (5.3% of S(w)) | n/a | 0 |" in text


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
    assert "--- write/mixed (median over 3 seeds; rank by R_causal) ---" in out
    assert "reports written to" in out and "joint_scatter.png" in out
    for name in ("conclusion.md", "definitions.md", "joint_scatter.png", "layer_heatmap.png",
                 "retention_agreement.png", "ranking.csv"):
        assert (tmp_path / name).is_file(), name


def test_cli_explains_a_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "results.json not found; run the sweep first" in capsys.readouterr().err


def test_plots_are_redrawn_only_when_what_they_show_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import copy

    from ws_harness import report

    results = synthetic_run()
    report.write_reports(results, tmp_path)
    first = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    assert len(first) >= 2

    drawn: list[str] = []
    for name in ("scatter_plot", "retention_agreement_plot", "layer_heatmap"):
        real = getattr(report, name)
        monkeypatch.setattr(report, name, lambda *a, _real=real, _n=name, **k: (
            drawn.append(_n), _real(*a, **k))[1])
    # Same results (timings differ: they are not plotted): nothing is drawn, the files stay.
    rerun = copy.deepcopy(results)
    rerun.timings = {"main": {"scores": 1.0}}
    report.write_reports(rerun, tmp_path)
    assert drawn == []
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == first
    # A PNG damaged since is drawn again, and only that one.
    (tmp_path / "layer_heatmap.png").write_bytes(b"not a png")
    report.write_reports(rerun, tmp_path)
    assert drawn == ["layer_heatmap"]
    assert (tmp_path / "layer_heatmap.png").read_bytes() == first["layer_heatmap.png"]
    # Changed results: every plot is drawn again.
    drawn.clear()
    changed = copy.deepcopy(results)
    changed.summaries[0] = {**changed.summaries[0], "r_act": 123.0}
    report.write_reports(changed, tmp_path)
    assert sorted(drawn) == sorted(["scatter_plot", "retention_agreement_plot", "layer_heatmap"])
