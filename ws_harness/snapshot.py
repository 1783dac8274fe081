"""Ranking snapshots and the regression gate (SPEC §6).

One snapshot file per model/diff configuration lives under ``snapshots/`` at the project root.
It records, per hypothesis, the median over diff seeds and the seed range of the gated scores
(``schema.gate_scores()``: joint, R_act, R_w_combined), each score's tolerance, the median rank and rank range
(ceilings: scores only, never ranked), the stability flag, and the Kendall τ between every pair
of seed rankings. One item, ``ws_ranking`` (:class:`RankingGateItem`, at the end of this
module), follows the hypothesis items; it aggregates this run's scores and compares them with
the snapshot of the same configuration.

**File name** (:func:`snapshot_name`), built from the run's inputs so that another configuration
never compares against the wrong record::

    ranking__<model>__<diffs>__k<rank>__<behaviour>.json
    ranking__smollm2-135m-instruct__build-scripted-s0.1.2__k8__sycophancy.json
    ranking__random-tiny__files-3f9a0c1d2e4b__k4__sycophancy.json

``<model>`` is the model spec (a local directory: its name plus the weights' fingerprint),
``<diffs>`` is ``build-<recipe>-s<seeds>`` for harness-built diffs or ``files-<hash>`` (a hash of
the diff files' tensor fingerprints) for diff files, ``<behaviour>`` the shipped behaviour name
(a custom ``.json`` adds its content fingerprint).

**Tolerance rule** (a regression is any of the three):

1. *A score moved beyond the seed spread.* For each hypothesis and gated score, in log2 units
   (R values are ratios to the null, so moves are relative)::

       tol = max(FLOOR, SPREAD_FACTOR · IQR over seeds of log2(score), CI)

   with ``FLOOR = 0.15`` (×/÷ 1.11: float and BLAS differences between machines stay far
   below it), ``SPREAD_FACTOR = 2`` (with three seeds the IQR is half the seed range, so the
   allowance is the full range of the recorded seeds) and, for ``R_act``, ``CI`` = the median
   over seeds of the half-width of the bootstrap 95% CI over EVAL prompts (half of it for
   ``joint``, which is the geometric mean with the exact ``R_w``). The *recorded* tolerance
   applies (a run with noisier seeds must not widen its own allowance). A move is
   ``|log2(new median / recorded median)| > tol``, and the same for each seed's value against
   its recorded value (one seed collapsing can leave the median in place). Every claim's
   metric is gated, so this is also the value band of claims recorded as refuted.
2. *A resolved order flipped.* Two hypotheses of one table whose recorded seed ranges of the
   ranking key (``joint``; ``R_act`` for read-side) do not overlap, with a gap wider than the
   floor, have a resolved order; the current medians reversing it is a regression. Orders
   within the seed noise may change freely, and adding a hypothesis shifts ranks without
   reversing any resolved order.
3. *The ranking as a whole changed.* Kendall τ-b between the recorded and the current medians
   of the ranking key, per table, must be at least ``TAU_MIN = 0.8`` (computed when at least
   ``TAU_MIN_N = 5`` hypotheses are in both).

A hypothesis recorded in the snapshot that this run collected but could not score (its builder
fails) is a regression; one not collected (deleted file, or a subset run) and a new hypothesis
not in the snapshot are only reported. Changed model, diff or behaviour fingerprints are
reported alongside, since they usually explain the moves.

**Rounding**: each score is stored to about two significant digits *of its tolerance* (the
rounding quantum is 1/10–1/100 of the allowed move), ranks as medians of integer ranks, τ to
two decimals: a rerun on the same machine writes byte-identical files, and the comparison never
depends on digits the noise does not support.

**Recording**: ``pytest hypotheses/ --ws-update-snapshots`` writes the snapshot for the run's
configuration instead of comparing; safe under ``-n N`` (only the one ``ws_ranking`` item
writes, under a file lock, atomically). ``pytest hypotheses/ -k ws_ranking
--ws-update-snapshots`` does the same from cached scores without the claim items. A missing
snapshot fails the gate with this command in the message.

Storage goes through syrupy's JSON extension (:class:`RankingSnapshotExtension`: its serializer
for a stable, reviewable file with one line per hypothesis, its reader and writer, and a
tolerance-aware ``matches``). The gate does not use syrupy's ``SnapshotAssertion`` session: its
unused-snapshot accounting only knows ``pytest.Function`` items and scans the whole snapshot
directory, so every *other* configuration's file would count as unused (failing the run, and
being deleted on ``--snapshot-update``), and its file names derive from the test location, not
from the configuration. (For the same reason syrupy's own ``--snapshot-dirname`` must not point
at ``snapshots/`` when a test uses syrupy's default amber ``snapshot`` fixture: amber claims
every unknown file in its directory as an unused snapshot.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from filelock import FileLock
from syrupy.data import Snapshot, SnapshotCollection
from syrupy.extensions.json import JSONSnapshotExtension

from ws_harness import schema
from ws_harness.ranking import TABLES, aggregate, kendall_tau, kendall_taus, per_seed
from ws_harness.results import RunResults

__all__ = [
    "FORMAT",
    "SPREAD_FACTOR",
    "TOLERANCE_FLOOR_LOG2",
    "TOLERANCE_FLOOR_LINEAR",
    "TAU_MIN",
    "TAU_MIN_N",
    "UPDATE_COMMAND",
    "SNAPSHOT_DIRNAME",
    "RankingSnapshotExtension",
    "Comparison",
    "GateOutcome",
    "snapshot_name",
    "build_record",
    "serialize",
    "read_snapshot",
    "write_snapshot",
    "compare",
    "check_ranking",
    "RANKING_NODEID",
    "RankingRegression",
    "RankingGateItem",
]

FORMAT = 2  # 2: per-seed values of every gated score
SNAPSHOT_DIRNAME = "snapshots"
SPREAD_FACTOR = 2.0
TOLERANCE_FLOOR_LOG2 = 0.15
# Scores that can be ≤ 0 (schema scale "linear", e.g. R_causal) move in absolute units: the
# floor is this much, or the log floor's relative allowance (×1.11) at the value if larger.
TOLERANCE_FLOOR_LINEAR = 0.15
TAU_MIN = 0.8
TAU_MIN_N = 5
UPDATE_COMMAND = "pytest hypotheses/ --ws-update-snapshots"
_EPS = 1e-12


# ---- naming --------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.") or "x"


def snapshot_name(inputs: dict[str, Any]) -> str:
    """The snapshot file name of a run's configuration (see the module docstring)."""
    model = inputs.get("model", {})
    spec = str(model.get("spec", "unknown"))
    if spec.startswith(("/", ".", "~")) or Path(spec).expanduser().is_dir():
        model_part = f"{_slug(Path(spec).name)}-{str(model.get('fingerprint', ''))[:8]}"
    else:
        model_part = _slug(spec)
    diff = inputs.get("diff", {})
    diffs = diff.get("diffs", [])
    if diff.get("mode") == "build":
        recipes = sorted({str(d.get("source", "")).split(":", 1)[1] for d in diffs
                          if str(d.get("source", "")).startswith("built:")}) or ["default"]
        seeds = ".".join(str(d.get("seed")) for d in diffs)
        diff_part = f"build-{'+'.join(recipes)}-s{seeds}"
    else:
        prints = "\n".join(sorted(str(d.get("fingerprint")) for d in diffs))
        diff_part = f"files-{hashlib.sha256(prints.encode()).hexdigest()[:12]}"
    behaviour = inputs.get("behaviour", {})
    behaviour_part = _slug(str(behaviour.get("name", "behaviour")))
    if not str(behaviour.get("source", "")).startswith("ws_harness/behaviours/"):
        behaviour_part += f"-{str(behaviour.get('fingerprint', ''))[:8]}"
    # Reduced-precision forwards move digits beyond what a float32 snapshot's tolerance is
    # for: they record and compare against their own snapshot (float32 on any device shares).
    dtype = str(inputs.get("forward", {}).get("dtype", "float32"))
    forward_part = "" if dtype == "float32" else f"__{_slug(dtype)}"
    return (f"ranking__{model_part}__{diff_part}__k{inputs.get('rank')}__{behaviour_part}"
            f"{forward_part}.json")


