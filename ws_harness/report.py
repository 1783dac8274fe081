"""End-of-run reports (SPEC §7): ranking tables, the recovery scatter, the linear-vs-measured
retention plot, the per-layer heatmap, hypothesis definitions and a short conclusion.

The question is causal (SPEC §4.1): the scatter and the conclusion lead with causal retention
(linear c_lin / R_causal, measured c_keep / c_drop against random subspaces and the oracles),
then the geometric view (R_act vs R_w_combined). "Held" always means the claim's test passed
(one-sided p < ALPHA after Benjamini–Hochberg), never a point estimate above 1.

:func:`write_reports` runs at the end of every sweep (the plugin calls it after the tables are
written) and from ``ws-harness report [OUT]`` (:func:`main`), which rebuilds everything from a
finished run's ``results.json``. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
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

__all__ = ["write_reports", "main", "scatter_plot", "retention_agreement",
           "retention_agreement_plot", "layer_heatmap", "definitions_md", "conclusion_md"]

TOP_LABELLED = 10  # write/mixed points labelled in the scatter (plus every read and ceiling)
TOP_MISSES = 3  # largest |c_keep − c_lin| named on the agreement plot and in the conclusion
# Measured retention columns (SPEC §4.1; schema kind "measured"): keep and drop, with CIs.
KEEP, DROP, KEEP_NORM, KEEP_PCT = "c_keep", "c_drop", "c_keep_norm", "keep_percentile"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ordered(table: pl.DataFrame) -> list[str]:
    return table["hypothesis"].to_list()


def _seed_ranges(results: RunResults,
                 columns: Sequence[str] = ()) -> dict[str, dict[str, tuple[float, float]]]:
    """hypothesis → column → (min, max) over the diffs where the column is finite."""
    frame = _seed_frame(results)
    cols = [c for c in dict.fromkeys([*schema.SCATTER_AXES, *columns]) if c in frame.columns]
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for (name,), group in frame.group_by(["hypothesis"]):
        out[name] = {}
        for col in cols:
            values = [v for v in group[col].to_list() if _finite(v)]
            if values:
                out[name][col] = (min(values), max(values))
    return out


# ---- causal retention: shared helpers (SPEC §4.1) ------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _seed_frame(results: RunResults) -> pl.DataFrame:
    """per_seed() with every metric's summary column present (null where absent or NaN)."""
    frame = per_seed(results)
    cols = [c for m in schema.metrics() for c in m.summary_columns()]
    for col in dict.fromkeys(cols):
        if col not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(col))
        elif frame[col].dtype != pl.Float64:
            frame = frame.with_columns(pl.col(col).cast(pl.Float64, strict=False))
        frame = frame.with_columns(pl.col(col).fill_nan(None))
    return frame


def _causal_metric(table: str) -> schema.Metric | None:
    """The linear (attribution) metric that makes the causal claim of a ranking table."""
    axes = {"write/mixed": {"write", "mixed"}, "read": {"read"}}.get(table, set())
    for m in schema.metrics():
        if m.kind == "linear" and axes & set(m.claim_axes):
            return m
    return None


def _fraction(table: str = "write/mixed") -> str:
    m = _causal_metric(table)
    return (m.fraction or "c_lin") if m else "c_lin"


def _causal_refs(results: RunResults) -> list[tuple[str, dict[str, Any]]]:
    """(diff name, its inputs "causal" dict) per diff; {} where the run did not record one."""
    diff = results.inputs.get("diff", {}) if isinstance(results.inputs, dict) else {}
    out = []
    for i, d in enumerate(diff.get("diffs", []) if isinstance(diff, dict) else []):
        causal = d.get("causal") if isinstance(d, dict) else None
        out.append((str(d.get("name", f"diff{i}")) if isinstance(d, dict) else f"diff{i}",
                    causal if isinstance(causal, dict) else {}))
    return out


def _random_reference(results: RunResults) -> dict[str, float] | None:
    """c_keep of the random Haar subspaces at rank k, pooled over diffs: median, range, counts."""
    pooled, n_diffs = [], 0
    for _, causal in _causal_refs(results):
        draws = [float(v) for v in causal.get("random") or [] if _finite(v)]
        pooled += draws
        n_diffs += bool(draws)
    if not pooled:
        return None
    return {"median": statistics.median(pooled), "lo": min(pooled), "hi": max(pooled),
            "n": len(pooled), "n_diffs": n_diffs}


def _null_fraction(results: RunResults) -> float:
    """c_lin of a random subspace (its exact null mean): k/d; NaN when the run does not say."""
    rank, d = results.inputs.get("rank"), results.inputs.get("d_model")
    if _finite(rank) and _finite(d) and d > 0:
        return float(rank) / float(d)
    m = _causal_metric("write/mixed")
    ratios = [s[m.fraction] / s[m.name] for s in results.summaries if m is not None
              and _finite(s.get(m.fraction)) and _finite(s.get(m.name)) and s[m.name] != 0]
    return statistics.median(ratios) if ratios else math.nan


def retention_agreement(results: RunResults) -> dict[str, Any]:
    """How well linear retention c_lin predicts measured c_keep (SPEC §4.1), over measured rows.

    One row per (diff, hypothesis) with both a measured c_keep and a c_lin (the oracles
    included). Returns {"n", "spearman", "p" (Spearman ρ and its p; NaN below 3 rows or for
    constant input), "n_hypotheses", "spearman_hypotheses" (the same without the ceilings),
    "misses" (the TOP_MISSES rows with the largest |c_keep − c_lin|, largest first), "points"
    (every row: diff, hypothesis, family, table, c_lin, c_keep, c_keep_lo, c_keep_hi, miss =
    c_keep − c_lin)}. The agreement plot and the conclusion both use this.
    """
    frame = _seed_frame(results) if results.summaries else pl.DataFrame()
    frac = _fraction()
    points: list[dict[str, Any]] = []
    if frame.height and frac in frame.columns:
        part = frame.filter(pl.col(KEEP).is_not_null() & pl.col(frac).is_not_null())
        for r in part.sort(["diff", "hypothesis"]).iter_rows(named=True):
            points.append({"diff": r["diff"], "hypothesis": r["hypothesis"],
                           "family": r["family"], "table": r["table"], "c_lin": r[frac],
                           "c_keep": r[KEEP], "c_keep_lo": r.get(f"{KEEP}_lo"),
                           "c_keep_hi": r.get(f"{KEEP}_hi"), "miss": r[KEEP] - r[frac]})

    def spearman(rows: list[dict[str, Any]]) -> tuple[float, float]:
        if len(rows) < 3:
            return math.nan, math.nan
        from scipy.stats import spearmanr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant input: NaN, said as such in the text
            got = spearmanr([r["c_lin"] for r in rows], [r["c_keep"] for r in rows])
        return float(got.statistic), float(got.pvalue)

    rho, p = spearman(points)
    hyps = [r for r in points if r["table"] != "ceiling"]
    misses = sorted(points, key=lambda r: (-abs(r["miss"]), r["hypothesis"], str(r["diff"])))
    return {"n": len(points), "spearman": rho, "p": p, "n_hypotheses": len(hyps),
            "spearman_hypotheses": spearman(hyps)[0], "misses": misses[:TOP_MISSES],
            "points": points}


