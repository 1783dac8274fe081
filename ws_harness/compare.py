"""`ws-harness compare`: rankings of runs of different adapter families or diff sets side by side, with τ."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import polars as pl

from ws_harness import schema
from ws_harness.merge import MergeError, Shard, load_run
from ws_harness.ranking import aggregate, kendall_taus
from ws_harness.results import RunResults
from ws_harness.schema import TABLES

__all__ = [
    "CompareError",
    "ComparedRun",
    "CompareOutcome",
    "EXIT_OK",
    "EXIT_REFUSED",
    "COMPARED_KEYS",
    "RANKING_FILE",
    "TAU_FILE",
    "MARKDOWN_FILE",
    "PLOT_FILE",
    "TOP_N",
    "run_name",
    "load_runs",
    "check_comparable",
    "ranking_by_run",
    "kendall_tau_between_runs",
    "comparison_md",
    "comparison_plot",
    "compare_runs",
    "add_compare_parser",
    "run_compare",
]

EXIT_OK = 0
EXIT_REFUSED = 2  # nothing written: a folder holds no run, a name is bad, or the runs do not fit

# Dotted inputs.json keys that must be equal: another model, behaviour or k ranks other things.
COMPARED_KEYS = ("model.spec", "model.fingerprint", "behaviour.name", "behaviour.fingerprint",
                 "rank")
RANKING_FILE = "ranking_by_run.csv"
TAU_FILE = "kendall_tau_between_runs.csv"
MARKDOWN_FILE = "comparison.md"
PLOT_FILE = "comparison.png"
TOP_N = 10  # hypotheses per run in the markdown's side-by-side table
_RANKED_TABLES = TABLES[:2]  # write/mixed and read; ceilings are shown for scale, never ranked
_LABELLED = 3  # per panel: the top of each run and the largest rank changes are named
# Names become column suffixes (rank_<name>) and markdown headers: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_DESCRIPTION = ("Compare the rankings of finished runs that differ in their diffs (adapter "
                "family, diff set, seeds) but share model, behaviour and rank: rankings side "
                "by side and Kendall τ between every pair of runs.")
_TAU_MEANING = (
    "Kendall τ-b between two runs' rankings (each hypothesis's median rank over that run's "
    "seeds), on the hypotheses both runs ranked in that table: +1 is the same order, 0 orders "
    "that are unrelated, −1 the reverse order; p is scipy's two-sided test of τ = 0 and n the "
    "number of hypotheses compared. Read it against each run's own seed-to-seed τ: a τ between "
    "runs as high as those means the runs order the hypotheses as consistently as reseeding "
    "one run does; a clearly lower τ means the family (or diff set) changes the ranking.")


class CompareError(ValueError):
    """The runs cannot be compared (or a folder holds no run); the message says why and the fix."""


@dataclass
class ComparedRun:
    """One run to compare: its name, output folder, results and ranking (``aggregate``)."""

    name: str
    shard: Shard
    ranking: pl.DataFrame

    @property
    def out(self) -> Path:
        return self.shard.out

    @property
    def results(self) -> RunResults:
        return self.shard.results

    @property
    def adapter_family(self) -> str | None:
        family = (self.results.inputs.get("diff") or {}).get("adapter_family")
        return None if family is None else str(family)

    def ranks(self, table: str) -> dict[str, float]:
        """Hypothesis → median rank, for the hypotheses this run ranked in `table`."""
        part = self.ranking.filter((pl.col("table") == table) & pl.col("rank_median").is_not_null())
        return dict(zip(part["hypothesis"], part["rank_median"], strict=True))


@dataclass
class CompareOutcome:
    """What :func:`compare_runs` wrote: the runs, both tables and the files by name."""

    runs: list[ComparedRun]
    ranking: pl.DataFrame
    taus: pl.DataFrame
    out: Path
    written: dict[str, Path] = field(default_factory=dict)


# ---- loading and checking ----------------------------------------------------------------


def run_name(shard: Shard) -> str:
    """A run's default name: its adapter family (built diffs), else its folder's name."""
    family = (shard.results.inputs.get("diff") or {}).get("adapter_family")
    return str(family) if family else shard.out.resolve().name


def _check_names(names: Sequence[str], outs: Sequence[Path], given: bool) -> None:
    how = "--names" if given else "the runs' adapter families / folder names"
    fix = ("pass other names" if given else
           "name the runs yourself, e.g. --names " + ",".join(f"run{i + 1}" for i in range(len(outs))))
    for name, out in zip(names, outs, strict=True):
        if not _NAME.fullmatch(name):
            raise CompareError(f"run name {name!r} (for {out}, from {how}) is not a plain name: use "
                               f"letters, digits and _.+- only; {fix}")
    seen: dict[str, Path] = {}
    for name, out in zip(names, outs, strict=True):
        if name in seen:
            raise CompareError(f"run name {name!r} is given twice ({seen[name]} and {out}, from "
                               f"{how}); every run needs its own name: {fix}")
        seen[name] = out


def load_runs(outs: Sequence[Path | str], names: Sequence[str] | None = None) -> list[ComparedRun]:
    """The runs in folders `outs`, named by `names` or :func:`run_name`; CompareError if a folder
    holds no run, a name is not plain or appears twice, or `names` does not match `outs`."""
    paths = [Path(o) for o in outs]
    if len(paths) < 2:
        raise CompareError(f"compare needs at least two runs' output folders, got {len(paths)}; "
                           "sweep once per family (--ws-adapter X --ws-out out-X) and pass them all")
    if names is not None and len(names) != len(paths):
        raise CompareError(f"--names gives {len(names)} names ({','.join(names)}) for {len(paths)} "
                           "runs; give one name per run, in the order of the folders")
    try:
        shards = [load_run(p) for p in paths]  # merge's loader: results.json with scores and inputs
    except MergeError as exc:
        raise CompareError(str(exc)) from None
    chosen = list(names) if names is not None else [run_name(s) for s in shards]
    _check_names(chosen, paths, given=names is not None)
    return [ComparedRun(name, shard, aggregate(shard.results))
            for name, shard in zip(chosen, shards, strict=True)]


_MISSING = object()


def _lookup(inputs: dict[str, Any], key: str) -> Any:
    node: Any = inputs
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _show(value: Any, limit: int = 100) -> str:
    text = "(not recorded)" if value is _MISSING else json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_comparable(runs: Sequence[ComparedRun]) -> None:
    """Refuse (CompareError) runs whose model, behaviour or rank k differ from the first run's.

    Families, diff sets, seeds and catalogs may differ: that is what is compared (τ is taken
    over the hypotheses both runs ranked).
    """
    first = runs[0]
    for run in runs[1:]:
        for key in COMPARED_KEYS:
            va, vb = _lookup(first.results.inputs, key), _lookup(run.results.inputs, key)
            if json.dumps(va, default=str, sort_keys=True) != json.dumps(vb, default=str, sort_keys=True):
                raise CompareError(
                    f"cannot compare {run.out} with {first.out}: {key} differs: {first.out} has "
                    f"{_show(va)}, {run.out} has {_show(vb)}. Runs to compare must share model, "
                    "behaviour and rank k (families, diff sets and seeds may differ); rerun the "
                    "odd one with the others' --ws-model, --ws-behaviour and --ws-rank")


# ---- the tables --------------------------------------------------------------------------


def _primary_score() -> pl.Expr:
    """Each row's table's ranking score (median over seeds), as ``per_seed`` picks rank_key."""
    score = pl.lit(None, dtype=pl.Float64)
    for table in TABLES:
        column = f"{schema.rank_key(table)}_median"
        score = pl.when(pl.col("table") == table).then(pl.col(column)).otherwise(score)
    return score


def _score_name() -> pl.Expr:
    return pl.col("table").replace_strict({t: schema.rank_key(t) for t in TABLES},
                                          default=None, return_dtype=pl.String)


def ranking_by_run(runs: Sequence[ComparedRun]) -> pl.DataFrame:
    """One row per (table, hypothesis) over all runs: ``rank_<run>`` and ``score_<run>``.

    Columns: table, hypothesis, family, axis_kind, primary_score (the metric ranked by), then
    per run its median rank (null: not ranked there, or a ceiling) and median primary score,
    then rank_mean and rank_range over the runs that ranked it. Sorted by table, rank_mean,
    then mean score (ceilings), then name.
    """
    keys = ["table", "hypothesis"]
    # Identity columns from the first run holding the hypothesis (catalogs may differ).
    identity = pl.concat([r.ranking.select([*keys, "family", "axis_kind"]) for r in runs],
                         how="vertical_relaxed").unique(subset=keys, keep="first", maintain_order=True)
    frame = identity.with_columns(_score_name().alias("primary_score"))
    for run in runs:
        part = run.ranking.select(
            *keys, pl.col("rank_median").cast(pl.Float64).alias(f"rank_{run.name}"),
            _primary_score().cast(pl.Float64).alias(f"score_{run.name}"))
        frame = frame.join(part, on=keys, how="left")
    rank_cols = [f"rank_{r.name}" for r in runs]
    score_cols = [f"score_{r.name}" for r in runs]
    frame = frame.with_columns(
        pl.mean_horizontal(rank_cols).alias("rank_mean"),
        (pl.max_horizontal(rank_cols) - pl.min_horizontal(rank_cols)).alias("rank_range"),
    )
    order = pl.col("table").replace_strict({t: i for i, t in enumerate(TABLES)}, default=len(TABLES))
    return (frame.with_columns(order.alias("_order"), (-pl.mean_horizontal(score_cols)).alias("_score"))
            .sort(["_order", "rank_mean", "_score", "hypothesis"], nulls_last=True)
            .drop(["_order", "_score"]))


def _pair_tau(a: dict[str, float], b: dict[str, float]) -> tuple[int, float, float]:
    """(n, τ-b, two-sided p) of two rank maps over their shared hypotheses; NaN below 2."""
    from scipy.stats import kendalltau

    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return len(common), math.nan, math.nan
    result = kendalltau([a[h] for h in common], [b[h] for h in common])
    tau = math.nan if result.statistic is None else float(result.statistic)
    p = math.nan if result.pvalue is None else float(result.pvalue)
    return len(common), tau, p


def kendall_tau_between_runs(runs: Sequence[ComparedRun]) -> pl.DataFrame:
    """Kendall τ-b between every pair of runs' median ranks, per ranked table.

    Columns: table, run_a, run_b (in the order given), n (hypotheses ranked by both), tau,
    p_value. Pairs sharing fewer than 2 ranked hypotheses are left out, as ``kendall_taus``
    leaves out seed pairs.
    """
    rows = []
    for table in _RANKED_TABLES:
        for a, b in combinations(runs, 2):
            n, tau, p = _pair_tau(a.ranks(table), b.ranks(table))
            if n >= 2:
                rows.append({"table": table, "run_a": a.name, "run_b": b.name, "n": n, "tau": tau,
                             "p_value": p})
    schema_ = {"table": pl.String, "run_a": pl.String, "run_b": pl.String, "n": pl.Int64,
               "tau": pl.Float64, "p_value": pl.Float64}
    return pl.DataFrame(rows, schema=schema_)


# ---- the markdown ------------------------------------------------------------------------


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _seed_taus(run: ComparedRun) -> dict[str, float | None]:
    """Per ranked table, the median τ between this run's own seed rankings (None: one seed)."""
    taus = kendall_taus(run.results)
    out: dict[str, float | None] = {}
    for table in _RANKED_TABLES:
        part = taus.filter(pl.col("table") == table)["tau"].drop_nans()
        out[table] = None if part.is_empty() else float(part.median())
    return out