def _configuration(inputs: dict[str, Any]) -> dict[str, Any]:
    model, behaviour = inputs.get("model", {}), inputs.get("behaviour", {})
    return {
        "model": model.get("spec"), "model_fingerprint": model.get("fingerprint"),
        "diff_mode": inputs.get("diff", {}).get("mode"),
        "diffs": {d["name"]: d.get("fingerprint") for d in inputs.get("diff", {}).get("diffs", [])},
        "rank": inputs.get("rank"),
        "behaviour": behaviour.get("name"), "behaviour_fingerprint": behaviour.get("fingerprint"),
    }


# ---- the record ----------------------------------------------------------------------------


def _log2(x: float) -> float:
    return math.log2(max(x, _EPS))


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    s = pl.Series(values, dtype=pl.Float64)
    return float(s.quantile(0.75, "linear") - s.quantile(0.25, "linear"))


def _round_sig(x: float, digits: int = 2) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _is_log(score: str) -> bool:
    try:
        return schema.metric(score).scale == "log"
    except ValueError:  # a score of a recorded snapshot that this schema no longer has
        return True


def _t(score: str, x: float) -> float:
    """The scale the gate measures a score's moves on: log2 (ratios) or the value itself."""
    return _log2(x) if _is_log(score) else float(x)


def _floor(score: str, value: float | None = None) -> float:
    if _is_log(score):
        return TOLERANCE_FLOOR_LOG2
    relative = (2.0 ** TOLERANCE_FLOOR_LOG2 - 1.0) * abs(value) if value is not None else 0.0
    return max(TOLERANCE_FLOOR_LINEAR, relative)


