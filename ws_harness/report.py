"""End-of-run reports (SPEC §7): ranking tables, the joint scatter, the per-layer heatmap,
hypothesis definitions and a short conclusion with the numbers.

:func:`write_reports` runs at the end of every sweep (the plugin calls it after the tables are
written) and from ``ws-harness report [OUT]`` (:func:`main`), which rebuilds everything from a
finished run's ``results.json``. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from ws_harness import schema
from ws_harness.ranking import (
    TABLES,
    aggregate,
    kendall_taus,
    per_seed,
    stable_rank_range,
    summary_lines,
)
from ws_harness.results import RunResults, read_tables

__all__ = ["write_reports", "main", "scatter_plot", "layer_heatmap", "definitions_md",
           "conclusion_md"]

TOP_LABELLED = 10  # write/mixed points labelled in the scatter (plus every read and ceiling)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ordered(table: pl.DataFrame) -> list[str]:
    return table["hypothesis"].to_list()


def _seed_ranges(results: RunResults) -> dict[str, dict[str, tuple[float, float]]]:
    frame = per_seed(results)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for (name,), group in frame.group_by(["hypothesis"]):
        out[name] = {}
        for col in schema.SCATTER_AXES:
            values = [v for v in group[col].to_list() if v is not None and math.isfinite(v)]
            if values:
                out[name][col] = (min(values), max(values))
    return out


# ---- the joint scatter ---------------------------------------------------------------------


def _marker(family: str) -> str:
    return "o" if family.startswith("W:") else "s" if family.startswith("act:") else "D"


def _place_labels(ax: Any, fig: Any, points: list[tuple[float, float, str, str]]) -> None:
    """Annotate points without overlapping each other: try offsets, keep the first free one."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = []
    offsets = [(5, 3), (5, -11), (-5, 3), (-5, -11), (5, 13), (5, -21), (-5, 13), (-5, -21),
               (12, 23), (12, -31), (-12, 23), (-12, -31), (20, 33), (20, -41)]
    for x, y, name, colour in points:
        best = None
        for dx, dy in offsets:
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points",
                               fontsize=7, color=colour, ha="left" if dx > 0 else "right",
                               zorder=4)
            box = text.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(other) for other in taken):
                best = (text, box, dx, dy)
                break
            text.remove()
        if best is None:  # crowded: put it at the last offset with a leader line
            dx, dy = offsets[-1]
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points",
                               fontsize=7, color=colour, zorder=4,
                               arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
            taken.append(text.get_window_extent(renderer))
            continue
        text, box, dx, dy = best
        if abs(dy) > 13:
            text.remove()
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points",
                               fontsize=7, color=colour, ha="left" if dx > 0 else "right",
                               zorder=4, arrowprops={"arrowstyle": "-", "color": "0.6",
                                                     "lw": 0.5})
        taken.append(box)


