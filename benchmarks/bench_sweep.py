"""Benchmark the sweep (`pytest hypotheses/ -n 4`): wall time and peak memory, cold and warm.

Cold runs against an empty cache (model conversion, diff builds, captures, bases, scores);
warm reruns with that cache (scores read back). Peak memory is the largest sum of RSS over
the pytest process tree, sampled every 0.2 s from /proc. The per-phase breakdown comes from
each process's timings in the run's `timings.json` (seconds summed over xdist workers, so
phases overlap in wall time).

    .venv/bin/python benchmarks/bench_sweep.py [--workers 4] [--keep-cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree_rss_mib(root: int) -> float:
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
        stack += _children(pid)
    return total / 1024


def run(cache: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "hypotheses/", "-n", str(workers), "-q",
           "-p", "no:cacheprovider", f"--ws-cache-dir={cache}", f"--ws-out={out}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_mib(proc.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    tail = proc.stdout.read().strip().splitlines()[-1] if proc.stdout else ""
    phases: dict[str, float] = {}
    timings = out / "timings.json"
    if timings.is_file():
        for per_process in json.loads(timings.read_text()).values():
            for phase, seconds in per_process.items():
                phases[phase] = phases.get(phase, 0.0) + seconds
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(peak), "exit": proc.returncode,
            "result": tail, "phases_s": {k: round(v, 1) for k, v in sorted(phases.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--keep-cache", type=Path, default=None,
                        help="use (and keep) this cache dir instead of a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp:
        cache = args.keep_cache or Path(tmp) / "cache"
        for label in ("cold", "warm"):
            result = run(cache, Path(tmp) / f"out-{label}", args.workers)
            print(json.dumps({"run": label, "workers": args.workers, **result}))
            os.sync()


if __name__ == "__main__":
    main()