def _tol_key(score: str) -> str:
    return f"{score}_tol_log2" if _is_log(score) else f"{score}_tol"


def _round_for(score: str, value: float | None, tol: float) -> float | None:
    if _is_log(score):
        return _round_to_tol(value, tol)
    if value is None or not math.isfinite(value):
        return None
    return round(value, 1 - math.floor(math.log10(tol))) + 0.0


def _round_to_tol(value: float | None, tol_log2: float) -> float | None:
    """Round to ~2 significant digits of the allowed move at this value (1/10–1/100 of it)."""
    if value is None or not math.isfinite(value):
        return None
    allowed = abs(value) * (1 - 2.0 ** -tol_log2)
    if allowed <= 0:
        return round(value, 6)
    return round(value, 1 - math.floor(math.log10(allowed))) + 0.0


def _finite(values: Any) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def build_record(results: RunResults) -> OrderedDict:
    """The snapshot content of a run: rounded scores, tolerances, ranks and seed τ values."""
    seeds = per_seed(results)
    table = aggregate(results)
    taus = kendall_taus(results)
    hypotheses: OrderedDict = OrderedDict()
    for row in table.iter_rows(named=True):
        name = row["hypothesis"]
        rows = seeds.filter(pl.col("hypothesis") == name)
        lo = _finite(rows["r_act_ci_lo"])
        hi = _finite(rows["r_act_ci_hi"])
        ci_half = (sorted((_log2(h) - _log2(l)) / 2 for l, h in zip(lo, hi, strict=True))
                   if lo and len(lo) == len(hi) else [])
        ci_act = ci_half[len(ci_half) // 2] if ci_half else 0.0
        entry: dict[str, Any] = {"table": row["table"], "family": row["family"]}
        if row["table"] != "ceiling":
            entry["rank"] = row["rank_median"]
            entry["rank_range"] = ([None, None] if row["rank_min"] is None
                                   else [int(row["rank_min"]), int(row["rank_max"])])
            entry["stable"] = row["stable"]
        for score in schema.gate_scores():
            values = _finite(rows[score])
            # joint is the geometric mean of R_act with the exact R_w: half R_act's CI.
            ci = {schema.CI_METRIC: ci_act, "joint": ci_act / 2}.get(score, 0.0)
            median = row[f"{score}_median"]
            tol = max(_floor(score, median), SPREAD_FACTOR * _iqr([_t(score, v) for v in values]),
                      ci)
            tol = _round_sig(tol)
            median = row[f"{score}_median"]
            entry[score] = _round_for(score, median, tol)
            entry[f"{score}_range"] = ([_round_for(score, min(values), tol),
                                        _round_for(score, max(values), tol)] if values else None)
            entry[_tol_key(score)] = tol
            # Each seed too: one diff collapsing can leave the median where it was.
            entry[f"{score}_seeds"] = OrderedDict(
                (str(d), _round_for(score, v, tol) if v is not None and math.isfinite(v) else None)
                for d, v in sorted(zip(rows["diff"].to_list(), rows[score].to_list())))
        entry["n_seeds"] = row["n_seeds"]
        hypotheses[name] = entry
    seed_taus: OrderedDict = OrderedDict()
    for t in ("write/mixed", "read"):
        part = taus.filter(pl.col("table") == t)
        if not part.is_empty():
            seed_taus[t] = OrderedDict(
                (f"{r['diff_a']}~{r['diff_b']}",
                 None if r["tau"] is None or math.isnan(r["tau"]) else round(r["tau"], 2))
                for r in part.iter_rows(named=True))
    return OrderedDict([
        ("format", FORMAT),
        ("configuration", _configuration(results.inputs)),
        ("rule", {"scores": list(schema.gate_scores()), "spread_factor": SPREAD_FACTOR,
                  "tolerance_floor_log2": TOLERANCE_FLOOR_LOG2,
                  "tolerance_floor_linear": TOLERANCE_FLOOR_LINEAR, "tau_min": TAU_MIN,
                  "tau_min_n": TAU_MIN_N}),
        ("n_seeds", int(seeds["diff"].n_unique())),
        ("kendall_tau_seeds", seed_taus),
        ("hypotheses", hypotheses),
    ])


# ---- storage through syrupy ----------------------------------------------------------------


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), allow_nan=False)