def _runs_section(runs: Sequence[ComparedRun]) -> list[str]:
    first = runs[0].results.inputs
    lines = [
        "| run | folder | adapter family | diffs (seed) | seed-to-seed τ, "
        + ", ".join(f"{t} (median)" for t in _RANKED_TABLES) + " |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        diffs = ", ".join(f"{d.get('name')}" + ("" if d.get("seed") is None else f" ({d.get('seed')})")
                          for d in run.shard.diffs)
        seed_taus = _seed_taus(run)
        lines.append(f"| {run.name} | `{run.out}` | {run.adapter_family or '—'} | {diffs} | "
                     + ", ".join(_num(seed_taus[t]) for t in _RANKED_TABLES) + " |")
    model = _lookup(first, "model.spec")
    behaviour = _lookup(first, "behaviour.name")
    keys = ", ".join(f"{t} by {schema.label(schema.rank_key(t))}" for t in _RANKED_TABLES)
    lines += ["", f"All runs: model `{model}`, behaviour `{behaviour}`, rank k = {first.get('rank')}. "
              f"Ranked {keys} (median over each run's seeds); a cell is "
              "`hypothesis (median rank, median score)`."]
    return lines


def _top_section(runs: Sequence[ComparedRun], table: str, top_n: int) -> list[str]:
    score = schema.label(schema.rank_key(table))
    tops = []
    for run in runs:
        part = (run.ranking.filter((pl.col("table") == table) & pl.col("rank_median").is_not_null())
                .sort(["rank_median", "hypothesis"]).head(top_n))
        tops.append([f"{r['hypothesis']} ({_num(r['rank_median'], 'g')}, "
                     f"{_num(r[f'{schema.rank_key(table)}_median'], '.3g')})"
                     for r in part.iter_rows(named=True)])
    depth = max((len(t) for t in tops), default=0)
    if depth == 0:
        return []
    lines = [f"## {table}: top {top_n} per run (by {score})", "",
             "| # | " + " | ".join(r.name for r in runs) + " |",
             "|---:|" + "---|" * len(runs)]
    for i in range(depth):
        # A run that ranked nothing in this table says so once, in the first row.
        cells = [t[i] if i < len(t) else ("(none ranked)" if i == 0 else "") for t in tops]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return lines + [""]


