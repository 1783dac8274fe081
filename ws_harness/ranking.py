"""Rankings across diff seeds (SPEC §6): per-hypothesis medians, IQRs and ranks by `joint`."""

from __future__ import annotations

import polars as pl

from ws_harness.results import RunResults

__all__ = ["SCORE_COLUMNS", "aggregate", "summary_lines"]

SCORE_COLUMNS = ["joint", "r_act", "r_w_combined", "r_w_oproj", "r_w_downproj",
                 "pct_oracle_act", "pct_oracle_w_combined", "z_act", "z_w_combined",
                 "act_w_gap_log2", "overlap_w"]


def _ranked(frame: pl.DataFrame) -> pl.DataFrame:
    """Rank by joint (write/mixed) or R_act (read, which has no meaningful joint) within each seed."""
    key = pl.when(pl.col("axis_kind") == "read").then(pl.col("r_act")).otherwise(pl.col("joint"))
    group = pl.when(pl.col("axis_kind") == "read").then(pl.lit("read")).otherwise(
        pl.when(pl.col("axis_kind") == "ceiling").then(pl.lit("ceiling")).otherwise(
            pl.lit("write/mixed")))
    return (
        frame.with_columns(group.alias("table"), key.fill_nan(None).alias("rank_key"))
        .with_columns(
            pl.col("rank_key").rank(method="min", descending=True).over(["seed", "table"])
            .alias("rank")
        )
    )


def aggregate(results: RunResults) -> pl.DataFrame:
    """One row per hypothesis: median and IQR over seeds of each score and of its rank."""
    frame = _ranked(pl.DataFrame(results.summaries, infer_schema_length=None))
    aggs = []
    for col in SCORE_COLUMNS + ["rank"]:
        c = pl.col(col).cast(pl.Float64).fill_nan(None)
        aggs += [c.median().alias(f"{col}_median"),
                 (c.quantile(0.75, "linear") - c.quantile(0.25, "linear")).alias(f"{col}_iqr")]
    aggs += [pl.col("rank").min().alias("rank_min"), pl.col("rank").max().alias("rank_max"),
             pl.len().alias("n_seeds")]
    return (
        frame.group_by(["hypothesis", "family", "axis_kind", "table"]).agg(aggs)
        .sort(["table", "rank_median", "hypothesis"], nulls_last=True)
    )


def summary_lines(results: RunResults, width: int = 28) -> list[str]:
    """The terminal ranking: write/mixed and read tables apart, ceilings for scale."""
    if results.empty:
        return [f"no scores: {results.errors.get('<run>', 'no hypothesis was scored')}"]
    table = aggregate(results)
    lines: list[str] = []
    for name in ("write/mixed", "read", "ceiling"):
        part = table.filter(pl.col("table") == name)
        if part.is_empty():
            continue
        lines.append(f"--- {name} (median over {part['n_seeds'].max()} seeds; rank by "
                     f"{'R_act' if name == 'read' else 'joint'}) ---")
        lines.append(f"{'rank':>5} {'hypothesis':<{width}} {'joint':>7} {'R_act':>7} "
                     f"{'R_w':>7} {'pct_act':>7} {'z_act':>7} {'z_w':>7}  family")
        for row in part.iter_rows(named=True):
            def fmt(key: str, spec: str = "7.2f") -> str:
                value = row[f"{key}_median"]
                return f"{value:{spec}}" if value is not None else f"{'—':>7}"
            rank = row["rank_median"]
            lines.append(
                f"{'' if rank is None else f'{rank:5.1f}':>5} {row['hypothesis']:<{width}} "
                f"{fmt('joint')} {fmt('r_act')} {fmt('r_w_combined')} {fmt('pct_oracle_act')} "
                f"{fmt('z_act', '7.1f')} {fmt('z_w_combined', '7.1f')}  {row['family']}"
            )
    for name, message in sorted(results.errors.items()):
        lines.append(f"EXCLUDED {name}: {message}")
    return lines
