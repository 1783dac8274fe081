"""Rankings across diff seeds (SPEC §6): medians, IQRs, ranks by each table's key, Kendall τ, stability.

Three tables, never mixed (``schema.TABLES``; the axis kind decides, ``schema.table_of``):

* ``write/mixed`` — ranked by ``schema.rank_key("write/mixed")`` (today ``joint`` =
  √(R_act · R_w_combined)), descending;
* ``read`` — ranked by ``R_act`` alone: their R_w measures read/write overlap, not recovery;
* ``ceiling`` — the oracles and the informative ceiling, shown for scale and not ranked.

Ranks are computed per diff (rank 1 = best, ties share the lower rank), then summarised per
hypothesis by the median and IQR over diffs, like every summary score. Agreement between diffs
is Kendall's τ-b between each pair of diff rankings (on the hypotheses both scored). A
hypothesis is **stable** when its rank range over diffs (max − min) is at most
:func:`stable_rank_range` of its table size: ``max(1, ceil(n / 10))``; with a single diff
stability is undetermined (null).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import polars as pl

from ws_harness import schema
from ws_harness.results import RunResults
from ws_harness.schema import TABLES

__all__ = [
    "TABLES",
    "per_seed",
    "aggregate",
    "kendall_tau",
    "kendall_taus",
    "stable_rank_range",
    "summary_lines",
]


def stable_rank_range(n_ranked: int) -> int:
    """Largest rank range over seeds that still counts as stable in a table of n hypotheses."""
    return max(1, (n_ranked + 9) // 10)  # ceil(n / 10) in integers


def per_seed(results: RunResults) -> pl.DataFrame:
    """The summaries with `table`, `rank_key` and the per-diff `rank` (null for ceilings)."""
    frame = pl.DataFrame(results.summaries, infer_schema_length=None)
    ci = schema.CI_METRIC
    for col in schema.score_columns() + [f"{ci}_ci_lo", f"{ci}_ci_hi"]:
        if col not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(col))
        frame = frame.with_columns(pl.col(col).cast(pl.Float64).fill_nan(None))
    table = pl.col("axis_kind").replace_strict(
        {axis: schema.table_of(axis) for axis in schema.AXIS_KINDS}, return_dtype=pl.String)
    frame = frame.with_columns(table.alias("table"))
    key = pl.lit(None, dtype=pl.Float64)
    for name in TABLES:
        key = pl.when(pl.col("table") == name).then(pl.col(schema.rank_key(name))).otherwise(key)
    frame = frame.with_columns(key.alias("rank_key"))
    def rank_by(col: str) -> pl.Expr:
        rank = pl.col(col).rank(method="min", descending=True).over(["diff", "table"])
        return pl.when(pl.col("table") == "ceiling").then(None).otherwise(rank).cast(pl.Float64)

    # The primary rank, and beside it the rank each table would have by other scores.
    frame = frame.with_columns(rank_by("rank_key").alias("rank"),
                               *[rank_by(m).alias(f"rank_{m}") for m in schema.rank_beside()])
    return frame.sort(["diff", "table", "rank", "hypothesis"], nulls_last=True)


def aggregate(results: RunResults) -> pl.DataFrame:
    """One row per hypothesis: median and IQR over seeds of each score and of its rank.

    Columns: hypothesis, family, axis_kind, table, ``<score>_median``/``<score>_iqr`` for every
    score in SCORE_COLUMNS and for ``rank``, ``rank_min``/``rank_max``/``rank_range``,
    ``n_seeds``, ``stable`` (null for ceilings and single-seed runs), ``r_act_ci_lo``/``_hi``
    (medians of the per-seed bootstrap CI). Sorted by table, then median rank (ceilings by joint).
    """
    frame = per_seed(results)
    aggs = []
    ci = schema.CI_METRIC
    for col in schema.score_columns() + ["rank"] + [f"rank_{m}" for m in schema.rank_beside()]:
        c = pl.col(col)
        aggs += [c.median().alias(f"{col}_median"),
                 (c.quantile(0.75, "linear") - c.quantile(0.25, "linear")).alias(f"{col}_iqr")]
    aggs += [pl.col(f"{ci}_ci_lo").median(), pl.col(f"{ci}_ci_hi").median(),
             pl.col("rank").min().alias("rank_min"), pl.col("rank").max().alias("rank_max"),
             pl.len().alias("n_seeds")]
    table = frame.group_by(["hypothesis", "family", "axis_kind", "table"]).agg(aggs)
    sizes = frame.filter(pl.col("rank").is_not_null()).group_by("table").agg(
        pl.col("hypothesis").n_unique().alias("n_in_table"))
    table = table.join(sizes, on="table", how="left").with_columns(
        (pl.col("rank_max") - pl.col("rank_min")).alias("rank_range"))
    # stable_rank_range(n) = max(1, ceil(n / 10)), as an expression
    limit = pl.max_horizontal(pl.lit(1), (pl.col("n_in_table") + 9) // 10)
    table = table.with_columns(
        pl.when(pl.col("rank_range").is_null() | (pl.col("n_seeds") < 2)).then(None)
        .otherwise(pl.col("rank_range") <= limit).alias("stable")
    ).drop("n_in_table")
    order = pl.col("table").replace_strict({t: i for i, t in enumerate(TABLES)}, default=9)
    ceiling_key = f"{schema.rank_key('ceiling')}_median"
    return (table.with_columns(order.alias("_order"), (-pl.col(ceiling_key)).alias("_j"))
            .sort(["_order", "rank_median", "_j", "hypothesis"], nulls_last=True)
            .drop(["_order", "_j"]))


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b (ties handled) of two paired score lists; NaN for fewer than 2 pairs."""
    from scipy.stats import kendalltau

    if len(x) < 2:
        return math.nan
    tau = kendalltau(x, y).statistic
    return math.nan if tau is None else float(tau)