# ---- the joint scatter ---------------------------------------------------------------------


def _by_rank(part: pl.DataFrame, col: str) -> pl.DataFrame:
    """Rows by their median rank by `col` (ceilings, unranked: by the median of `col`)."""
    keys = [k for k in (f"rank_{col}_median",) if k in part.columns]
    value = pl.col(f"{col}_median") if f"{col}_median" in part.columns else pl.lit(None)
    return (part.with_columns((-value.cast(pl.Float64)).alias("_v"))
            .sort([*keys, "_v", "hypothesis"], nulls_last=True).drop("_v"))


def _marker(family: str) -> str:
    return "o" if family.startswith("W:") else "s" if family.startswith("act:") else "D"


def _place_labels(ax: Any, fig: Any, points: list[tuple[float, float, str, str]],
                  avoid: Sequence[tuple[float, float]] = ()) -> None:
    """Annotate points without overlapping each other nor the other markers at `avoid` (data
    coordinates): try offsets, keep the first free one."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = []
    markers = []
    for x, y in avoid:
        px, py = ax.transData.transform((x, y))
        markers.append(((x, y), Bbox.from_extents(px - 6, py - 6, px + 6, py + 6)))
    offsets = [(5, 3), (5, -11), (-5, 3), (-5, -11), (5, 13), (5, -21), (-5, 13), (-5, -21),
               (12, 23), (12, -31), (-12, 23), (-12, -31), (20, 33), (20, -41)]
    frame = ax.get_window_extent(renderer)
    for x, y, name, colour in points:
        best = None
        blocked = [b for at, b in markers if at != (x, y)]  # not its own marker
        for dx, dy in offsets:
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points",
                               fontsize=7, color=colour, ha="left" if dx > 0 else "right",
                               zorder=4)
            box = text.get_window_extent(renderer).expanded(1.02, 1.1)
            inside = (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
                      and box.y1 <= frame.y1)
            if inside and not any(box.overlaps(other) for other in taken + blocked):
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


def _bars(lo_hi: tuple[float, float] | None, v: float) -> list[list[float]]:
    lo, hi = lo_hi if lo_hi else (v, v)
    return [[max(v - lo, 0.0)], [max(hi - v, 0.0)]]


def _random_band(ax: Any, ref: dict[str, float] | None, null_c: float, *,
                 box: bool = True) -> None:
    """The random-subspace reference: its c_keep range (band) and median; c_lin's null k/d."""
    if ref is not None:
        ax.axhspan(ref["lo"], ref["hi"], color="0.75", alpha=0.35, lw=0, zorder=0,
                   label=f"random subspaces: c_keep range ({ref['n']} draws, "
                         f"{ref['n_diffs']} diff{'s' if ref['n_diffs'] != 1 else ''})")
        ax.axhline(ref["median"], color="0.35", ls="--", lw=0.9, zorder=1,
                   label=f"random subspaces: median c_keep {ref['median']:.3f}")
        if box and _finite(null_c):
            ax.errorbar([null_c], [ref["median"]], yerr=[[ref["median"] - ref["lo"]],
                                                        [ref["hi"] - ref["median"]]],
                        fmt="X", color="0.3", ms=8, capsize=4, lw=1.2, zorder=3,
                        label="random subspace (x: c_lin's null mean k/d)")
    if _finite(null_c):
        ax.axvline(null_c, color="0.5", ls=":", lw=0.9, zorder=1,
                   label=f"c_lin null mean k/d = {null_c:.3g} (R_causal = 1)")


SYMLOG_SPAN = 8.0  # retention axes go symlog once the data reach this many times k/d