class RankingSnapshotExtension(JSONSnapshotExtension):
    """syrupy JSON extension: one line per hypothesis, and a tolerance-aware `matches`."""

    def serialize(self, data: Any, *, exclude: Any = None, include: Any = None,
                  matcher: Any = None) -> str:
        data = self._filter(data=data, depth=0, path=(), exclude=exclude, include=include,
                            matcher=matcher)
        lines = ["{"]
        items = list(data.items())
        for i, (key, value) in enumerate(items):
            comma = "," if i < len(items) - 1 else ""
            if isinstance(value, dict) and value:
                lines.append(f"  {_dump(key)}: {{")
                inner = list(value.items())
                for j, (k, v) in enumerate(inner):
                    sep = "," if j < len(inner) - 1 else ""
                    lines.append(f"    {_dump(k)}: {_dump(v)}{sep}")
                lines.append("  }" + comma)
            else:
                lines.append(f"  {_dump(key)}: {_dump(value)}{comma}")
        return "\n".join(lines + ["}"]) + "\n"

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        return compare(json.loads(snapshot_data), json.loads(serialized_data)).ok


def serialize(record: dict[str, Any]) -> str:
    return RankingSnapshotExtension().serialize(record)


def read_snapshot(path: Path) -> dict[str, Any] | None:
    """The recorded snapshot at `path`, or None when there is none."""
    text = RankingSnapshotExtension().read_snapshot_data_from_location(
        snapshot_location=str(path), snapshot_name=path.stem, session_id="ws-harness")
    return None if text is None else json.loads(text, object_pairs_hook=OrderedDict)


