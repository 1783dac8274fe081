"""Recorded findings: which claims a finished run refuted, written as the `refuted=` each file needs."""

from __future__ import annotations

import ast
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ws_harness.results import RunResults

__all__ = ["refuted_claims", "stale_records", "finding_lines", "refuted_literal", "write_findings"]


def refuted_claims(results: RunResults) -> dict[str, dict[str, list[Any]]]:
    """{hypothesis: {claim: [diff seeds (built) or names (files) where it failed]}} from a run."""
    out: dict[str, dict[str, list[Any]]] = defaultdict(dict)
    for row in sorted(results.claims, key=lambda r: (r["hypothesis"], r["claim"], r["diff"])):
        if not row["holds"]:
            out[row["hypothesis"]].setdefault(row["claim"], []).append(
                row["diff"] if row["seed"] is None else row["seed"]
            )
    n_diffs = len({r["diff"] for r in results.claims})
    # A claim refuted on every diff is recorded without a seed list (it is the finding).
    return {
        name: {claim: (None if len(which) == n_diffs else which) for claim, which in claims.items()}
        for name, claims in out.items()
    }


def stale_records(results: RunResults) -> list[str]:
    """Claims recorded as refuted that now hold, or that fail without a record."""
    says = {"stale": "now holds", "surprise": "fails unrecorded"}
    return [f"{row['hypothesis']}: {row['claim']} on {row['diff']} {says[row['status']]}"
            for row in results.claims if row["status"] in says]


def refuted_literal(claims: dict[str, list[Any] | None]) -> str:
    """The `refuted=` argument for {claim: seeds or None}, as Python source."""
    # json.dumps renders str/int lists as Python literals in the project's double quotes.
    if all(which is None for which in claims.values()):
        return json.dumps(sorted(claims))
    return "{" + ", ".join(f'"{c}": {"None" if w is None else json.dumps(w)}'
                           for c, w in sorted(claims.items())) + "}"


def finding_lines(results: RunResults) -> list[str]:
    """One line per hypothesis with a refuted claim: the `refuted=` argument its decorator needs."""
    return [f"{name}: refuted={refuted_literal(claims)}"
            for name, claims in sorted(refuted_claims(results).items())]


def write_findings(results: RunResults, files: dict[str, Path] | None = None) -> list[Path]:
    """Rewrite each scored hypothesis file's `refuted=` to what the run measured; the changed files.

    `files` maps hypothesis names to their files (default: where the run found them). Only the
    decorator's `refuted` keyword is touched (found with `ast`, so formatting and comments
    elsewhere stay); a hypothesis with nothing refuted loses the keyword. Ceilings and
    hypotheses that were not scored are left alone.
    """
    found = refuted_claims(results)
    claimed = {row["hypothesis"] for row in results.claims}
    changed = []
    for name, meta in sorted(results.hypotheses.items()):
        if name not in claimed:
            continue
        path = Path((files or {}).get(name) or meta.get("file") or "")
        if not path.is_file():
            raise FileNotFoundError(f"hypothesis {name!r}: its file {str(path)!r} is not there; "
                                    "rerun the sweep from this checkout")
        text = path.read_text(encoding="utf-8")
        new = _with_refuted(text, found.get(name), path)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def _with_refuted(text: str, claims: dict[str, list[Any] | None] | None, path: Path) -> str:
    calls = [d for node in ast.walk(ast.parse(text)) if isinstance(node, ast.FunctionDef)
             for d in node.decorator_list
             if isinstance(d, ast.Call) and getattr(d.func, "id", "") in ("per_layer",
                                                                          "global_basis")]
    if len(calls) != 1:
        raise ValueError(f"{path}: expected one @per_layer/@global_basis decorator, found "
                         f"{len(calls)}")
    call = calls[0]
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(lineno: int, col: int) -> int:  # ast columns are UTF-8 byte offsets
        return starts[lineno - 1] + len(lines[lineno - 1].encode()[:col].decode())

    keyword = next((k for k in call.keywords if k.arg == "refuted"), None)
    if keyword is not None:
        end = offset(keyword.value.end_lineno, keyword.value.end_col_offset)
        prev = [a for a in call.args] + [k for k in call.keywords if k is not keyword]
        prev = [n for n in prev if (n.end_lineno, n.end_col_offset) <= (keyword.lineno,
                                                                        keyword.col_offset)]
        start = (offset(prev[-1].end_lineno, prev[-1].end_col_offset) if prev
                 else offset(keyword.lineno, keyword.col_offset))
    else:
        start = end = offset(call.end_lineno, call.end_col_offset) - 1  # before the call's ")"
    record = f", refuted={refuted_literal(claims)}" if claims else ""
    return text[:start] + record + text[end:]