def _retention_axes(ax: Any, values: list[float], null_c: float) -> tuple[float, float]:
    """Equal x and y limits for retention fractions (always including 0); returns them.

    Hypotheses crowd near c = k/d while the oracles sit an order of magnitude higher, so once
    the data span SYMLOG_SPAN × k/d both axes are symlog: linear within ±k/d (the random
    subspace's c_lin; fractions can be ≤ 0), logarithmic beyond.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    lo, hi = min(values + [0.0]), max(values + [0.0])
    if _finite(null_c) and null_c > 0 and hi > SYMLOG_SPAN * null_c:
        lo = lo * 1.3 if lo < -null_c else lo - 0.3 * null_c
        hi *= 1.3
        # 0 and k/d in the linear part, 1-2-5 ticks in the logarithmic parts
        steps = [m * 10.0 ** e for e in range(math.floor(math.log10(null_c)), 3)
                 for m in (1, 2, 5)]
        ticks = sorted([0.0, null_c] + [v for v in steps if 1.4 * null_c <= v <= hi]
                       + [-v for v in steps if 1.4 * null_c <= v <= -lo])
        for axis, scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
            scale("symlog", linthresh=null_c, linscale=0.6)
            axis.set_major_locator(FixedLocator(ticks))
            axis.set_minor_locator(NullLocator())
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
            axis.set_minor_formatter(NullFormatter())
    else:
        pad = 0.06 * max(hi - lo, 1e-3)
        lo, hi = lo - pad, hi + pad
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    return lo, hi


def _causal_panel(ax: Any, strip: Any, table: pl.DataFrame, results: RunResults,
                  ranges: dict[str, dict[str, tuple[float, float]]],
                  colour: dict[str, Any], handles: dict[str, Any]) -> list[tuple[Any, list]]:
    """Measured c_keep vs linear c_lin (write/mixed and ceilings); unmeasured on the strip."""
    frac = _fraction()
    part = table.filter(pl.col("table").is_in(["write/mixed", "ceiling"]))
    ref, null_c = _random_reference(results), _null_fraction(results)
    n_of = {h: g["n_measured"] for h, g in _measured_medians(results).items()}
    measured, unmeasured = [], []
    for row in part.iter_rows(named=True):
        x = row.get(f"{frac}_median")
        if not _finite(x):
            continue
        (measured if _finite(row.get(f"{KEEP}_median")) else unmeasured).append(row)
    label = schema.label(KEEP)
    strip.set_yticks([])
    strip.set_xlabel(f"{frac} (linear retention: first-order share of the residual writes' "
                     "steering inside the basis)")
    ax.set_ylabel(f"{label}: S(keep_B(w)) / S(w_W)")
    ax.set_title("Causal retention: does the subspace carry the steering? Measured c_keep vs "
                 "linear c_lin (medians over diffs, bars: seed range; ★ ceilings)", fontsize=10)
    strip.set_ylabel("not\nmeasured", rotation=0, ha="right", va="center", fontsize=8)
    if not measured and not unmeasured:
        ax.text(0.5, 0.5, "Causal retention: no causal scores in this run (results from before "
                "SPEC §4.1); geometry only", transform=ax.transAxes, ha="center", va="center")
        ax.set_title("")
        ax.axis("off")
        strip.set_visible(False)
        return []
    xs = [r[f"{frac}_median"] for r in measured + unmeasured] + (
        [null_c] if _finite(null_c) else [])
    ys = [r[f"{KEEP}_median"] for r in measured] + (
        [ref["lo"], ref["hi"]] if ref is not None else [])
    for r in measured:
        span = ranges.get(r["hypothesis"], {})
        xs += list(span.get(frac, ()))
        ys += list(span.get(KEEP, ()))
    lo, hi = _retention_axes(ax, xs + ys, null_c)
    ax.plot([lo, hi], [lo, hi], ls=":", color="0.45", lw=0.9, zorder=1,
            label="c_keep = c_lin (the linear prediction)")
    ax.axhline(0, color="0.7", lw=0.6, zorder=0)
    if lo < 1 < hi:
        ax.axhline(1, color="0.2", lw=0.6, ls="-.", zorder=0, label="c_keep(I) = 1")
    _random_band(ax, ref, null_c)
    labels: list[tuple[float, float, str, str]] = []
    for row in measured:
        x, y, name = row[f"{frac}_median"], row[f"{KEEP}_median"], row["hypothesis"]
        ceiling = row["table"] == "ceiling"
        c = "black" if ceiling else colour[row["family"]]
        span = ranges.get(name, {})
        ax.errorbar(x, y, xerr=_bars(span.get(frac), x), yerr=_bars(span.get(KEEP), y),
                    fmt="none", ecolor=c, alpha=0.5, lw=0.8, zorder=2)
        handle = ax.scatter([x], [y], s=150 if ceiling else 42,
                            marker="*" if ceiling else _marker(row["family"]), color=c,
                            edgecolor="black", linewidths=0.4, zorder=3.5)
        if not ceiling:
            handles.setdefault(row["family"], handle)
        n_measured = n_of.get(name, row["n_seeds"])
        labels.append((x, y, name if n_measured >= row["n_seeds"]
                       else f"{name} (measured on {n_measured}/{row['n_seeds']} diffs)",
                       "black" if ceiling else "0.1"))
    ax.grid(True, alpha=0.25)
    ax.legend(loc="upper left", fontsize=7.5)
    # Unmeasured hypotheses: c_lin alone, on a strip (two rows, so neighbours' labels fit).
    strip.set_ylim(-1, 1)
    strip_labels = []
    for i, row in enumerate(sorted(unmeasured, key=lambda r: -r[f"{frac}_median"])):
        x, name = row[f"{frac}_median"], row["hypothesis"]
        y = 0.35 if i % 2 == 0 else -0.35
        ceiling = row["table"] == "ceiling"
        c = "black" if ceiling else colour[row["family"]]
        strip.errorbar(x, y, xerr=_bars(ranges.get(name, {}).get(frac), x), fmt="none",
                       ecolor=c, alpha=0.5, lw=0.8)
        handle = strip.scatter([x], [y], s=120 if ceiling else 30,
                               marker="*" if ceiling else _marker(row["family"]), color=c,
                               edgecolor="black", linewidths=0.4, zorder=3)
        if not ceiling:
            handles.setdefault(row["family"], handle)
        if ceiling or i < TOP_LABELLED:
            strip_labels.append((x, y, name, "black" if ceiling else "0.1"))
    if _finite(null_c):
        strip.axvline(null_c, color="0.5", ls=":", lw=0.9)
    if not unmeasured:
        strip.text(0.5, 0.0, "every hypothesis with a c_lin was measured", ha="center",
                   va="center", transform=strip.transAxes, fontsize=8, color="0.4")
    strip.grid(True, axis="x", alpha=0.25)
    return [(ax, labels), (strip, strip_labels)]


def _geometric_panel(ax: Any, part: pl.DataFrame, ranges: dict[str, dict[str, tuple[float, float]]],
                     colour: dict[str, Any], handles: dict[str, Any], title: str,
                     label_all: bool) -> list[tuple[float, float, str, str]]:
    """R_act vs R_w_combined, log-log, null lines at 1; labels the top by joint (or all)."""
    x_col, y_col = schema.SCATTER_AXES
    xs, ys, labels = [], [], []
    order = _by_rank(part, "joint")
    top = set(order["hypothesis"].to_list()[:TOP_LABELLED])
    for row in order.iter_rows(named=True):
        x, y = row[f"{x_col}_median"], row[f"{y_col}_median"]
        if not _finite(x) or not _finite(y) or x <= 0 or y <= 0:
            continue
        xs.append(x)
        ys.append(y)
        name = row["hypothesis"]
        ceiling = row["table"] == "ceiling"
        c = "black" if ceiling else colour[row["family"]]
        ax.errorbar(x, y, xerr=_bars(ranges.get(name, {}).get(x_col), x),
                    yerr=_bars(ranges.get(name, {}).get(y_col), y), fmt="none", ecolor=c,
                    alpha=0.5, lw=0.8, zorder=2)
        handle = ax.scatter([x], [y], s=150 if ceiling else 38,
                            marker="*" if ceiling else _marker(row["family"]), color=c,
                            edgecolor="black", linewidths=0.4, zorder=3 if ceiling else 3.5,
                            alpha=0.75 if ceiling else 1.0)
        if not ceiling:
            handles.setdefault(row["family"], handle)
        if ceiling or label_all or name in top:
            labels.append((x, y, name, "black" if ceiling else "0.1"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    if xs:
        lo = min(min(xs), min(ys), 1.0) / 1.5
        hi = max(max(xs), max(ys), 1.0) * 1.8
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.plot([lo, hi], [lo, hi], ls=":", color="0.6", lw=0.8, zorder=1, label="R_act = R_w")
    ax.axvline(1, ls="--", color="0.35", lw=0.9, zorder=1, label="null (R = 1)")
    ax.axhline(1, ls="--", color="0.35", lw=0.9, zorder=1)
    _log_axes(ax)
    ax.set_xlabel(f"{schema.label(x_col)} (activation recovery / null)")
    ax.set_ylabel(f"{schema.label(y_col)} (weight recovery / null)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.25)
    if not xs:
        ax.text(0.5, 0.5, "none in this run", transform=ax.transAxes, ha="center")
    ax.legend(loc="lower right", fontsize=8)
    return labels


def scatter_plot(results: RunResults, path: Path) -> Path:
    """Causal retention first, then the geometric view (medians over seeds, bars = seed range).

    Top panel (gid ``causal``): measured c_keep vs linear c_lin for write/mixed hypotheses and
    the ceilings (stars), with y = x, the random-subspace reference (band: range of c_keep of
    the per-diff random draws pooled over diffs, dashed: their median, ✕ at c_lin's null mean
    k/d) and c_keep(I) = 1; hypotheses that were not measured sit on the strip below (gid
    ``unmeasured``) at their c_lin. Bottom: R_act vs R_w_combined, log-log, null lines at 1, for
    write/mixed with the ceilings (gid ``geometric``) and for read-side hypotheses (gid
    ``read``), whose R_w measures read/write overlap rather than recovery.
    """
    plt = _pyplot()
    table = aggregate(results)
    frac = _fraction()
    ranges = _seed_ranges(results, (frac, KEEP))
    families = sorted(set(table.filter(pl.col("table") != "ceiling")["family"].to_list()))
    cmap = plt.get_cmap("tab20")
    colour = {f: cmap(i % 20) for i, f in enumerate(families)}
    has_causal = f"{frac}_median" in table.columns and table[f"{frac}_median"].is_not_null().any()
    # Without causal scores (results from before SPEC §4.1) the causal panel is only a note.
    fig = plt.figure(figsize=(15, 15 if has_causal else 10.5))
    outer = fig.add_gridspec(2, 1, height_ratios=[6.0 if has_causal else 0.9, 6.2],
                             hspace=0.16, left=0.06, right=0.985,
                             top=0.94 if has_causal else 0.92, bottom=0.1 if has_causal else 0.14)
    top = outer[0].subgridspec(2, 1, height_ratios=[5.0, 1.0], hspace=0.04)
    bottom = outer[1].subgridspec(1, 2, width_ratios=[1.35, 1], wspace=0.16)
    causal = fig.add_subplot(top[0])
    strip = fig.add_subplot(top[1], sharex=causal)
    geometric, read = fig.add_subplot(bottom[0]), fig.add_subplot(bottom[1])
    for ax, gid in ((causal, "causal"), (strip, "unmeasured"), (geometric, "geometric"),
                    (read, "read")):
        ax.set_gid(gid)
    causal.tick_params(labelbottom=False)
    handles: dict[str, Any] = {}
    to_label = _causal_panel(causal, strip, table, results, ranges, colour, handles)
    to_label.append((geometric, _geometric_panel(
        geometric, table.filter(pl.col("table").is_in(["write/mixed", "ceiling"])), ranges,
        colour, handles, "Geometry: write/mixed hypotheses (top by joint labelled); ceilings ★",
        label_all=False)))
    to_label.append((read, _geometric_panel(
        read, table.filter(pl.col("table") == "read"), ranges, colour, handles,
        "Geometry: read-side hypotheses (R_w = read/write overlap)", label_all=True)))
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=min(6, max(1, len(handles))), fontsize=8, frameon=False,
               title="family (● weight-derived, ■ activation-derived, ◆ compound)",
               title_fontsize=8)
    inputs = results.inputs
    fig.suptitle(f"Recovery on {inputs.get('model', {}).get('spec', '?')}, k = "
                 f"{inputs.get('rank', '?')}: medians over {table['n_seeds'].max()} diff seeds "
                 "(bars: seed range)", fontsize=11)
    for ax, labels in to_label:  # labels last, in ranking order, once the limits are fixed
        _place_labels(ax, fig, labels, [(x, y) for x, y, _, _ in labels])
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def retention_agreement_plot(results: RunResults, path: Path,
                             agreement: dict[str, Any] | None = None) -> Path:
    """Measured c_keep vs linear c_lin per (diff, hypothesis), y = x, Spearman ρ in the title.

    Bars: c_keep's bootstrap 95% CI over EVAL prompts; the TOP_MISSES largest |c_keep − c_lin|
    are named, with a red segment from the prediction (y = x) to the measurement; the band is
    the random-subspace reference (as in the scatter). `agreement` defaults to
    :func:`retention_agreement` (pass it to reuse one computation).
    """
    plt = _pyplot()
    got = agreement if agreement is not None else retention_agreement(results)
    points = got["points"]
    ref, null_c = _random_reference(results), _null_fraction(results)
    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    ax.set_gid("agreement")
    diffs = sorted({str(r["diff"]) for r in points})
    cmap = plt.get_cmap("tab10")
    colour = {d: cmap(i % 10) for i, d in enumerate(diffs)}
    values = [v for r in points for v in (r["c_lin"], r["c_keep"], r["c_keep_lo"], r["c_keep_hi"])
              if _finite(v)] + ([ref["lo"], ref["hi"]] if ref else []) + (
        [null_c] if _finite(null_c) else [])
    lo, hi = _retention_axes(ax, values + [0.1], null_c)
    ax.plot([lo, hi], [lo, hi], ls=":", color="0.3", lw=1.0, zorder=1,
            label="y = x (c_keep = c_lin)")
    _random_band(ax, ref, null_c, box=False)
    for r in points:
        c, ceiling = colour[str(r["diff"])], r["table"] == "ceiling"
        lo_ci, hi_ci = r["c_keep_lo"], r["c_keep_hi"]
        if _finite(lo_ci) and _finite(hi_ci):
            ax.errorbar(r["c_lin"], r["c_keep"], yerr=[[max(r["c_keep"] - lo_ci, 0)],
                                                       [max(hi_ci - r["c_keep"], 0)]],
                        fmt="none", ecolor=c, alpha=0.6, lw=0.8, zorder=2)
        ax.scatter([r["c_lin"]], [r["c_keep"]], s=140 if ceiling else 40,
                   marker="*" if ceiling else "o", color=c, edgecolor="black",
                   linewidths=0.4, zorder=3)
    labels = []
    for r in got["misses"]:
        ax.plot([r["c_lin"], r["c_lin"]], [r["c_lin"], r["c_keep"]], color="tab:red", lw=1.2,
                zorder=2.5)
        labels.append((r["c_lin"], r["c_keep"],
                       f"{r['hypothesis']} ({r['diff']}): {r['miss']:+.3f}", "tab:red"))
    for d in diffs:
        ax.scatter([], [], marker="o", color=colour[d], edgecolor="black", linewidths=0.4,
                   label=f"diff {d}")
    if any(r["table"] == "ceiling" for r in points):
        ax.scatter([], [], marker="*", s=140, color="white", edgecolor="black", label="ceiling")
    ax.plot([], [], color="tab:red", lw=1.2, label=f"largest misses (top {TOP_MISSES})")
    rho = got["spearman"]
    ax.set_title(f"Linear vs measured retention: Spearman ρ = {_num(rho)} over n = {got['n']} "
                 "measured (diff, hypothesis) rows"
                 + ("" if _finite(rho) else " (needs ≥ 3 rows, non-constant)")
                 + (f"\nwithout the ceilings: ρ = {got['spearman_hypotheses']:.2f} over n = "
                    f"{got['n_hypotheses']}" if _finite(got["spearman_hypotheses"]) else ""),
                 fontsize=10)
    ax.set_xlabel(f"{_fraction()} (linear, first-order prediction)")
    ax.set_ylabel(f"{schema.label(KEEP)} (bars: bootstrap 95% CI over EVAL prompts)")
    ax.grid(True, alpha=0.25)
    ax.legend(loc="upper left", fontsize=7.5)
    if not points:
        ax.text(0.5, 0.5, "no hypothesis was measured in this run", transform=ax.transAxes,
                ha="center")
    fig.tight_layout()
    _place_labels(ax, fig, labels, [(r["c_lin"], r["c_keep"]) for r in points])
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


def _claims_frame(results: RunResults) -> pl.DataFrame | None:
    if not results.claims:
        return None
    claims = pl.DataFrame(results.claims, infer_schema_length=None)
    if "holds" not in claims.columns:  # "held" = the test passed: held or stale
        claims = claims.with_columns(pl.col("status").is_in(["held", "stale"]).alias("holds"))
    if "expected_refuted" not in claims.columns:
        claims = claims.with_columns(pl.lit(False).alias("expected_refuted"))
    return claims


def _claim_counts(results: RunResults) -> dict[tuple[str, str], dict[str, Any]]:
    """(hypothesis, claim) → {"held": diffs where the test passed, "n": diffs, "recorded"}."""
    claims = _claims_frame(results)
    if claims is None or claims.is_empty():
        return {}
    per = claims.group_by(["hypothesis", "claim"]).agg(
        pl.col("holds").sum().alias("held"), pl.len().alias("n"),
        pl.col("expected_refuted").any().alias("recorded"))
    return {(r["hypothesis"], r["claim"]): {"held": int(r["held"]), "n": int(r["n"]),
                                             "recorded": bool(r["recorded"])}
            for r in per.iter_rows(named=True)}


def _held_everywhere(counts: dict[tuple[str, str], dict[str, Any]], name: str, claim: str,
                     n_diffs: int) -> bool:
    """The claim's test passed on every diff the hypothesis was scored on."""
    c = counts.get((name, claim))
    return c is not None and c["n"] >= max(n_diffs, 1) and c["held"] == c["n"]


