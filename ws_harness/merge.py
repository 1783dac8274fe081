"""`ws-harness merge OUT1 OUT2 … --out OUT`: combine runs made apart into one run's outputs.

Scale-out without a scheduler: run the sweep once per seed (``--ws-seeds 0`` on one machine,
``--ws-seeds 1`` on another) or once per set of diff files, then merge the output folders. The
result is what a single run of all those diffs writes: the same tables (``per_layer``,
``summary``, ``claims`` as CSV and Parquet), ``inputs.json``, ``results.json``, the ranking
across seeds with Kendall τ, the plots and ``conclusion.md``, and the ranking gate's verdict.

How (the controller's end-of-run path, run again on the merged results):

1. :func:`load_run` reads each folder's ``results.json`` (what ``ws-harness report`` reads);
2. :func:`check_compatible` refuses runs that a single run could not have produced together:
   another model (spec or weights), behaviour, rank k, hypothesis catalog (names, definitions,
   recorded findings, code), diff mode, harness version or score settings; the message names
   the key and both values. Diffs may not overlap, except a diff whose every result is
   identical in both runs (then it is counted once); one diff under two names is refused;
3. :func:`merge_results` takes the union with :meth:`RunResults.merge` (the xdist path), puts
   the records in the order a single process writes them (hypothesis, diff, layer / claim) and
   the diffs of ``inputs.json`` in the order of the folders given, then
   :func:`recompute_claims` runs Benjamini–Hochberg again over the merged claim family
   (SPEC §6: every claim of the run) and re-derives ``holds`` and ``status``;
4. :func:`write_merged` writes the tables (``results.write_tables``), the reports
   (``report.write_reports``), the ranking gate's verdict against ``snapshots/``
   (``snapshot.check_ranking``) into ``ranking_gate.json``, and ``merged_from.json`` (which
   folders, which diffs, the notes).

Per-process timings are kept under ``"<folder>/<process>"``; they are the only part of
``results.json`` that differs from a single run's. Per-diff results (scores, measured
retention, raw p) do not depend on the other diffs of a run; only the adjusted p, and so
``holds``/``status``, do, and those are recomputed.

:func:`record_settings` is what a run must record (``inputs["settings"]``) for the check to
cover the harness code, the hypothesis code and the measure mode; runs that do not record it
are merged with a note saying what could not be checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ws_harness import schema
from ws_harness.results import RunResults, read_tables, write_tables

if TYPE_CHECKING:
    from ws_harness.scoreboard import Scoreboard
    from ws_harness.snapshot import GateOutcome

__all__ = [
    "MergeError",
    "Shard",
    "MergeOutcome",
    "EXIT_OK",
    "EXIT_GATE_FAILED",
    "EXIT_REFUSED",
    "GATE_FILE",
    "PROVENANCE_FILE",
    "INFORMATIONAL_KEYS",
    "record_settings",
    "harness_code_version",
    "load_run",
    "check_compatible",
    "merge_results",
    "recompute_claims",
    "canonical_order",
    "write_merged",
    "merge_runs",
    "add_merge_parser",
    "run_merge",
    "main_merge",
]

EXIT_OK = 0
EXIT_GATE_FAILED = 1  # merged and written, but the ranking gate fails (or the reports failed)
EXIT_REFUSED = 2  # nothing written: a folder is missing or empty, or the runs do not fit together

GATE_FILE = "ranking_gate.json"
PROVENANCE_FILE = "merged_from.json"

# inputs.json keys that may differ between machines without changing a number: reported, and
# the first run's value is kept. Everything else outside inputs["diff"]["diffs"] must be equal.
INFORMATIONAL_KEYS = ("model.source", "environment")
# Per-hypothesis fields of results.json that depend on where the checkout lives.
_HYPOTHESIS_INFORMATIONAL = ("file",)
# Claim fields that depend on the whole claim family (recomputed after merging).
_FAMILY_FIELDS = ("p_adj", "holds", "status")
_SETTINGS = "settings"
_DESCRIPTION = ("Merge the output folders of runs that split the diffs (seeds) of one "
                "configuration into the tables, ranking, reports and ranking-gate verdict a "
                "single run of all their diffs writes.")


class MergeError(ValueError):
    """The runs cannot be merged (or a folder holds no run); the message says why and where."""


@dataclass
class Shard:
    """One run to merge: its output folder and its results (``results.json``)."""

    out: Path
    results: RunResults

    @property
    def label(self) -> str:
        return str(self.out)

    @property
    def diffs(self) -> list[dict[str, Any]]:
        """The run's diff entries of inputs.json, in the run's order."""
        return list((self.results.inputs.get("diff") or {}).get("diffs") or [])


@dataclass
class MergeOutcome:
    """What :func:`merge_runs` did: the merged results, the files written, the gate, notes."""

    results: RunResults
    out: Path
    written: dict[str, Path] = field(default_factory=dict)
    gate: GateOutcome | None = None
    report_error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        failed = self.report_error is not None or (self.gate is not None and self.gate.failed)
        return EXIT_GATE_FAILED if failed else EXIT_OK


# ---- what a run records for the check ----------------------------------------------------


def harness_code_version() -> str:
    """sha256 (16 hex) of every ``ws_harness`` source file: equal exactly on the same code."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json") and p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def record_settings(board: Scoreboard) -> dict[str, Any]:
    """What, besides model, behaviour, rank and catalog, decides a run's numbers.

    For ``inputs["settings"]`` (``Scoreboard.run_inputs``): the measure mode, the schema's
    metric fingerprint (p method, structured-null samples, each metric's code), the harness
    source version and each hypothesis's code version (the cache's ``code_version``, which
    hashes its module). :func:`check_compatible` compares it key by key.
    """
    from ws_harness.cache import code_version

    return {
        "measure": board.session.config.measure,
        "metrics": schema.fingerprint(),
        "harness_code": harness_code_version(),
        "hypothesis_code": {name: code_version(h.build)
                            for name, h in sorted(board.hypotheses.items())},
    }


