"""A run's results as tables: per-layer rows, per-seed summaries, claims, inputs.json; merged over workers."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from ws_harness import schema

if TYPE_CHECKING:
    from ws_harness.scoreboard import Scoreboard

__all__ = ["RunResults", "collect_results", "write_tables", "read_tables"]

_KEYS = {"rows": ("diff", "hypothesis", "layer"), "summaries": ("diff", "hypothesis"),
         "claims": ("diff", "hypothesis", "claim")}


@dataclass
class RunResults:
    """Everything the reports need, JSON-serialisable so xdist workers can hand it to the controller."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    claims: list[dict[str, Any]] = field(default_factory=list)
    hypotheses: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # per process: phase → s

    def to_json(self) -> str:
        # Shallow: json.dumps walks the nested dicts itself; asdict's deep copy of ~20k rows
        # cost 2.6 s of a warm run.
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, default=_jsonable)

    @classmethod
    def from_json(cls, text: str) -> RunResults:
        return cls(**json.loads(text))

    def merge(self, other: RunResults) -> RunResults:
        """Union of two workers' results (identical entries appear once; both computed them)."""

        def union(a: list[dict], b: list[dict], key: tuple[str, ...]) -> list[dict]:
            seen = {tuple(r[k] for k in key): r for r in a}
            for r in b:
                seen.setdefault(tuple(r[k] for k in key), r)
            return [seen[k] for k in sorted(seen, key=str)]

        return RunResults(
            rows=union(self.rows, other.rows, _KEYS["rows"]),
            summaries=union(self.summaries, other.summaries, _KEYS["summaries"]),
            claims=union(self.claims, other.claims, _KEYS["claims"]),
            hypotheses={**other.hypotheses, **self.hypotheses},
            errors={**other.errors, **self.errors},
            inputs=self.inputs or other.inputs,
            timings={**other.timings, **self.timings},
        )

    @property
    def empty(self) -> bool:
        return not self.summaries

    def ordered(self) -> RunResults:
        """The same results in one canonical row order (diff, hypothesis, layer/claim), so the
        tables do not depend on how many workers produced them or in which order."""

        def order(records: list[dict], key: tuple[str, ...]) -> list[dict]:
            return sorted(records, key=lambda r: tuple(_sort_key(r.get(k)) for k in key))

        return RunResults(
            rows=order(self.rows, _KEYS["rows"]), summaries=order(self.summaries, _KEYS["summaries"]),
            claims=order(self.claims, _KEYS["claims"]),
            hypotheses=dict(sorted(self.hypotheses.items())), errors=dict(sorted(self.errors.items())),
            inputs=self.inputs, timings=dict(sorted(self.timings.items())),
        )


def _sort_key(value: Any) -> tuple[int, Any]:
    # Numbers numerically (layer 2 before layer 10), then strings; None first.
    if value is None:
        return (0, 0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value)
    return (2, str(value))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def collect_results(board: Scoreboard) -> RunResults:
    """Scores of every registered hypothesis for every diff, with claims and run inputs."""
    scores = board.all_scores()
    measured = board.measured_summaries() if scores else {}
    claims = []
    for (name, diff_name, claim), value in sorted(board.claims.items()):
        hyp = board.hypotheses[name]
        recorded = hyp.expects_refuted(claim, board.seed_of(diff_name), diff_name)
        claims.append({**board.identity(hyp, diff_name), "claim": claim, **value,
                       "expected_refuted": recorded,
                       "status": schema.classify(value["holds"], recorded)})
    return RunResults(
        rows=[row for result in scores.values() for row in result["rows"]],
        summaries=[{**result["summary"], **measured.get(key, {})}
                   for key, result in scores.items()],
        claims=claims,
        hypotheses={
            name: {"family": h.family, "axis_kind": h.axis, "scope": h.scope,
                   "definition": h.definition, "module": h.module, "file": h.file,
                   "oracle_of": h.oracle_of,
                   "refuted": {c: (None if s is None else list(s)) for c, s in h.refuted.items()}}
            for name, h in sorted(board.hypotheses.items())
        },
        errors=dict(board.errors),
        inputs=board.run_inputs() if scores else {},
        timings={os.environ.get("PYTEST_XDIST_WORKER", "main"): dict(board.session.timings)},
    )


def _frame(records: list[dict[str, Any]], first: list[str] | None = None) -> pl.DataFrame:
    if not records:
        return pl.DataFrame()
    # A missing score is NaN; a missing identity (the seed of a loaded diff file) is null.
    ids = set(schema.ID_COLUMNS)
    frame = pl.DataFrame(
        [{k: (math.nan if v is None and k not in ids else v) for k, v in r.items()}
         for r in records],
        infer_schema_length=None,
    )
    if "seed" in frame.columns:
        frame = frame.with_columns(pl.col("seed").cast(pl.Int64))
    if first:
        lead = [c for c in first if c in frame.columns]
        frame = frame.select(lead + [c for c in frame.columns if c not in lead])
    return frame


def write_tables(results: RunResults, out: Path) -> dict[str, Path]:
    """per_layer, summary and claims as CSV and Parquet, plus inputs.json and results.json."""
    out.mkdir(parents=True, exist_ok=True)
    results = results.ordered()
    written: dict[str, Path] = {}
    tables = {
        "per_layer": _frame(results.rows, schema.per_layer_columns()),
        "summary": _frame(results.summaries),
        "claims": _frame(results.claims),
    }
    for name, frame in tables.items():
        if frame.is_empty():
            continue
        frame.write_csv(out / f"{name}.csv")
        frame.write_parquet(out / f"{name}.parquet")
        written[name] = out / f"{name}.csv"
    (out / "inputs.json").write_text(json.dumps(results.inputs, indent=1, default=_jsonable))
    (out / "results.json").write_text(results.to_json())
    (out / "timings.json").write_text(json.dumps(results.timings, indent=1, sort_keys=True))
    written["inputs"] = out / "inputs.json"
    return written


def read_tables(out: Path) -> RunResults:
    """Reload a finished run's results (for `ws-harness report`)."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; run the sweep first (make sweep) or pass its --ws-out folder"
        )
    return RunResults.from_json(path.read_text())