def _claim_phrase(counts: dict[tuple[str, str], dict[str, Any]], name: str, claim: str,
                  n_diffs: int) -> str:
    c = counts.get((name, claim))
    label = f"{schema.label(claim)} > 1"
    if c is None:
        return f"no {label} claim"
    if _held_everywhere(counts, name, claim, n_diffs):
        return f"{label} held on every diff ({c['held']}/{c['n']})"
    how = "a recorded finding" if c["recorded"] else "not recorded"
    if c["held"] == 0:
        return f"{label} refuted on every diff (0/{c['n']}; {how})"
    return f"{label} held on only {c['held']}/{c['n']} diffs ({how})"


def _leader_line(i: int, row: dict[str, Any], counts: dict[tuple[str, str], dict[str, Any]],
                 ) -> str:
    stable = {True: "stable", False: "unstable", None: "stability n/a"}[row["stable"]]
    head = (f"joint {_num(row['joint_median'])} (IQR {_num(row['joint_iqr'])}), "
            if row["table"] != "read" else "")
    claims = schema.claims_for(row["axis_kind"])
    geometric = [c for c in claims if c in schema.SCATTER_AXES]
    held = "; ".join(_claim_phrase(counts, row["hypothesis"], c, row["n_seeds"])
                     for c in geometric)
    key = schema.label(schema.rank_key(row["table"]))
    return (f"{i}. **{row['hypothesis']}** ({row['family']}): {head}"
            f"R_act {_num(row['r_act_median'])} (IQR {_num(row['r_act_iqr'])}; bootstrap 95% CI "
            f"{_num(row['r_act_ci_lo'])}–{_num(row['r_act_ci_hi'])}), R_w_combined "
            f"{_num(row['r_w_combined_median'])} (IQR {_num(row['r_w_combined_iqr'])}), "
            f"pct_oracle act {_num(row['pct_oracle_act_median'])} / w "
            f"{_num(row['pct_oracle_w_combined_median'])}"
            + (f"; rank by {key} {row['rank_min']:.0f}–{row['rank_max']:.0f} over seeds "
               f"({stable})" if _finite(row["rank_min"]) and _finite(row["rank_max"]) else "")
            + (f"; claims: {held}" if held else ""))