def _largest_move(ranking: pl.DataFrame, table: str, a: str, b: str) -> str:
    part = ranking.filter((pl.col("table") == table) & pl.col(f"rank_{a}").is_not_null()
                          & pl.col(f"rank_{b}").is_not_null())
    if part.is_empty():
        return "—"
    part = part.with_columns((pl.col(f"rank_{b}") - pl.col(f"rank_{a}")).abs().alias("_move"))
    row = part.sort(["_move", "hypothesis"], descending=[True, False]).row(0, named=True)
    if row["_move"] == 0:
        return "none (same ranks)"
    return f"{row['hypothesis']} ({_num(row[f'rank_{a}'], 'g')} → {_num(row[f'rank_{b}'], 'g')})"


def _tau_section(runs: Sequence[ComparedRun], ranking: pl.DataFrame, taus: pl.DataFrame,
                 table: str) -> list[str]:
    part = taus.filter(pl.col("table") == table)
    if part.is_empty():
        return []
    pairs = {(r["run_a"], r["run_b"]): r for r in part.iter_rows(named=True)}
    names = [r.name for r in runs]
    lines = [f"### Kendall τ between runs, {table}", "",
             "| τ | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for run in runs:
        cells = []
        for other in runs:
            if other is run:
                _, tau, _ = _pair_tau(run.ranks(table), run.ranks(table))  # 1 unless all tied
            else:
                row = pairs.get((run.name, other.name)) or pairs.get((other.name, run.name))
                tau = None if row is None else row["tau"]
            cells.append(_num(tau))
        lines.append(f"| **{run.name}** | " + " | ".join(cells) + " |")
    lines += ["", "| pair | τ | p | n | largest rank change |", "|---|---:|---:|---:|---|"]
    for row in part.iter_rows(named=True):
        move = _largest_move(ranking, table, row["run_a"], row["run_b"])
        lines.append(f"| {row['run_a']} ~ {row['run_b']} | {_num(row['tau'])} | "
                     f"{_num(row['p_value'], '.2g')} | {row['n']} | {move} |")
    return lines + [""]


def comparison_md(runs: Sequence[ComparedRun], ranking: pl.DataFrame, taus: pl.DataFrame,
                  top_n: int = TOP_N) -> str:
    """The runs, the top `top_n` of each run side by side per table, and the τ matrix."""
    lines = ["# Comparison of " + ", ".join(r.name for r in runs), ""]
    lines += _runs_section(runs) + [""]
    for table in _RANKED_TABLES:
        lines += _top_section(runs, table, top_n)
    lines += ["## Agreement between the runs' rankings", "", _TAU_MEANING, ""]
    for table in _RANKED_TABLES:
        lines += _tau_section(runs, ranking, taus, table)
    if taus.is_empty():
        lines += ["No pair of runs shares two ranked hypotheses: no τ to show.", ""]
    lines += [f"Every hypothesis's rank and score per run: `{RANKING_FILE}`; the pairs: `{TAU_FILE}`; "
              f"rank against rank per pair: `{PLOT_FILE}`."]
    return "\n".join(lines) + "\n"


# ---- the plot ----------------------------------------------------------------------------


def comparison_plot(runs: Sequence[ComparedRun], ranking: pl.DataFrame, taus: pl.DataFrame,
                    path: Path) -> Path:
    """Rank in one run against rank in the other, one panel per (ranked table, pair of runs).

    Points on the diagonal keep their rank; each run's top 3 and the 3 largest rank changes
    are named. Written with matplotlib's Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)  # as the run's reports: no display needed
    import matplotlib.pyplot as plt

    panels = []
    for table in _RANKED_TABLES:
        for a, b in combinations(runs, 2):
            ra, rb = f"rank_{a.name}", f"rank_{b.name}"
            part = ranking.filter((pl.col("table") == table) & pl.col(ra).is_not_null()
                                  & pl.col(rb).is_not_null())
            if not part.is_empty():
                panels.append((table, a.name, b.name, part))
    ncols = max(1, min(3, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 5.0 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    if not panels:
        axes[0][0].text(0.5, 0.5, "no pair of runs shares two ranked hypotheses", ha="center")
    for ax, (table, a, b, part) in zip(axes.flat, panels):
        x, y = part[f"rank_{a}"].to_list(), part[f"rank_{b}"].to_list()
        top = max(x + y)
        ax.plot([0.5, top + 0.5], [0.5, top + 0.5], color="0.75", lw=1, zorder=0)
        ax.scatter(x, y, s=28, color="tab:blue" if table == "write/mixed" else "tab:orange",
                   edgecolor="white", linewidth=0.5, zorder=2)
        moved = part.with_columns((pl.col(f"rank_{b}") - pl.col(f"rank_{a}")).abs().alias("_move"))
        named = set(moved.sort([f"rank_{a}", "hypothesis"]).head(_LABELLED)["hypothesis"])
        named |= set(moved.sort([f"rank_{b}", "hypothesis"]).head(_LABELLED)["hypothesis"])
        named |= set(moved.filter(pl.col("_move") > 0)
                     .sort(["_move", "hypothesis"], descending=[True, False])
                     .head(_LABELLED)["hypothesis"])
        for row in part.filter(pl.col("hypothesis").is_in(sorted(named))).iter_rows(named=True):
            ax.annotate(row["hypothesis"], (row[f"rank_{a}"], row[f"rank_{b}"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        pair = taus.filter((pl.col("table") == table) & (pl.col("run_a") == a) & (pl.col("run_b") == b))
        tau = f"τ = {_num(pair['tau'][0])}, n = {pair['n'][0]}" if pair.height else "τ: —"
        ax.set_title(f"{table}: {a} vs {b} ({tau})", fontsize=10)
        ax.set_xlabel(f"median rank in {a} (1 = best)")
        ax.set_ylabel(f"median rank in {b}")
        ax.set_xlim(0.5, top + 0.5)
        ax.set_ylim(top + 0.5, 0.5)  # rank 1 at the top left: the best stay in the corner
        ax.grid(True, color="0.92", lw=0.6)
    fig.suptitle("Rank against rank between runs (on the grey diagonal: same rank)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- everything --------------------------------------------------------------------------


def compare_runs(outs: Sequence[Path | str], out: Path | str, *,
                 names: Sequence[str] | None = None) -> CompareOutcome:
    """Load and check the runs in `outs`, and write the comparison into `out`.

    Unlike ``merge`` (one configuration split by seed), the runs are meant to differ in their
    diffs (adapter family, diff set, seeds); they must share model, behaviour and rank k
    (:data:`COMPARED_KEYS`). Each run keeps its own ranking snapshot; nothing is gated here.
    Written: :data:`RANKING_FILE` (:func:`ranking_by_run`), :data:`TAU_FILE`
    (:func:`kendall_tau_between_runs`), :data:`MARKDOWN_FILE` (:func:`comparison_md`) and
    :data:`PLOT_FILE` (:func:`comparison_plot`).

    CompareError (nothing written) when a folder holds no run, `out` is one of them, a name is
    bad or repeated, or the runs differ in model, behaviour or rank.
    """
    target = Path(out).resolve()
    if any(Path(o).resolve() == target for o in outs):
        raise CompareError(f"--out {out} is one of the runs being compared; write the comparison "
                           "to a new folder")
    runs = load_runs(outs, names)
    check_comparable(runs)
    ranking = ranking_by_run(runs)
    taus = kendall_tau_between_runs(runs)
    outcome = CompareOutcome(runs, ranking, taus, Path(out))
    outcome.out.mkdir(parents=True, exist_ok=True)
    ranking.write_csv(outcome.out / RANKING_FILE)
    taus.write_csv(outcome.out / TAU_FILE)
    (outcome.out / MARKDOWN_FILE).write_text(comparison_md(runs, ranking, taus), encoding="utf-8")
    comparison_plot(runs, ranking, taus, outcome.out / PLOT_FILE)
    outcome.written = {"ranking_by_run": outcome.out / RANKING_FILE, "kendall_tau": outcome.out / TAU_FILE,
                       "comparison": outcome.out / MARKDOWN_FILE, "plot": outcome.out / PLOT_FILE}
    return outcome


# ---- the command -------------------------------------------------------------------------


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``compare`` to `subparsers` (``ArgumentParser.add_subparsers()``); returns its parser.

    The parser's default ``handler`` is :func:`run_compare`.
    """
    parser = subparsers.add_parser(
        "compare", help="rankings of runs of different adapter families or diff sets side by side, "
                        "with Kendall τ between them", description=_DESCRIPTION)
    parser.add_argument("runs", nargs="+", type=Path, metavar="OUT",
                        help="output folders (--ws-out) of the runs to compare, at least two")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the comparison (not one of the inputs)")
    parser.add_argument("--names", default=None,
                        help="comma-separated run names, one per OUT in order (default: each "
                             "run's adapter family, else its folder's name)")
    parser.set_defaults(handler=run_compare)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def run_compare(args: argparse.Namespace) -> int:
    """Run ``compare`` from parsed arguments; prints τ per pair and what was written.

    Exit codes: 0 written, 2 refused (one ``error: …`` line on stderr, nothing written).
    """
    names = None if args.names is None else [n.strip() for n in args.names.split(",")]
    try:
        outcome = compare_runs(args.runs, args.out, names=names)
    except CompareError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_REFUSED
    print("compared " + ", ".join(f"{r.name} ({r.out})" for r in outcome.runs))
    for row in outcome.taus.iter_rows(named=True):
        print(f"  {row['table']}: Kendall τ {row['run_a']}~{row['run_b']} {_num(row['tau'])} "
              f"(p {_num(row['p_value'], '.2g')}, n {row['n']})")
    print(f"wrote {outcome.out}: " + ", ".join(p.name for p in outcome.written.values()))
    return EXIT_OK