def write_snapshot(path: Path, record: dict[str, Any], lock_dir: Path | None = None) -> bool:
    """Write atomically under a file lock; returns whether the file content changed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_dir = Path(lock_dir) if lock_dir is not None else path.parent
    lock_dir.mkdir(parents=True, exist_ok=True)
    text = serialize(record)
    with FileLock(str(lock_dir / f"{path.name}.lock"), timeout=600):
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return False
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        collection = SnapshotCollection(location=str(tmp))
        collection.add(Snapshot(name=path.stem, data=text))
        RankingSnapshotExtension.write_snapshot_collection(snapshot_collection=collection)
        os.replace(tmp, path)
    return True


# ---- comparison ----------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _rank(entry: dict[str, Any]) -> str:
    r = entry.get("rank")
    return "—" if r is None else (f"{r:.0f}" if float(r).is_integer() else f"{r:.1f}")


@dataclass
class Comparison:
    """The outcome of comparing a current record with a recorded one."""

    regressions: dict[str, list[str]] = field(default_factory=dict)  # hypothesis → reasons
    headers: dict[str, str] = field(default_factory=dict)  # hypothesis → "name (table, rank a → b)"
    tau_failures: list[str] = field(default_factory=list)
    taus: dict[str, float] = field(default_factory=dict)  # table → τ vs the snapshot
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.regressions and not self.tau_failures

    def lines(self) -> list[str]:
        out = []
        for name, reasons in self.regressions.items():
            out.append(f"  {self.headers[name]}:")
            out += [f"      {reason}" for reason in reasons]
        return out + [f"  {t}" for t in self.tau_failures]


def _tol(old: dict[str, Any], score: str) -> float:
    """The recorded tolerance: a run with noisier seeds must not widen its own allowance."""
    return old.get(_tol_key(score)) or _floor(score)


def _how(score: str, shift: float, tol: float) -> str:
    return (f"×{2 ** shift:.3g}; seed spread allows ×/÷{2 ** tol:.3g}" if _is_log(score)
            else f"{shift:+.3g}; seed spread allows ±{tol:.3g}")


def _seed_pairs(old: dict[str, Any], new: dict[str, Any],
                score: str) -> list[tuple[str, tuple[float | None, float | None]]]:
    """(diff, (recorded, current)) for each seed both records hold."""
    a, b = old.get(f"{score}_seeds") or {}, new.get(f"{score}_seeds") or {}
    return [(d, (a[d], b[d])) for d in a if d in b]


def compare(old: dict[str, Any], new: dict[str, Any], errors: dict[str, str] | None = None,
            collected: set[str] | None = None) -> Comparison:
    """Apply the tolerance rule of the module docstring to two records (recorded, current).

    `errors` are this run's failed hypotheses (name → message) and `collected` the names this
    run collected: a recorded hypothesis missing from `new` is a regression only when this run
    collected it (it is then broken), else only a note.
    """
    errors = errors or {}
    result = Comparison()
    old_h, new_h = old.get("hypotheses", {}), new.get("hypotheses", {})
    moved: dict[str, float] = {}  # how far the ranking key moved, in tolerances
    unrecorded: set[str] = set()  # gated scores the snapshot predates

    def add(name: str, reason: str) -> None:
        entry_old, entry_new = old_h.get(name, {}), new_h.get(name, {})
        table = entry_old.get("table", entry_new.get("table", "?"))
        rank = ("" if table == "ceiling" else
                f", rank {_rank(entry_old)} → {_rank(entry_new) if entry_new else 'none'}")
        result.headers.setdefault(name, f"{name} ({table}{rank})")
        result.regressions.setdefault(name, []).append(reason)

    for name, o in old_h.items():
        n = new_h.get(name)
        if n is None:
            if name in errors or (collected is not None and name in collected):
                key = schema.rank_key(o["table"])
                add(name, f"recorded ({schema.label(key)} "
                          f"{_fmt(o.get(key))}) but not scored in this run: "
                          f"{errors.get(name, 'no scores')}")
            else:
                result.notes.append(f"{name}: in the snapshot but not collected in this run "
                                    "(deleted or deselected; re-record if deleted)")
            continue
        if n.get("table") != o.get("table"):
            add(name, f"table changed: {o.get('table')} → {n.get('table')}")
        key = schema.rank_key(o["table"])
        for score in schema.gate_scores():
            if score not in o:  # a metric added after the snapshot was recorded
                unrecorded.add(score)
                continue
            a, b, tol = o.get(score), n.get(score), _tol(o, score)
            if a is None and b is None:
                continue
            if a is None or b is None:
                add(name, f"{schema.label(score)} {_fmt(a)} → {_fmt(b)} (now {'un' if b is None else ''}"
                          "defined)")
                continue
            shift = _t(score, b) - _t(score, a)
            if score == key:
                moved[name] = abs(shift) / tol
            if abs(shift) > tol:
                add(name, f"{schema.label(score)} {_fmt(a)} → {_fmt(b)} ({_how(score, shift, tol)})")
                continue
            for seed, (sa, sb) in _seed_pairs(o, n, score):
                if sa is None or sb is None:
                    if sa is not sb:
                        add(name, f"{schema.label(score)} on {seed}: {_fmt(sa)} → {_fmt(sb)}")
                    continue
                seed_shift = _t(score, sb) - _t(score, sa)
                if abs(seed_shift) > tol:
                    add(name, f"{schema.label(score)} on {seed}: {_fmt(sa)} → {_fmt(sb)} "
                              f"({_how(score, seed_shift, tol)}; the median moved less)")
    for name in new_h:
        if name not in old_h:
            result.notes.append(f"{name}: new, not in the snapshot (re-record to include it)")
    for score in sorted(unrecorded):
        result.notes.append(f"{schema.label(score)} is gated but not in the snapshot "
                            f"(re-record to include it: {UPDATE_COMMAND})")

    for table in ("write/mixed", "read"):
        key = schema.rank_key(table)
        names = [h for h, o in old_h.items() if o.get("table") == table and h in new_h
                 and new_h[h].get("table") == table and o.get(key) is not None
                 and new_h[h].get(key) is not None]
        # 2. resolved orders that flipped; each flip is blamed on the member that moved more
        flips: dict[tuple[str, str], list[str]] = {}
        for a in names:
            for b in names:
                ra, rb = old_h[a].get(f"{key}_range"), old_h[b].get(f"{key}_range")
                if not ra or not rb or ra[0] is None or rb[1] is None:
                    continue
                gap_floor = _floor(key, max(abs(ra[0]), abs(rb[1])))
                resolved = _t(key, ra[0]) - _t(key, rb[1]) > gap_floor
                if resolved and new_h[a][key] < new_h[b][key]:
                    if moved.get(a, 0) >= moved.get(b, 0):
                        flips.setdefault((a, "below"), []).append(b)
                    else:
                        flips.setdefault((b, "above"), []).append(a)
        for (name, where), others in flips.items():
            shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more"
                                             if len(others) > 4 else "")
            led = "that it led" if where == "below" else "that led it"
            add(name, f"now {where} {shown}, {led} with non-overlapping recorded {schema.label(key)} "
                      "seed ranges")
        # 3. Kendall τ against the snapshot
        if len(names) >= 2:
            tau = kendall_tau([old_h[h][key] for h in names], [new_h[h][key] for h in names])
            result.taus[table] = tau
            if len(names) >= TAU_MIN_N and not tau >= TAU_MIN:
                result.tau_failures.append(
                    f"Kendall τ of the {table} ranking against the snapshot is {tau:.2f} "
                    f"< {TAU_MIN} (n = {len(names)} hypotheses by {schema.label(key)})")

    oc, nc = old.get("configuration", {}), new.get("configuration", {})
    if oc.get("model_fingerprint") != nc.get("model_fingerprint"):
        result.notes.append("the model weights differ from the recorded ones (fingerprint "
                            f"{str(oc.get('model_fingerprint'))[:12]} → "
                            f"{str(nc.get('model_fingerprint'))[:12]})")
    for diff_name, fp in (nc.get("diffs") or {}).items():
        before = (oc.get("diffs") or {}).get(diff_name)
        if before is not None and before != fp:
            result.notes.append(f"diff {diff_name} differs from the recorded one "
                                f"(sha256 {before[:12]} → {str(fp)[:12]})")
    if oc.get("behaviour_fingerprint") != nc.get("behaviour_fingerprint"):
        result.notes.append("the behaviour data (topics, personas) differ from the recorded ones")
    return result


# ---- the gate ------------------------------------------------------------------------------


@dataclass
class GateOutcome:
    status: str  # "match", "regression", "missing", "recorded", "unchanged", "invalid"
    path: Path
    message: str
    comparison: Comparison | None = None

    @property
    def failed(self) -> bool:
        return self.status in ("regression", "missing", "invalid")


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_ranking(results: RunResults, snapshot_dir: Path, *, update: bool = False,
                  lock_dir: Path | None = None, collected: set[str] | None = None) -> GateOutcome:
    """Compare this run's ranking with the snapshot of its configuration, or record it."""
    path = Path(snapshot_dir) / snapshot_name(results.inputs)
    shown = _display(path)
    record = build_record(results)
    recorded = read_snapshot(path) if path.is_file() else None
    if update:
        before = None
        same_rule = recorded is not None and list(
            (recorded.get("rule") or {}).get("scores") or []) == list(schema.gate_scores())
        if recorded is not None and recorded.get("format") == FORMAT and same_rule:
            before = compare(recorded, record, results.errors, collected)
        changed = write_snapshot(path, record, lock_dir)
        if not changed:
            return GateOutcome("unchanged", path, f"ranking snapshot {shown} is up to date")
        detail = ("new" if recorded is None else
                  "the previous record had another rule" if before is None else
                  "previous record matched within tolerance" if before.ok
                  else f"{len(before.regressions)} hypotheses had moved")
        return GateOutcome("recorded", path, f"recorded ranking snapshot {shown} ({detail}; "
                           f"{len(record['hypotheses'])} hypotheses, {record['n_seeds']} seeds)")
    if recorded is None:
        others = sorted(p.name for p in Path(snapshot_dir).glob("ranking__*.json"))
        lines = [f"no ranking snapshot for this configuration: {shown}",
                 f"record it (then commit it) with: {UPDATE_COMMAND}"]
        if others:
            lines.append("snapshots of other configurations (model, diffs, rank or behaviour "
                         "differ): " + ", ".join(others))
        return GateOutcome("missing", path, "\n".join(lines))
    if recorded.get("format") != FORMAT:
        return GateOutcome("invalid", path, f"{shown} has snapshot format "
                           f"{recorded.get('format')!r}, this harness writes {FORMAT}; "
                           f"re-record with: {UPDATE_COMMAND}")
    old_scores = list((recorded.get("rule") or {}).get("scores") or [])
    if old_scores != list(schema.gate_scores()):
        # A record made under another rule (e.g. before R_causal became the primary score)
        # cannot vouch for this ranking: comparing only the shared scores would pass vacuously.
        return GateOutcome("invalid", path, f"{shown} was recorded gating {old_scores}; this "
                           f"harness gates {list(schema.gate_scores())} and ranks by "
                           f"{[schema.rank_key(t) for t in TABLES[:2]]}; re-record with: "
                           f"{UPDATE_COMMAND}")
    comparison = compare(recorded, record, results.errors, collected)
    taus = ", ".join(f"{t} τ={v:.2f}" for t, v in comparison.taus.items())
    if comparison.ok:
        return GateOutcome("match", path, f"ranking matches {shown} ({taus})", comparison)
    n = len(comparison.regressions)
    lines = [f"ranking regression against {shown} ({recorded.get('n_seeds')} seeds; "
             f"{n} {'hypothesis' if n == 1 else 'hypotheses'} moved beyond the seed spread"
             + (", ranking τ below threshold" if comparison.tau_failures else "") + "):"]
    lines += comparison.lines()
    if comparison.taus:
        lines.append(f"  Kendall τ against the snapshot: {taus} (threshold {TAU_MIN})")
    lines += [f"  note: {note}" for note in comparison.notes]
    lines.append(f"if this change is intended, re-record the snapshot: {UPDATE_COMMAND}")
    return GateOutcome("regression", path, "\n".join(lines), comparison)