# ---- loading and checking ----------------------------------------------------------------


def load_run(out: Path | str) -> Shard:
    """The run in folder `out` (its ``results.json``); MergeError if absent or without scores."""
    out = Path(out)
    try:
        results = read_tables(out)
    except FileNotFoundError as exc:
        raise MergeError(str(exc)) from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise MergeError(f"{out / 'results.json'} is not a ws-harness results file: {exc}") from None
    if results.empty:
        why = results.errors.get("<run>", "no hypothesis was scored")
        raise MergeError(f"{out} holds no scores ({why}); rerun that shard")
    if not results.inputs or not (results.inputs.get("diff") or {}).get("diffs"):
        raise MergeError(f"{out}/results.json records no run inputs (model, diffs, rank); "
                         "rerun that shard with this harness")
    return Shard(out, results)


def _canon(value: Any) -> str:
    """A canonical text of a JSON value (NaN equals NaN, key order ignored)."""
    return json.dumps(value, sort_keys=True, default=str)


def _show(value: Any, limit: int = 100) -> str:
    text = "(not recorded)" if value is _MISSING else json.dumps(value, default=str,
                                                                   ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_MISSING = object()


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted path → value for nested dicts (lists and scalars are leaves)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_leaves(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _comparable_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """inputs.json without the per-diff entries (those are what the runs split)."""
    out = {k: v for k, v in inputs.items() if k != "diff"}
    out["diff.mode"] = (inputs.get("diff") or {}).get("mode")
    return out


def _informational(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in INFORMATIONAL_KEYS)


def _mismatch(key: str, a: Shard, va: Any, b: Shard, vb: Any) -> MergeError:
    return MergeError(
        f"cannot merge {b.label} with {a.label}: {key} differs: {a.label} has {_show(va)}, "
        f"{b.label} has {_show(vb)}. Runs to merge must share model, behaviour, rank k, "
        "hypothesis catalog and code, and score settings; rerun the odd one with the others' "
        "configuration")


def check_compatible(shards: Sequence[Shard]) -> list[str]:
    """Refuse (MergeError) runs a single run could not have made together; returns notes.

    Compared with the first run: every key of inputs.json outside the per-diff entries (model
    spec and fingerprint, behaviour, rank, broad rank, layers, prompts, the hypothesis list,
    diff mode, harness version, ``settings``) except :data:`INFORMATIONAL_KEYS`, and every
    hypothesis's record in results.json (family, axis, scope, definition, module, oracle_of,
    refuted) except its file path. Diffs: :func:`_check_diffs`.
    """
    if not shards:
        raise MergeError("nothing to merge: pass at least one run's output folder")
    first, notes = shards[0], []
    base = _leaves(_comparable_inputs(first.results.inputs))
    for shard in shards[1:]:
        other = _leaves(_comparable_inputs(shard.results.inputs))
        for key in sorted(set(base) | set(other)):
            va, vb = base.get(key, _MISSING), other.get(key, _MISSING)
            if va is not _MISSING and vb is not _MISSING and _canon(va) == _canon(vb):
                continue
            if _informational(key):
                notes.append(f"{key} differs ({first.label}: {_show(va, 60)}, {shard.label}: "
                             f"{_show(vb, 60)}); kept {first.label}'s")
                continue
            raise _mismatch(key, first, va, shard, vb)
        ha, hb = first.results.hypotheses, shard.results.hypotheses
        if sorted(ha) != sorted(hb):
            only_a, only_b = sorted(set(ha) - set(hb)), sorted(set(hb) - set(ha))
            raise _mismatch("the hypothesis catalog", first, {"only here": only_a}, shard,
                            {"only here": only_b})
        for name in sorted(ha):
            keys = sorted((set(ha[name]) | set(hb[name])) - set(_HYPOTHESIS_INFORMATIONAL))
            for key in keys:
                va, vb = ha[name].get(key, _MISSING), hb[name].get(key, _MISSING)
                if (va is _MISSING) != (vb is _MISSING) or _canon(va) != _canon(vb):
                    raise _mismatch(f"hypothesis {name!r} {key}", first, va, shard, vb)
    if all(_SETTINGS not in s.results.inputs for s in shards):
        notes.append("these runs do not record inputs['settings'] (measure mode, metric, "
                     "harness and hypothesis code versions): only model, behaviour, rank, "
                     "catalog and definitions were checked")
    for name in sorted({n for s in shards for n in s.results.errors}):
        messages = {s.results.errors.get(name) for s in shards}
        if len(messages) > 1:
            notes.append(f"{name}: the runs disagree on its error ("
                         + "; ".join(f"{s.label}: {s.results.errors.get(name, 'no error')}"
                                     for s in shards) + ")")
    return notes + _check_diffs(shards)


def _per_diff(results: RunResults, diff: str) -> str:
    """Everything a run recorded about one diff, family-dependent claim fields left out."""
    def rows(records: list[dict[str, Any]], drop: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        return sorted(({k: v for k, v in r.items() if k not in drop} for r in records
                       if r.get("diff") == diff), key=_canon)

    return _canon({"rows": rows(results.rows), "summaries": rows(results.summaries),
                   "claims": rows(results.claims, _FAMILY_FIELDS)})


def _check_diffs(shards: Sequence[Shard]) -> list[str]:
    """Diffs must not overlap, except a diff identical in every result (kept once)."""
    notes: list[str] = []
    by_name: dict[str, tuple[Shard, dict[str, Any]]] = {}
    by_print: dict[str, tuple[Shard, str]] = {}
    for shard in shards:
        names = [str(d.get("name")) for d in shard.diffs]
        if len(set(names)) != len(names):
            raise MergeError(f"{shard.label} lists a diff name twice: {names}")
        for entry in shard.diffs:
            name, fingerprint = str(entry.get("name")), entry.get("fingerprint")
            seen = by_name.get(name)
            if seen is not None:
                earlier, earlier_entry = seen
                same = (_canon(earlier_entry) == _canon(entry)
                        and _per_diff(earlier.results, name) == _per_diff(shard.results, name))
                if not same:
                    raise MergeError(
                        f"cannot merge: diff {name!r} is in both {earlier.label} "
                        f"(sha256 {str(earlier_entry.get('fingerprint'))[:12]}) and {shard.label}"
                        f" (sha256 {str(fingerprint)[:12]}) with different results; each diff "
                        "(seed) must come from one run: shard by distinct --ws-seeds or distinct "
                        "diff files (rename a file whose name another shard uses)")
                notes.append(f"diff {name!r} is in {earlier.label} and {shard.label} with "
                             "identical results: counted once")
                continue
            if fingerprint is not None and fingerprint in by_print:
                earlier, earlier_name = by_print[fingerprint]
                raise MergeError(
                    f"cannot merge: {earlier.label}'s diff {earlier_name!r} and {shard.label}'s "
                    f"diff {name!r} are the same tensors (sha256 {str(fingerprint)[:12]}); "
                    "merging them would count one diff twice")
            by_name[name] = (shard, entry)
            if fingerprint is not None:
                by_print[fingerprint] = (shard, name)
    return notes


# ---- merging -----------------------------------------------------------------------------


def canonical_order(results: RunResults) -> RunResults:
    """Records in the order one process writes them (``collect_results``): by hypothesis,
    then diff, then layer (rows) or claim name (claims); hypotheses by name.

    Where ``RunResults.ordered()`` exists (the order a run's controller writes, however many
    xdist workers), it is applied last, so a merge writes exactly what a run writes.
    """
    def by(*keys: str) -> Any:
        return lambda r: tuple(r.get(k) for k in keys)

    results = replace(
        results,
        rows=sorted(results.rows, key=by("hypothesis", "diff", "layer")),
        summaries=sorted(results.summaries, key=by("hypothesis", "diff")),
        claims=sorted(results.claims, key=by("hypothesis", "diff", "claim")),
        hypotheses=dict(sorted(results.hypotheses.items())),
    )
    ordered = getattr(results, "ordered", None)
    return ordered() if callable(ordered) else results


def recompute_claims(results: RunResults) -> RunResults:
    """Benjamini–Hochberg over every claim of `results` (the run's family, SPEC §6), then
    ``holds`` and ``status`` from the adjusted p, as ``Scoreboard.claims`` does."""
    from ws_harness.scores import benjamini_hochberg

    claims = [dict(c) for c in results.claims]
    raw = [math.nan if c.get("p") is None else float(c["p"]) for c in claims]
    adjusted = benjamini_hochberg(raw) if claims else []
    for claim, p_adj in zip(claims, adjusted, strict=True):
        value = math.nan if claim.get("value") is None else float(claim["value"])
        claim["p_adj"] = float(p_adj)
        claim["holds"] = schema.holds(value, float(p_adj))
        claim["status"] = schema.classify(claim["holds"], bool(claim.get("expected_refuted")))
    return replace(results, claims=claims)


def merge_results(shards: Sequence[Shard]) -> tuple[RunResults, list[str]]:
    """Check, then merge the runs into the results one run of all their diffs would have.

    Returns the merged results and notes (informational differences, deduplicated diffs,
    claims whose verdict changed with the larger BH family).
    """
    notes = check_compatible(shards)
    merged = shards[0].results
    for shard in shards[1:]:
        merged = merged.merge(shard.results)  # the xdist union; identical entries once
    diffs: list[dict[str, Any]] = []
    names: set[str] = set()
    for shard in shards:
        for entry in shard.diffs:
            if str(entry.get("name")) not in names:
                names.add(str(entry.get("name")))
                diffs.append(entry)
    inputs = json.loads(json.dumps(shards[0].results.inputs))  # a deep copy
    inputs["diff"]["diffs"] = diffs
    timings = {f"{shard.label}/{proc}": phases for shard in shards
               for proc, phases in sorted(shard.results.timings.items())}
    errors: dict[str, str] = {}
    for shard in shards:
        for name, message in shard.results.errors.items():
            errors.setdefault(name, message)
    merged = replace(merged, inputs=inputs, timings=timings, errors=errors)
    merged = recompute_claims(canonical_order(merged))
    notes += _verdict_changes(shards, merged)
    return merged, notes


def _verdict_changes(shards: Sequence[Shard], merged: RunResults) -> list[str]:
    before = {(c["hypothesis"], c["diff"], c["claim"]): c["holds"]
              for s in shards for c in s.results.claims}
    changed = [f"{h} {claim} on {d}" for c in merged.claims
               for h, d, claim in [(c["hypothesis"], c["diff"], c["claim"])]
               if before.get((h, d, claim), c["holds"]) != c["holds"]]
    if not changed:
        return []
    shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    return [f"{len(changed)} claim verdicts differ from their shard's (Benjamini–Hochberg now "
            f"runs over all {len(merged.claims)} claims): {shown}"]


# ---- writing -----------------------------------------------------------------------------


def write_merged(results: RunResults, out: Path, *, snapshot_dir: Path | None,
                 update_snapshots: bool = False) -> MergeOutcome:
    """Tables, reports and the gate verdict of `results` into `out`, as a run's controller
    writes them; the gate is skipped when `snapshot_dir` is None."""
    from ws_harness.report import write_reports
    from ws_harness.snapshot import check_ranking

    outcome = MergeOutcome(results, Path(out))
    outcome.written.update(write_tables(results, outcome.out))
    try:
        outcome.written.update(write_reports(results, outcome.out))
    except Exception as exc:  # noqa: BLE001 - as in a run: a broken plot must not hide the tables
        outcome.report_error = f"{type(exc).__name__}: {exc}"
    if snapshot_dir is not None:
        outcome.gate = check_ranking(results, Path(snapshot_dir), update=update_snapshots,
                                     collected=set(results.hypotheses))
        gate = {"status": outcome.gate.status, "failed": outcome.gate.failed,
                "snapshot": str(outcome.gate.path), "message": outcome.gate.message}
        (outcome.out / GATE_FILE).write_text(json.dumps(gate, indent=1, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        outcome.written["ranking_gate"] = outcome.out / GATE_FILE
    return outcome


def merge_runs(outs: Sequence[Path | str], out: Path | str, *,
               snapshot_dir: Path | None = None, update_snapshots: bool = False) -> MergeOutcome:
    """Load, check and merge the runs in `outs`, and write the merged run into `out`.

    MergeError (nothing written) when a folder holds no run, `out` is one of them, or the runs
    do not fit together.
    """
    target = Path(out).resolve()
    if any(Path(o).resolve() == target for o in outs):
        raise MergeError(f"--out {out} is one of the runs being merged; write the merged run to "
                         "a new folder")
    shards = [load_run(o) for o in outs]
    results, notes = merge_results(shards)
    outcome = write_merged(results, Path(out), snapshot_dir=snapshot_dir,
                           update_snapshots=update_snapshots)
    outcome.notes = notes
    provenance = {"runs": [{"out": s.label, "diffs": [d.get("name") for d in s.diffs]}
                           for s in shards],
                  "diffs": [d.get("name") for d in results.inputs["diff"]["diffs"]],
                  "notes": notes}
    (outcome.out / PROVENANCE_FILE).write_text(
        json.dumps(provenance, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    outcome.written["merged_from"] = outcome.out / PROVENANCE_FILE
    return outcome


# ---- the command -------------------------------------------------------------------------


def add_merge_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``merge`` to `subparsers` (``ArgumentParser.add_subparsers()``); returns its parser.

    The parser's default ``handler`` is :func:`run_merge`.
    """
    parser = subparsers.add_parser(
        "merge", help="combine runs of different seeds or diff sets into one run's outputs",
        description=_DESCRIPTION)
    _merge_arguments(parser)
    return parser


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="OUT",
                        help="output folders (--ws-out) of the runs to merge; their diffs keep "
                             "this order in inputs.json (it names a built run's snapshot)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the merged run (not one of the inputs)")
    parser.add_argument("--snapshots", type=Path, default=None,
                        help="ranking snapshot folder for the gate (default: ./snapshots)")
    parser.add_argument("--no-gate", dest="gate", action="store_false",
                        help="do not check the ranking against its snapshot")
    parser.add_argument("--update-snapshots", dest="update_snapshots", action="store_true",
                        help="record the merged ranking as the snapshot instead of comparing")
    parser.set_defaults(handler=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    """Run ``merge`` from parsed arguments; prints the ranking, the gate and the notes.

    Exit codes: 0 merged and the gate passes (or is skipped), 1 merged but the gate or the
    reports failed, 2 refused (nothing written).
    """
    from ws_harness.ranking import summary_lines
    from ws_harness.snapshot import SNAPSHOT_DIRNAME

    snapshot_dir = None
    if args.gate:
        snapshot_dir = args.snapshots if args.snapshots is not None else Path.cwd() / SNAPSHOT_DIRNAME
    try:
        outcome = merge_runs(args.runs, args.out, snapshot_dir=snapshot_dir,
                             update_snapshots=args.update_snapshots)
    except MergeError as exc:
        print(f"ws-harness merge: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    for line in summary_lines(outcome.results):
        print(line)
    if outcome.gate is not None:
        print(f"ranking gate ({'failed' if outcome.gate.failed else 'passed'}): "
              f"{outcome.gate.message}")
    if outcome.report_error is not None:
        print(f"REPORTS FAILED: {outcome.report_error} (rerun them with: ws-harness report "
              f"{outcome.out})")
    for note in outcome.notes:
        print(f"note: {note}")
    names = [d.get("name") for d in outcome.results.inputs["diff"]["diffs"]]
    print(f"merged {len(args.runs)} runs ({len(names)} diffs: {', '.join(map(str, names))}) into "
          f"{outcome.out}: " + ", ".join(p.name for p in outcome.written.values()))
    return outcome.exit_code


def main_merge(argv: Sequence[str] | None = None) -> int:
    """``ws-harness merge OUT1 OUT2 … --out OUT`` as a standalone entry point."""
    parser = argparse.ArgumentParser(prog="ws-harness merge",
                                     description=_DESCRIPTION)
    _merge_arguments(parser)
    return run_merge(parser.parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_merge())