def _log_axes(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def scatter_plot(results: RunResults, path: Path) -> Path:
    """R_act vs R_w_combined (medians over seeds, bars = seed range), log-log, null lines at 1.

    Left panel: write/mixed hypotheses with the ceilings marked (stars) for scale; right panel:
    read-side hypotheses, whose R_w measures read/write overlap rather than recovery. The top
    write/mixed hypotheses, every read-side one and every ceiling are labelled.
    """
    plt = _pyplot()
    table = aggregate(results)
    ranges = _seed_ranges(results)
    families = sorted(set(table.filter(pl.col("table") != "ceiling")["family"].to_list()))
    cmap = plt.get_cmap("tab20")
    colour = {f: cmap(i % 20) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, 2, figsize=(15, 7.5), gridspec_kw={"width_ratios": [1.35, 1]})
    panels = [(axes[0], ("write/mixed", "ceiling"), "write/mixed hypotheses (ranked by joint); "
               "ceilings ★ for scale"),
              (axes[1], ("read",), "read-side hypotheses (ranked by R_act; R_w = read/write "
               "overlap)")]
    handles: dict[str, Any] = {}
    for ax, tables, title in panels:
        part = table.filter(pl.col("table").is_in(list(tables)))
        xs, ys, labels = [], [], []
        for rank_in_table, row in enumerate(part.iter_rows(named=True)):
            x, y = row["r_act_median"], row["r_w_combined_median"]
            if x is None or y is None or x <= 0 or y <= 0:
                continue
            xs.append(x)
            ys.append(y)
            name = row["hypothesis"]
            lo_x, hi_x = ranges.get(name, {}).get("r_act", (x, x))
            lo_y, hi_y = ranges.get(name, {}).get("r_w_combined", (y, y))
            ceiling = row["table"] == "ceiling"
            c = "black" if ceiling else colour[row["family"]]
            ax.errorbar(x, y, xerr=[[max(x - lo_x, 0)], [max(hi_x - x, 0)]],
                        yerr=[[max(y - lo_y, 0)], [max(hi_y - y, 0)]], fmt="none", ecolor=c,
                        alpha=0.5, lw=0.8, zorder=2)
            handle = ax.scatter([x], [y], s=150 if ceiling else 38,
                                marker="*" if ceiling else _marker(row["family"]), color=c,
                                edgecolor="black", linewidths=0.4, zorder=3 if ceiling else 3.5,
                                alpha=0.75 if ceiling else 1.0)
            if not ceiling:
                handles.setdefault(row["family"], handle)
            if ceiling or row["table"] == "read" or rank_in_table < TOP_LABELLED:
                labels.append((x, y, name, "black" if ceiling else "0.1"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        if xs:
            lo = min(min(xs), min(ys), 1.0) / 1.5
            hi = max(max(xs), max(ys), 1.0) * 1.8
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.plot([lo, hi], [lo, hi], ls=":", color="0.6", lw=0.8, zorder=1,
                    label="R_act = R_w")
        ax.axvline(1, ls="--", color="0.35", lw=0.9, zorder=1, label="null (R = 1)")
        ax.axhline(1, ls="--", color="0.35", lw=0.9, zorder=1)
        _log_axes(ax)
        ax.set_xlabel("R_act (activation recovery / null)")
        ax.set_ylabel("R_w_combined (weight recovery / null)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.25)
        if not xs:
            ax.text(0.5, 0.5, "none in this run", transform=ax.transAxes, ha="center")
        ax.legend(loc="lower right", fontsize=8)
        # Labels last, in ranking order, once the limits are fixed.
        ax._ws_labels = labels  # type: ignore[attr-defined]
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=min(6, max(1, len(handles))), fontsize=8, frameon=False,
               title="family (● weight-derived, ■ activation-derived, ◆ compound)",
               title_fontsize=8)
    inputs = results.inputs
    fig.suptitle(f"Joint recovery on {inputs.get('model', {}).get('spec', '?')}, k = "
                 f"{inputs.get('rank', '?')}: medians over {table['n_seeds'].max()} diff seeds "
                 "(bars: seed range)", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 0.96))
    for ax, _, _ in panels:
        _place_labels(ax, fig, ax._ws_labels)  # type: ignore[attr-defined]
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---- the per-layer heatmap -----------------------------------------------------------------


def layer_heatmap(results: RunResults, path: Path) -> Path:
    """log2 R per (hypothesis, layer) of each schema.heatmap_metrics(), medians over seeds."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    plt = _pyplot()
    table = aggregate(results)
    names = _ordered(table)
    rows = pl.DataFrame(results.rows, infer_schema_length=None)
    panels = [m.name for m in schema.heatmap_metrics() if m.name in rows.columns]
    for col in panels:
        rows = rows.with_columns(pl.col(col).cast(pl.Float64).fill_nan(None))
    med = rows.group_by(["hypothesis", "layer"]).agg(
        *[pl.col(col).median() for col in panels], pl.col("touched").any())
    n_layers = int(rows["layer"].max()) + 1
    touched = set(med.filter(pl.col("touched"))["layer"].to_list())
    grids = {}
    for col in panels:
        grid = np.full((len(names), n_layers), np.nan)
        index = {n: i for i, n in enumerate(names)}
        for r in med.iter_rows(named=True):
            v = r[col]
            if r["hypothesis"] in index and v is not None and v > 0:
                grid[index[r["hypothesis"]], r["layer"]] = math.log2(v)
        grids[col] = grid
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    span = float(min(max(np.abs(finite).max() if finite.size else 1.0, 1.0), 6.0))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    height = 1.8 + 0.2 * len(names)
    panel = max(3.2, 0.24 * n_layers)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 + len(panels) * panel, height),
                             sharey=True, layout="constrained", squeeze=False)
    axes = list(axes[0])
    tables = table["table"].to_list()
    for ax, col in zip(axes, panels, strict=True):
        image = ax.imshow(grids[col], aspect="auto", cmap=cmap, interpolation="nearest",
                          norm=TwoSlopeNorm(vmin=-span, vcenter=0.0, vmax=span))
        ax.set_title(f"log2 {schema.label(col)}", fontsize=10)
        ax.set_xticks(range(n_layers))
        ax.set_xticklabels([str(l) for l in range(n_layers)], fontsize=6)
        for l, tick in enumerate(ax.get_xticklabels()):
            if l not in touched:
                tick.set_color("0.6")
        ax.set_xlabel("layer", fontsize=8)
        for i in range(1, len(tables)):
            if tables[i] != tables[i - 1]:
                ax.axhline(i - 0.5, color="black", lw=1.2)
    axes[0].set_yticks(range(len(names)))
    axes[0].set_yticklabels([f"{n} [{t}]" if t != "write/mixed" else n
                             for n, t in zip(names, tables, strict=True)], fontsize=7)
    fig.colorbar(image, ax=axes, shrink=min(1.0, 8 / height),
                 label="log2 R (blue < null < red; grey: undefined)")
    fig.suptitle("Per-layer recovery (log2 R, 0 = null), medians over diff seeds; rows in "
                 "ranking order: write/mixed, read, ceilings\ngrey layer numbers: the diff does "
                 "not touch that layer (no R_w there, not in the summaries)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- markdown ------------------------------------------------------------------------------


def definitions_md(results: RunResults) -> str:
    """Every hypothesis's definition (its module docstring), grouped by table."""
    table = aggregate(results)
    order = _ordered(table) + sorted(set(results.hypotheses) - set(_ordered(table)))
    tables = dict(zip(table["hypothesis"], table["table"], strict=True))
    lines = ["# Hypothesis definitions", "",
             "From each hypothesis file's docstring. Axis kinds: write (built from what layers "
             "write), read (what layers read; ranked apart), mixed (activations, compounds), "
             "ceiling (uses the diff or its labels; shown for scale).", ""]
    current = None
    for name in order:
        meta = results.hypotheses.get(name, {})
        group = tables.get(name, "not scored")
        if group != current:
            lines += [f"## {group}", ""]
            current = group
        refuted = meta.get("refuted") or {}
        lines.append(f"### {name}")
        lines.append("")
        lines.append(f"*family* `{meta.get('family', '?')}` · *axis* `{meta.get('axis_kind', '?')}`"
                     f" · *scope* `{meta.get('scope', '?')}` · *module* `{meta.get('module', '?')}`"
                     + (f" · *recorded refuted* `{refuted}`" if refuted else ""))
        lines.append("")
        lines.append(str(meta.get("definition", "")).strip() or "(no docstring)")
        if name in results.errors:
            lines += ["", f"**Excluded from this run:** {results.errors[name]}"]
        lines.append("")
    return "\n".join(lines)


def _num(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _leader_line(i: int, row: dict[str, Any]) -> str:
    stable = {True: "stable", False: "unstable", None: "stability n/a"}[row["stable"]]
    head = (f"joint {_num(row['joint_median'])} (IQR {_num(row['joint_iqr'])}), "
            if row["table"] != "read" else "")
    return (f"{i}. **{row['hypothesis']}** ({row['family']}): {head}"
            f"R_act {_num(row['r_act_median'])} (IQR {_num(row['r_act_iqr'])}; bootstrap 95% CI "
            f"{_num(row['r_act_ci_lo'])}–{_num(row['r_act_ci_hi'])}), R_w_combined "
            f"{_num(row['r_w_combined_median'])} (IQR {_num(row['r_w_combined_iqr'])}), "
            f"pct_oracle act {_num(row['pct_oracle_act_median'])} / w "
            f"{_num(row['pct_oracle_w_combined_median'])}; rank "
            f"{_num(row['rank_min'], '.0f')}–{_num(row['rank_max'], '.0f')} over seeds ({stable})")


def conclusion_md(results: RunResults) -> str:
    """A short conclusion with the numbers: leaders, claims that held, stability across seeds."""
    table = aggregate(results)
    taus = kendall_taus(results)
    inputs = results.inputs
    n_seeds = int(table["n_seeds"].max()) if table.height else 0
    diffs = inputs.get("diff", {}).get("diffs", [])
    model = inputs.get("model", {})
    lines = ["# Conclusion", "",
             f"Model `{model.get('spec', '?')}` (weights {str(model.get('fingerprint', ''))[:12]}),"
             f" {len(diffs)} diff{'s' if len(diffs) != 1 else ''} "
             f"({inputs.get('diff', {}).get('mode', '?')}: "
             + ", ".join(f"{d['name']} {str(d.get('fingerprint', ''))[:8]}" for d in diffs)
             + f"), rank k = {inputs.get('rank', '?')}, behaviour "
             f"`{inputs.get('behaviour', {}).get('name', '?')}`. All numbers are medians over the "
             f"{n_seeds} diff seed{'s' if n_seeds != 1 else ''}; R = 1 is a random subspace.", ""]

    wm = table.filter(pl.col("table") == "write/mixed")
    read = table.filter(pl.col("table") == "read")
    ceil = table.filter(pl.col("table") == "ceiling")
    lines += ["## Leaders", ""]
    if wm.height:
        lines.append("Write/mixed hypotheses, ranked by joint = √(R_act · R_w_combined):")
        lines.append("")
        lines += [_leader_line(i + 1, r) for i, r in enumerate(wm.head(3).iter_rows(named=True))]
        lines.append("")
        both = wm.filter((pl.col("r_act_median") > 1) & (pl.col("r_w_combined_median") > 1))
        lines.append(f"{both.height} of {wm.height} write/mixed hypotheses beat the null on "
                     "both axes (median R_act > 1 and R_w_combined > 1).")
        gap = wm.filter(pl.col("act_w_gap_log2_median").is_not_null()).sort(
            pl.col("act_w_gap_log2_median").abs(), descending=True).head(1)
        for r in gap.iter_rows(named=True):
            lines.append(f"Largest gap between the axes: {r['hypothesis']} with log2(R_act/R_w) = "
                         f"{r['act_w_gap_log2_median']:+.2f} (R_act {_num(r['r_act_median'])}, "
                         f"R_w_combined {_num(r['r_w_combined_median'])}).")
        lines.append("")
    if read.height:
        lines.append("Read-side hypotheses, ranked by R_act (their R_w measures read/write "
                     "overlap, not recovery):")
        lines.append("")
        lines += [_leader_line(i + 1, r) for i, r in enumerate(read.head(3).iter_rows(named=True))]
        lines.append("")
    if ceil.height:
        lines.append("Ceilings, for scale (rank-k optima and the informative ceiling): "
                     + "; ".join(f"{r['hypothesis']} R_act {_num(r['r_act_median'])}, "
                                 f"R_w_combined {_num(r['r_w_combined_median'])}"
                                 for r in ceil.iter_rows(named=True)) + ".")
        if wm.height:
            top = wm.row(0, named=True)
            lines.append(f"The top write/mixed hypothesis, {top['hypothesis']}, reaches "
                         f"{_num(100 * (top['pct_oracle_act_median'] or math.nan), '.0f')}% of the "
                         "activation oracle's energy and "
                         f"{_num(100 * (top['pct_oracle_w_combined_median'] or math.nan), '.0f')}%"
                         " of the weight oracle's.")
        lines.append("")

    lines += ["## Claims", ""]
    claims = pl.DataFrame(results.claims, infer_schema_length=None) if results.claims else None
    if claims is None or claims.is_empty():
        lines += ["No claims were evaluated in this run.", ""]
    else:
        counts = {status: int((claims["status"] == status).sum())
                  for status in ("held", "refuted", "surprise", "stale")}
        held = counts["held"] + counts["stale"]
        lines.append(f"Each claim is R > 1 with one-sided p < {schema.ALPHA} after "
                     f"Benjamini–Hochberg over all {claims.height} claims of the run: "
                     f"**{held} held**, {counts['refuted']} failed as recorded findings, "
                     f"{counts['surprise']} failed unexpectedly, {counts['stale']} recorded "
                     "findings are stale (now hold).")
        lines.append("")
        per = claims.group_by(["hypothesis", "claim"]).agg(
            pl.col("holds").sum().alias("held"), pl.len().alias("n"),
            pl.col("expected_refuted").any().alias("recorded"),
            pl.col("value").median().alias("value"), pl.col("p_adj").median().alias("p_adj"))
        cells: dict[str, dict[str, str]] = {}
        for r in per.iter_rows(named=True):
            cells.setdefault(r["hypothesis"], {})[r["claim"]] = (
                f"{r['held']}/{r['n']} (R {_num(r['value'])}, p_BH {_num(r['p_adj'], '.2g')})"
                + (" recorded refuted" if r["recorded"] else ""))
        always = set(claims.group_by("hypothesis").agg(pl.col("holds").all())
                     .filter(pl.col("holds"))["hypothesis"].to_list())
        lines.append("Hypotheses whose every claim holds on every seed: "
                     + (", ".join(h for h in _ordered(table) if h in always) or "none") + ".")
        lines.append("")
        made = [m for m in schema.claim_metrics() if m.name in set(claims["claim"].to_list())]
        lines += ["| hypothesis | " + " | ".join(f"{m.label} > 1: held on seeds" for m in made)
                  + " |", "|---|" + "---|" * len(made)]
        for name in [h for h in _ordered(table) if h in cells]:
            c = cells[name]
            lines.append(f"| {name} | " + " | ".join(c.get(m.name, "—") for m in made) + " |")
        lines.append("")

    lines += ["## Stability across seeds", ""]
    if n_seeds < 2:
        lines += ["One diff seed: rank stability and Kendall τ need at least two.", ""]
    for name in TABLES[:2]:
        part_tau = taus.filter(pl.col("table") == name)
        part = table.filter((pl.col("table") == name) & pl.col("stable").is_not_null())
        if part.is_empty():
            continue
        if part_tau.is_empty():
            tau_text = "Kendall τ needs at least two hypotheses"
        else:
            pairs = ", ".join(f"{r['diff_a']}~{r['diff_b']} {_num(r['tau'])}"
                              for r in part_tau.iter_rows(named=True))
            tau_text = (f"Kendall τ between seed rankings {pairs} (median "
                        f"{_num(part_tau['tau'].median())})")
        unstable = part.filter(~pl.col("stable"))
        lines.append(f"- {name}: {tau_text}; {part.height - unstable.height} of {part.height} "
                     f"stable (rank range ≤ {stable_rank_range(part.height)})"
                     + ("; unstable: " + ", ".join(
                         f"{r['hypothesis']} (ranks {r['rank_min']:.0f}–{r['rank_max']:.0f})"
                         for r in unstable.iter_rows(named=True)) if unstable.height else "")
                     + ".")
    lines.append("")
    if results.errors:
        lines += ["## Excluded", ""]
        lines += [f"- {name}: {message}" for name, message in sorted(results.errors.items())]
        lines.append("")
    return "\n".join(lines)


# ---- everything ----------------------------------------------------------------------------


def write_reports(results: RunResults, out: Path) -> dict[str, Path]:
    """Write ranking tables, plots, definitions.md and conclusion.md into `out`; name → path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if results.empty:
        return written
    table = aggregate(results)
    table.write_csv(out / "ranking.csv")
    table.write_parquet(out / "ranking.parquet")
    written["ranking"] = out / "ranking.csv"
    seeds = per_seed(results)
    seeds.write_csv(out / "ranking_per_seed.csv")
    written["ranking_per_seed"] = out / "ranking_per_seed.csv"
    kendall_taus(results).write_csv(out / "kendall_tau.csv")
    written["kendall_tau"] = out / "kendall_tau.csv"
    written["joint_scatter"] = scatter_plot(results, out / "joint_scatter.png")
    if results.rows:
        written["layer_heatmap"] = layer_heatmap(results, out / "layer_heatmap.png")
    (out / "definitions.md").write_text(definitions_md(results), encoding="utf-8")
    written["definitions"] = out / "definitions.md"
    (out / "conclusion.md").write_text(conclusion_md(results), encoding="utf-8")
    written["conclusion"] = out / "conclusion.md"
    return written


def _default_out() -> Path:
    try:
        from ws_harness.config import resolve_config

        return Path(resolve_config(Path.cwd(), {}).out)
    except Exception:  # noqa: BLE001 - no usable configuration here: the documented default
        return Path("ws-out")


def main(argv: Sequence[str] | None = None) -> int:
    """`ws-harness report [OUT]`: regenerate the reports from a finished run's tables."""
    parser = argparse.ArgumentParser(
        prog="ws-harness report",
        description="Regenerate the ranking tables, plots, definitions and conclusion from a "
                    "finished run's results (OUT/results.json).")
    parser.add_argument("out", nargs="?", type=Path, default=None,
                        help="the run's output folder (default: --ws-out's default, "
                             "[tool.ws_harness] out / WS_OUT, else ws-out)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    out = args.out if args.out is not None else _default_out()
    try:
        results = read_tables(out)
    except FileNotFoundError as exc:
        print(f"ws-harness report: {exc}", file=sys.stderr)
        return 2
    if results.empty:
        print(f"ws-harness report: {out} holds no scores "
              f"({results.errors.get('<run>', 'no hypothesis was scored')})", file=sys.stderr)
        return 1
    written = write_reports(results, out)
    for line in summary_lines(results):
        print(line)
    print(f"reports written to {out}: " + ", ".join(p.name for p in written.values()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
