"""Benchmark the causal phase (SPEC §4.1): what it adds to a cold and to a warm default sweep.

Starts from a copy (hard links) of an existing warm cache with the causal entries removed
(path-gradient attribution, measured retention and its random reference) and the score
entries removed (they now contain c_lin), then runs `pytest hypotheses/ -n 4` twice: once
"causal-cold" (everything but the causal phase and the scores is cached), once warm. The
phase seconds come from the run's timings.json (summed over xdist workers). For the cost the
causal phase adds to a fully cold sweep, compare "causal-cold" with a "scores-cold" run
(`--baseline`: only the score entries removed).

    .venv/bin/python benchmarks/bench_causal.py --cache .ws-cache [--workers 4] [--baseline]
        [--rev REV …]

`--rev` also times a git revision (checked out into a worktree) in the same invocation, for
a before/after on one machine; the cache must then be warm for that revision too (entries
are keyed by code, so one cache folder holds both).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench_sweep import ROOT, _checkout, run

CAUSAL_KINDS = ("attribution", "retention", "retention_reference")


def seeded_cache(source: Path, dest: Path, drop: tuple[str, ...]) -> Path:
    """Hard-linked copy of `source` without the entry kinds in `drop` (and no stale locks)."""
    subprocess.run(["cp", "-al", str(source), str(dest)], check=True)
    for kind in drop:
        shutil.rmtree(dest / kind, ignore_errors=True)
    shutil.rmtree(dest / "locks", ignore_errors=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="a warm cache to start from")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--baseline", action="store_true",
                        help="also time a run with only the scores removed (causal cached)")
    parser.add_argument("--rev", action="append", default=[],
                        help="also time this git revision's runs (repeatable)")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm reruns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ws-bench-causal-") as tmp_name:
        tmp = Path(tmp_name)
        plans = []
        for rev in [*args.rev, "new"]:
            if args.baseline:
                plans.append((rev, "scores-cold", ("scores",)))
            plans.append((rev, "causal-cold", ("scores",) + CAUSAL_KINDS))
        for rev, label, drop in plans:
            cwd = ROOT if rev == "new" else _checkout(rev, tmp)
            cache = seeded_cache(args.cache.resolve(), tmp / f"{rev}-{label}", drop)
            for phase in (label,) if args.no_warm else (label, f"{label}+warm"):
                result = run(cwd, cache, tmp / f"out-{rev}-{phase}", args.workers)
                print(json.dumps({"rev": rev, "run": phase, "workers": args.workers, **result}),
                      flush=True)
        for rev in set(args.rev) - {"new"}:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / f"rev-{rev}")],
                           cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    main()