# ---- the gate item -------------------------------------------------------------------------

RANKING_NODEID = "ws_ranking"


class RankingRegression(AssertionError):
    """The run's ranking moved beyond the seed spread, or no snapshot is recorded for it."""


class RankingGateItem(pytest.Item):
    """SPEC §6: the run's ranking across seeds against the snapshot of its configuration.

    One per session, added after the hypothesis items (ws_harness.collect); it aggregates every
    hypothesis's scores (under xdist from the shared disk cache) and applies
    :func:`check_ranking`, or records the snapshot with --ws-update-snapshots.
    """

    def runtest(self) -> None:
        from ws_harness.plugin import get_run
        from ws_harness.results import collect_results

        run = get_run(self.config)
        run.ran = True
        results = collect_results(run.scoreboard)
        if results.empty:
            raise RankingRegression(
                "no hypothesis could be scored, so there is no ranking to check: "
                + "; ".join(f"{k}: {v}" for k, v in sorted(results.errors.items()))
            )
        update = bool(self.config.getoption("ws_update_snapshots", False))
        outcome = check_ranking(
            results, self.config.rootpath / SNAPSHOT_DIRNAME, update=update,
            lock_dir=run.harness.config.cache_dir / "locks",
            collected=set(run.scoreboard.hypotheses),
        )
        self.user_properties.append(("ws_ranking", outcome.message.splitlines()[0]))
        if outcome.failed:
            raise RankingRegression(outcome.message)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, RANKING_NODEID

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, RankingRegression):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)