def _axis_leaders(part: pl.DataFrame, counts: dict[tuple[str, str], dict[str, Any]],
                  table: str) -> str:
    """Each axis's leader (highest median), with whether its claim held on every diff."""
    causal = _causal_metric(table)
    axes = ([causal.name] if causal else []) + list(schema.SCATTER_AXES)
    if table != "read":
        axes += ["r_act_specific", "r_w_struct", "joint"]  # beyond the isotropic null, then joint
    else:
        axes.remove("r_w_combined")  # overlap, not recovery, for read-side bases
    parts = []
    for col in axes:
        if f"{col}_median" not in part.columns:
            continue
        have = part.filter(pl.col(f"{col}_median").is_not_null())
        if have.is_empty():
            continue
        row = have.sort([pl.col(f"{col}_median"), pl.col("hypothesis")],
                        descending=[True, False]).row(0, named=True)
        name, n = row["hypothesis"], row["n_seeds"]
        if col in schema.claims_for(row["axis_kind"]):
            status = _claim_phrase(counts, name, col, n)
        else:  # joint makes no claim of its own: its components'
            status = f"{schema.label(col)} makes no claim; " + "; ".join(
                _claim_phrase(counts, name, c, n) for c in schema.SCATTER_AXES)
        parts.append(f"by {schema.label(col)}: **{name}** ({_num(row[f'{col}_median'])}; "
                     f"{status})")
    if not parts:
        return ""
    return ("Leader on each axis (highest median; an axis's leader is a finding only where "
            "its claim held): " + "; ".join(parts) + ".")


