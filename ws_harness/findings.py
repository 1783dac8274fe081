"""Recorded findings: which claims a finished run refuted, written as the `refuted=` each file needs."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from ws_harness.results import RunResults

__all__ = ["refuted_claims", "stale_records", "finding_lines"]


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


def finding_lines(results: RunResults) -> list[str]:
    """One line per hypothesis with a refuted claim: the `refuted=` argument its decorator needs."""
    lines = []
    for name, claims in sorted(refuted_claims(results).items()):
        # json.dumps renders str/int lists as Python literals in the project's double quotes.
        if all(which is None for which in claims.values()):
            arg = json.dumps(sorted(claims))
        else:
            arg = "{" + ", ".join(f'"{c}": {"None" if w is None else json.dumps(w)}'
                                  for c, w in sorted(claims.items())) + "}"
        lines.append(f"{name}: refuted={arg}")
    return lines