def kendall_taus(results: RunResults) -> pl.DataFrame:
    """Kendall τ-b between every pair of diff rankings, per ranked table.

    Columns: table, diff_a, diff_b, n (hypotheses ranked on both diffs, at least 2), tau.
    """
    frame = per_seed(results).filter(pl.col("rank").is_not_null())
    rows = []
    for table in TABLES[:2]:
        part = frame.filter(pl.col("table") == table)
        keys = {
            diff: dict(zip(g["hypothesis"], g["rank_key"], strict=True))
            for (diff,), g in part.group_by(["diff"], maintain_order=True)
        }
        for a, b in combinations(sorted(keys), 2):
            common = sorted(set(keys[a]) & set(keys[b]))
            if len(common) < 2:
                continue
            tau = kendall_tau([keys[a][h] for h in common], [keys[b][h] for h in common])
            rows.append({"table": table, "diff_a": a, "diff_b": b, "n": len(common), "tau": tau})
    schema_ = {"table": pl.String, "diff_a": pl.String, "diff_b": pl.String, "n": pl.Int64,
               "tau": pl.Float64}
    return pl.DataFrame(rows, schema=schema_)


def _stability_lines(table: pl.DataFrame, taus: pl.DataFrame, name: str) -> list[str]:
    lines = []
    part_tau = taus.filter(pl.col("table") == name)
    if not part_tau.is_empty():
        pairs = ", ".join(f"{r['diff_a']}~{r['diff_b']} {r['tau']:.2f}"
                          for r in part_tau.iter_rows(named=True))
        lines.append(f"    Kendall τ between seed rankings: {pairs} "
                     f"(median {part_tau['tau'].median():.2f})")
    part = table.filter((pl.col("table") == name) & pl.col("stable").is_not_null())
    if not part.is_empty():
        n_ranked = table.filter(pl.col("table") == name).height
        unstable = part.filter(~pl.col("stable"))
        text = ", ".join(f"{r['hypothesis']} ({r['rank_min']:.0f}-{r['rank_max']:.0f})"
                         for r in unstable.iter_rows(named=True))
        lines.append(f"    stable (rank range ≤ {stable_rank_range(n_ranked)} over seeds): "
                     f"{part.height - unstable.height}/{part.height}"
                     + (f"; unstable: {text}" if text else ""))
    return lines


def _cell(value: float | None, column: str) -> str:
    if value is None:
        return f"{'—':>8}"
    return f"{value:8.1f}" if column.startswith("z_") else f"{value:8.2f}"


def summary_lines(results: RunResults, width: int = 28) -> list[str]:
    """The terminal ranking: write/mixed and read tables apart, ceilings for scale; τ, stability."""
    if results.empty:
        return [f"no scores: {results.errors.get('<run>', 'no hypothesis was scored')}"]
    table = aggregate(results)
    width = max([width] + [len(name) for name in table["hypothesis"]])
    taus = kendall_taus(results)
    columns = schema.terminal_columns()
    lines: list[str] = []
    for name in TABLES:
        part = table.filter(pl.col("table") == name)
        if part.is_empty():
            continue
        key = schema.label(schema.rank_key(name))
        how = "not ranked; shown for scale" if name == "ceiling" else f"rank by {key}"
        lines.append(f"--- {name} (median over {part['n_seeds'].max()} seeds; {how}) ---")
        lines.append(f"{'rank':>5} {'hypothesis':<{width}} "
                     + " ".join(f"{header:>8}" for _, header in columns)
                     + f" {'range':>7}  family")
        for row in part.iter_rows(named=True):
            rank = row["rank_median"]
            span = ("" if row["rank_min"] is None
                    else f"{row['rank_min']:.0f}-{row['rank_max']:.0f}"
                    + ("" if row["stable"] is not False else "!"))
            cells = " ".join(_cell(row[f"{col}_median"], col) for col, _ in columns)
            lines.append(f"{'—' if rank is None else f'{rank:5.1f}':>5} {row['hypothesis']:<{width}} "
                         f"{cells} {span:>7}  {row['family']}")
        lines += _stability_lines(table, taus, name)
    if table["stable"].is_not_null().any():
        lines.append("range: rank min-max over seeds; '!' marks an unstable hypothesis")
    for name, message in sorted(results.errors.items()):
        lines.append(f"EXCLUDED {name}: {message}")
    return lines