def _ci(point: Any, lo: Any, hi: Any, spec: str = ".3f") -> str:
    if not _finite(point):
        return "n/a"
    if _finite(lo) and _finite(hi):
        return f"{point:{spec}} ({lo:{spec}}–{hi:{spec}})"
    return format(point, spec)


def _measured_medians(results: RunResults) -> dict[str, dict[str, Any]]:
    """hypothesis → medians over its measured diffs of c_keep, c_drop (with CIs) and the rest."""
    frame = _seed_frame(results)
    cols = [KEEP, f"{KEEP}_lo", f"{KEEP}_hi", DROP, f"{DROP}_lo", f"{DROP}_hi", KEEP_NORM,
            KEEP_PCT, _fraction()]
    part = frame.filter(pl.col(KEEP).is_not_null())
    if part.is_empty():
        return {}
    got = part.group_by("hypothesis").agg(*[pl.col(c).median() for c in cols],
                                          pl.len().alias("n_measured"))
    return {r["hypothesis"]: r for r in got.iter_rows(named=True)}


def _causal_section(results: RunResults, table: pl.DataFrame,
                    counts: dict[tuple[str, str], dict[str, Any]],
                    agreement: dict[str, Any]) -> list[str]:
    lines = ["## Causal retention", ""]
    m = _causal_metric("write/mixed")
    frac = _fraction()
    has_causal = m is not None and table.height and table[f"{m.name}_median"].is_not_null().any()
    measured = _measured_medians(results)
    if not has_causal and not measured:
        return lines + ["No causal scores in this run (R_causal, c_lin, c_keep absent: results "
                        "from before SPEC §4.1); the geometric sections below are all there is. "
                        "Geometry (R_act, R_w) does not say whether a subspace carries the "
                        "steering.", ""]
    null_c = _null_fraction(results)
    lines += [f"Does the subspace carry the steering? {frac} = the share of the first-order "
              "(integrated-gradient) steering of the residual writes w_W that writes inside the "
              f"basis; {m.label if m else 'R_causal'} = {frac} / its random-subspace null mean "
              f"k/d = {_num(null_c, '.3g')} (1 = random). Measured: c_keep = S(keep_B(w)) / "
              "S(w_W), c_drop = S(drop_B(w)) / S(w_W), with bootstrap 95% CIs over EVAL prompts "
              "(medians over the diffs measured). Claims are R > 1 with one-sided "
              f"p < {schema.ALPHA} after Benjamini–Hochberg.", ""]
    for name, intro in (("write/mixed", "Write/mixed hypotheses"), ("read", "Read-side "
                        "hypotheses (the read deltas' input side; not measured)")):
        cm = _causal_metric(name)
        part = table.filter(pl.col("table") == name)
        if cm is None or part.is_empty() or part[f"{cm.name}_median"].is_null().all():
            continue
        part = part.filter(pl.col(f"{cm.name}_median").is_not_null())
        if schema.rank_key(name) != cm.name:  # else: the ranking's own order (median rank)
            part = part.sort([pl.col(f"{cm.name}_median"), pl.col("hypothesis")],
                             descending=[True, False])
        lines += [f"{intro}, ranked by {cm.label} (median over diffs):", ""]
        for i, r in enumerate(part.head(3).iter_rows(named=True)):
            text = (f"{i + 1}. **{r['hypothesis']}** ({r['family']}): {cm.label} "
                    f"{_num(r[f'{cm.name}_median'])} (IQR {_num(r[f'{cm.name}_iqr'])}), "
                    f"{cm.fraction} {_num(r.get(f'{cm.fraction}_median'), '.3f')}, z "
                    f"{_num(r.get(f'{cm.z}_median'), '.1f')}; "
                    + _claim_phrase(counts, r["hypothesis"], cm.name, r["n_seeds"]))
            got = measured.get(r["hypothesis"])
            if got is not None:
                text += (f"; measured on {got['n_measured']}/{r['n_seeds']} diffs: c_keep "
                         f"{_ci(got[KEEP], got[f'{KEEP}_lo'], got[f'{KEEP}_hi'])}, c_drop "
                         f"{_ci(got[DROP], got[f'{DROP}_lo'], got[f'{DROP}_hi'])}")
            elif name == "write/mixed":
                text += "; not measured"
            lines.append(text)
        everywhere = [h for h in part["hypothesis"].to_list()
                      if _held_everywhere(counts, h, cm.name,
                                          int(part.filter(pl.col("hypothesis") == h)["n_seeds"][0]))]
        lines += ["", f"{len(everywhere)} of {part.height} {name} hypotheses have their "
                  f"{cm.label} > 1 claim held on every diff"
                  + (f": {', '.join(everywhere)}." if everywhere else "."), ""]

    ref = _random_reference(results)
    if measured:
        order = [h for h in _ordered(table) if h in measured]
        tables = dict(zip(table["hypothesis"], table["table"], strict=True))
        lines += ["Measured retention (95% CI: medians of the per-diff bootstrap bounds):", "",
                  f"| hypothesis | diffs measured | {frac} | c_keep (95% CI) | c_drop (95% CI) | "
                  "c_keep norm-matched | percentile among random |", "|---|---|---|---|---|---|---|"]
        for h in order:
            g = measured[h]
            tag = " [ceiling]" if tables.get(h) == "ceiling" else ""
            lines.append(f"| {h}{tag} | {g['n_measured']} | {_num(g[frac], '.3f')} | "
                         f"{_ci(g[KEEP], g[f'{KEEP}_lo'], g[f'{KEEP}_hi'])} | "
                         f"{_ci(g[DROP], g[f'{DROP}_lo'], g[f'{DROP}_hi'])} | "
                         f"{_num(g[KEEP_NORM], '.3f')} | {_num(g[KEEP_PCT], '.2f')} |")
        lines.append("")
    else:
        lines += ["No hypothesis was measured in this run (measured retention off): only the "
                  "linear prediction is available.", ""]
    if ref is not None:
        lines.append(f"Random reference: c_keep of random rank-k subspaces (Haar, at every "
                     f"touched layer), {ref['n']} draws pooled over {ref['n_diffs']} "
                     f"diff{'s' if ref['n_diffs'] != 1 else ''}: median {ref['median']:.3f}, "
                     f"range {ref['lo']:.3f}–{ref['hi']:.3f}.")
    ceil = table.filter(pl.col("table") == "ceiling")
    if ceil.height:
        lines.append("Oracles and ceilings: " + "; ".join(
            f"{r['hypothesis']} {frac} {_num(r.get(f'{frac}_median'), '.3f')}, c_keep "
            + (_ci(measured[r['hypothesis']][KEEP], measured[r['hypothesis']][f'{KEEP}_lo'],
                   measured[r['hypothesis']][f'{KEEP}_hi'])
               if r["hypothesis"] in measured else "not measured")
            for r in ceil.iter_rows(named=True)) + ".")
    lines.append("")

    refs = [(d, c) for d, c in _causal_refs(results) if c]
    if refs:
        lines += ["Per diff: S(v) = mean over EVAL prompts of m(θ + v) − m(θ − v); the "
                  "linear S(w) = 2Σ⟨Ḡ, Δ⟩ (integrated gradients) and its quadrature error.", "",
                  "| diff | S(w) | S(w_W) | S(w_W)/S(w) | linear S(w) | quadrature error | "
                  "random c_keep median (range) | measured |", "|---|---|---|---|---|---|---|---|"]
        for d, c in refs:
            draws = [float(v) for v in c.get("random") or [] if _finite(v)]
            rand = (f"{statistics.median(draws):.3f} ({min(draws):.3f}–{max(draws):.3f})"
                    if draws else "n/a")
            s_w = c.get("s_w", c.get("s_measured"))
            err = c.get("quadrature_error")
            if not _finite(err) and _finite(c.get("s_linear")) and _finite(c.get("s_measured")):
                err = abs(c["s_linear"] - c["s_measured"])
            rel = (f" ({100 * err / abs(s_w):.1f}% of S(w))"
                   if _finite(err) and _finite(s_w) and s_w != 0 else "")
            lines.append(f"| {d} | {_num(s_w, '.3f')} | {_num(c.get('s_write'), '.3f')} | "
                         f"{_num(c.get('write_share'), '.2f')} | {_num(c.get('s_linear'), '.3f')}"
                         f" | {_num(err, '.3g')}{rel} | {rand} | "
                         f"{len(c.get('measured') or [])} |")
        lines.append("")

    lines.append(f"Linear vs measured ({frac} against c_keep; retention_agreement.png): "
                 + _agreement_text(agreement))
    lines.append("")
    return lines


def _agreement_text(agreement: dict[str, Any]) -> str:
    n = agreement["n"]
    if n == 0:
        return "nothing measured, no comparison."
    if not _finite(agreement["spearman"]):
        text = (f"Spearman ρ undefined over n = {n} measured (diff, hypothesis) rows (needs at "
                "least 3, non-constant)")
    else:
        text = (f"Spearman ρ = {agreement['spearman']:.2f} (p = {agreement['p']:.2g}) over "
                f"n = {n} measured (diff, hypothesis) rows, ceilings included")
        if _finite(agreement["spearman_hypotheses"]):
            text += (f"; without the ceilings ρ = {agreement['spearman_hypotheses']:.2f} over "
                     f"n = {agreement['n_hypotheses']}")
    misses = "; ".join(f"{r['hypothesis']} on {r['diff']} (c_lin {r['c_lin']:.3f}, c_keep "
                       f"{r['c_keep']:.3f}, {r['miss']:+.3f})" for r in agreement["misses"])
    return text + f". Largest misses |c_keep − c_lin|: {misses}."


def _geometry_section(results: RunResults, table: pl.DataFrame,
                      counts: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    wm = table.filter(pl.col("table") == "write/mixed")
    read = table.filter(pl.col("table") == "read")
    ceil = table.filter(pl.col("table") == "ceiling")
    lines = ["## Leaders (geometry: R_act, R_w_combined)", ""]
    if wm.height:
        by_joint = _by_rank(wm, "joint")
        lines.append("Write/mixed hypotheses, ranked by joint = √(R_act · R_w_combined):")
        lines.append("")
        lines += [_leader_line(i + 1, r, counts)
                  for i, r in enumerate(by_joint.head(3).iter_rows(named=True))]
        lines.append("")
        leaders = _axis_leaders(wm, counts, "write/mixed")
        if leaders:
            lines += [leaders, ""]
        x, y = schema.SCATTER_AXES
        both = [r["hypothesis"] for r in by_joint.iter_rows(named=True)
                if all(_held_everywhere(counts, r["hypothesis"], c, r["n_seeds"]) for c in (x, y))]
        point = wm.filter((pl.col(f"{x}_median") > 1) & (pl.col(f"{y}_median") > 1)).height
        lines.append(f"{len(both)} of {wm.height} write/mixed hypotheses have both their "
                     f"{schema.label(x)} > 1 and {schema.label(y)} > 1 claims held (one-sided "
                     f"p < {schema.ALPHA} after Benjamini–Hochberg) on every diff"
                     + (f": {', '.join(both)}." if both else ".")
                     + f" By point estimates alone (median {schema.label(x)} > 1 and "
                     f"{schema.label(y)} > 1) {point} would; a point estimate above 1 is not a "
                     "held claim.")
        gap = wm.filter(pl.col("act_w_gap_log2_median").is_not_null()).sort(
            [pl.col("act_w_gap_log2_median").abs(), pl.col("hypothesis")],
            descending=[True, False]).head(1)
        for r in gap.iter_rows(named=True):
            lines.append(f"Largest gap between the axes: {r['hypothesis']} with log2(R_act/R_w) = "
                         f"{r['act_w_gap_log2_median']:+.2f} (R_act {_num(r['r_act_median'])}, "
                         f"R_w_combined {_num(r['r_w_combined_median'])}).")
        lines.append("")
    if read.height:
        lines.append("Read-side hypotheses, ranked by R_act (their R_w measures read/write "
                     "overlap, not recovery):")
        lines.append("")
        lines += [_leader_line(i + 1, r, counts)
                  for i, r in enumerate(_by_rank(read, "r_act").head(3).iter_rows(named=True))]
        lines.append("")
        leaders = _axis_leaders(read, counts, "read")
        if leaders:
            lines += [leaders, ""]
    if ceil.height:
        frac = _fraction()
        lines.append("Ceilings, for scale (rank-k optima and the informative ceiling): "
                     + "; ".join(f"{r['hypothesis']} R_act {_num(r['r_act_median'])}, "
                                 f"R_w_combined {_num(r['r_w_combined_median'])}"
                                 + (f", {frac} {_num(r[f'{frac}_median'], '.3f')}"
                                    if _finite(r.get(f"{frac}_median")) else "")
                                 for r in ceil.iter_rows(named=True)) + ".")
        if wm.height:
            primary = wm.filter(pl.col("rank_median").is_not_null())
            top = (primary if primary.height else _by_rank(wm, "joint")).row(0, named=True)
            key = schema.label(schema.rank_key("write/mixed")) if primary.height else "joint"
            m = _causal_metric("write/mixed")
            pct_causal = top.get(f"{m.pct_oracle}_median") if m else None
            lines.append(f"The top write/mixed hypothesis by {key}, {top['hypothesis']}, reaches "
                         + (f"{_num(100 * pct_causal, '.0f')}% of the causal oracle's "
                            f"{frac}, " if _finite(pct_causal) else "")
                         + f"{_num(100 * (top['pct_oracle_act_median'] or math.nan), '.0f')}% of "
                         "the activation oracle's energy and "
                         f"{_num(100 * (top['pct_oracle_w_combined_median'] or math.nan), '.0f')}%"
                         " of the weight oracle's.")
        lines.append("")
    return lines


def conclusion_md(results: RunResults, agreement: dict[str, Any] | None = None) -> str:
    """A short conclusion with the numbers: causal retention first, then geometry, claims,
    stability across seeds. `agreement`: :func:`retention_agreement` (computed if not given)."""
    table = aggregate(results)
    taus = kendall_taus(results)
    counts = _claim_counts(results)
    agreement = agreement if agreement is not None else retention_agreement(results)
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
             f"{n_seeds} diff seed{'s' if n_seeds != 1 else ''}; R = 1 is a random subspace. "
             "\"Held\" means the claim's test passed on that diff, never a point estimate above "
             "1.", ""]
    lines += _causal_section(results, table, counts, agreement)
    lines += _geometry_section(results, table, counts)

    lines += ["## Claims", ""]
    claims = _claims_frame(results)
    if claims is None or claims.is_empty():
        lines += ["No claims were evaluated in this run.", ""]
    else:
        counts_by = {status: int((claims["status"] == status).sum())
                     for status in ("held", "refuted", "surprise", "stale")}
        held = counts_by["held"] + counts_by["stale"]
        lines.append(f"Each claim is R > 1 with one-sided p < {schema.ALPHA} after "
                     f"Benjamini–Hochberg over all {claims.height} claims of the run: "
                     f"**{held} held**, {counts_by['refuted']} failed as recorded findings, "
                     f"{counts_by['surprise']} failed unexpectedly, {counts_by['stale']} recorded "
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
                     + f"; ranks by {schema.label(schema.rank_key(name))}.")
    lines.append("")
    if results.errors:
        lines += ["## Excluded", ""]
        lines += [f"- {name}: {message}" for name, message in sorted(results.errors.items())]
        lines.append("")
    return "\n".join(lines)


# ---- everything ----------------------------------------------------------------------------
PLOT_STAMP = ".plots.json"  # in OUT: what the PNGs there were drawn from


def _plot_digest(results: RunResults) -> str:
    """Hash of what the plots show (the results less timings) and of the code that draws them."""
    import hashlib
    import json

    import matplotlib

    from ws_harness.cache import code_version

    data = {**json.loads(results.to_json()), "timings": None,
            # how the schema names and places metrics (a conftest may register its own)
            "metrics": [(m.name, m.label, m.short, m.heatmap) for m in schema.metrics()]}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(f"{text}|{code_version(write_reports)}|matplotlib "
                          f"{matplotlib.__version__}".encode()).hexdigest()


def _draw_plots(plots: dict[str, Callable[[Path], Path]], out: Path,
                digest: str) -> dict[str, Path]:
    """Draw each plot into OUT/<name>.png, unless the PNG there was drawn from the same results
    by the same code (a warm rerun: drawing costs ~10 s, mostly the scatter's label placement).
    A PNG edited or replaced since is drawn again: the stamp records each file's sha256."""
    import json

    from ws_harness.cache import file_sha256

    stamp_path = out / PLOT_STAMP
    try:
        stamp = json.loads(stamp_path.read_text())
        drawn = stamp["files"] if stamp.get("digest") == digest else {}
    except (OSError, ValueError, KeyError, TypeError):
        drawn = {}
    written, files = {}, {}
    for name, draw in plots.items():
        path = out / f"{name}.png"
        if not (path.is_file() and drawn.get(name) == file_sha256(path)):
            draw(path)
        written[name], files[name] = path, file_sha256(path)
    tmp = stamp_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"digest": digest, "files": files}, indent=1))
    tmp.replace(stamp_path)
    return written



def write_reports(results: RunResults, out: Path) -> dict[str, Path]:
    """Write ranking tables, plots, definitions.md and conclusion.md into `out`; name → path.

    retention_agreement.png is written when any (diff, hypothesis) row has a measured c_keep.
    """
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
    agreement = retention_agreement(results)
    plots: dict[str, Callable[[Path], Path]] = {
        "joint_scatter": lambda path: scatter_plot(results, path)}
    if agreement["n"]:
        plots["retention_agreement"] = lambda path: retention_agreement_plot(
            results, path, agreement)
    if results.rows:
        plots["layer_heatmap"] = lambda path: layer_heatmap(results, path)
    written.update(_draw_plots(plots, out, _plot_digest(results)))
    (out / "definitions.md").write_text(definitions_md(results), encoding="utf-8")
    written["definitions"] = out / "definitions.md"
    (out / "conclusion.md").write_text(conclusion_md(results, agreement), encoding="utf-8")
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
