"""Profile the sweep (`pytest hypotheses/`): wall, per-phase wall and CPU, and peak memory.

Each run is one `pytest hypotheses/ -n N` in a subprocess. Peak memory is the largest sum of
RSS, and of PSS (shared pages split between their processes), over the pytest process tree,
sampled every 0.2 s from /proc/PID/smaps_rollup; total CPU is the tree's
user+system time (os.times' children fields: pytest and its reaped workers).
Per-phase figures come from the run's timings.json: every process records wall seconds per
phase and, under "<phase>.cpu", its CPU seconds; both are summed over processes here, so
phases overlap in wall time and a phase's wall includes waiting for another worker's lock.

A run is `LABEL:MODE:WORKERS`: MODE is cold (a fresh, empty cache) or warm (the cache the
previous run of that label left, or --cache); LABEL names a code version, `new` for this
checkout or a git revision (checked out once into a temporary worktree and run with the same
virtualenv), so before/after figures come from one invocation on one machine:

    .venv/bin/python benchmarks/bench_sweep.py new:warm:4 new:warm:4 new:warm:0 \\
        a2d687f:warm:4 --cache .ws-cache --markdown benchmarks/sweep.md

Every run's JSON line goes to stdout; --markdown appends a table of all runs to a file.
--timeline FILE writes every sample as a JSON line (seconds, then per process: pid, RSS, PSS,
private (anonymous) MiB and the cache entries it was building, from the run's progress
events); each run's row also names, at its peak PSS, what every process held and built.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ws_harness.progress import Renderer

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("model", "diffs", "captures", "labels", "attribution", "bases", "structured_null",
          "scores", "retention")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _process_memory_mib(pid: int) -> tuple[int, int, int] | None:
    """(RSS, PSS, anonymous) of one process in MiB, or None once it is gone."""
    fields = {"Rss": 0, "Pss": 0, "Anonymous": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in fields:
                fields[name] = int(rest.split()[0]) // 1024
    except OSError:
        return None
    return fields["Rss"], fields["Pss"], fields["Anonymous"]


def _tree(root: int) -> list[int]:
    stack, seen = [root], []
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.append(pid)
            stack += _children(pid)
    return seen


def _progress_dir(pids: list[int]) -> str | None:
    """The run's progress folder, from a process's environment (the controller sets it)."""
    for pid in pids:
        try:
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if item.startswith(b"WS_PROGRESS_DIR="):
                    return item.split(b"=", 1)[1].decode()
        except OSError:
            continue
    return None


def _sample(root: int, events: Renderer | None) -> list[list]:
    """[pid, RSS, PSS, anonymous, building] for every live process of the tree; `building`
    comes from the run's progress events, read incrementally by `events` (once it is known).

    Summed, RSS counts a page shared by N workers (the model read from one memory-mapped
    file) N times; PSS counts 1/N of it in each, so the PSS sum is what the tree costs the
    machine; anonymous memory is each process's own (heap, activations)."""
    if events is not None:
        events.poll()
    rows = []
    for pid in _tree(root):
        mem = _process_memory_mib(pid)
        if mem is not None:
            rows.append([pid, *mem, events.state.building(str(pid)) if events else []])
    return rows


def _phases(out: Path) -> dict[str, dict[str, float]]:
    """{phase: {"wall": s, "cpu": s}} summed over the run's processes."""
    totals: dict[str, dict[str, float]] = {}
    path = out / "timings.json"
    if not path.is_file():
        return totals
    for per_process in json.loads(path.read_text()).values():
        for key, seconds in per_process.items():
            phase, _, kind = key.partition(".")
            slot = totals.setdefault(phase, {"wall": 0.0, "cpu": 0.0})
            slot["cpu" if kind == "cpu" else "wall"] += seconds
    return {k: {m: round(v, 1) for m, v in totals[k].items()} for k in sorted(totals)}


def run(cwd: Path, cache: Path, out: Path, workers: int, extra: list[str] = (),
        timeline: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "pytest", "hypotheses/", "-n", str(workers), "-q",
           "-p", "no:cacheprovider", f"--ws-cache-dir={cache}", f"--ws-out={out}", *extra]
    before = os.times()
    start = time.perf_counter()
    log = out.parent / f"{out.name}.log"
    # Output to a file, not a pipe: a cold run writes more than a pipe holds (64 KiB), and an
    # unread pipe would block pytest's final summary.
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, text=True)
        peak = peak_pss = 0.0
        at_peak: list[list] = []
        events: Renderer | None = None  # reads the run's progress events; draws nothing
        samples = open(timeline, "a", encoding="utf-8") if timeline else None
        try:
            while proc.poll() is None:
                rows = _sample(proc.pid, events)
                if events is None and (folder := _progress_dir([r[0] for r in rows])):
                    events = Renderer(folder, io.StringIO())
                rss, pss = sum(r[1] for r in rows), sum(r[2] for r in rows)
                peak = max(peak, rss)
                if pss > peak_pss:
                    peak_pss, at_peak = pss, rows
                if samples:
                    samples.write(json.dumps([round(time.perf_counter() - start, 1), rows]) + "\n")
                time.sleep(0.2 if samples is None else 0.5)
        finally:
            if samples:
                samples.close()
    wall = time.perf_counter() - start
    after = os.times()
    lines = [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.strip()]
    # children_user/system: CPU of every reaped descendant (pytest and its workers).
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mib": round(peak),
            "peak_pss_mib": round(peak_pss),
            "at_peak_pss": [{"pid": r[0], "rss": r[1], "pss": r[2], "anon": r[3],
                             "building": r[4]} for r in at_peak],
            "exit": proc.returncode,
            "result": lines[-1] if lines else "", "phases": _phases(out)}


def _checkout(rev: str, tmp: Path) -> Path:
    where = tmp / f"rev-{rev}"
    if not where.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT,
                       check=True, capture_output=True)
    return where


def _markdown(rows: list[dict]) -> str:
    head = ["run", "wall s", "CPU s", "peak RSS MiB", "peak PSS MiB", "result"] + [
        f"{p} wall/CPU" for p in PHASES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.0f}", str(r["peak_rss_mib"]),
                 str(r.get("peak_pss_mib", "–")),
                 r["result"].replace("|", "/")]
        for p in PHASES:
            got = r["phases"].get(p)
            cells.append(f"{got['wall']:.0f} / {got['cpu']:.0f}" if got else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL:MODE:WORKERS, e.g. new:cold:4")
    parser.add_argument("--cache", type=Path, default=None,
                        help="the cache of warm runs (default: the one the label's last run used)")
    parser.add_argument("--markdown", type=Path, default=None, help="append a table to this file")
    parser.add_argument("--pytest-arg", dest="extra", action="append", default=[],
                        help="one more pytest argument for every run, e.g. "
                             "--pytest-arg=--ws-model=random:qwen3-0.6b (repeatable)")
    parser.add_argument("--timeline", type=Path, default=None,
                        help="append every memory sample (per process, twice a second) to this "
                             "JSON-lines file")
    parser.add_argument("--keep-out", type=Path, default=None,
                        help="write each label's out folder (tables, report) here and keep it")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp_name:
        tmp = Path(tmp_name)
        last_cache: dict[str, Path] = {}
        for i, spec in enumerate(args.runs):
            label, mode, workers = spec.split(":")
            if mode not in ("cold", "warm"):
                raise SystemExit(f"{spec}: MODE must be cold or warm")
            cwd = ROOT if label == "new" else _checkout(label, tmp)
            if mode == "cold":
                cache = tmp / f"cache-{i}"
            else:
                cache = args.cache.resolve() if args.cache else last_cache.get(label, tmp / "none")
            last_cache[label] = cache
            # One out folder per label, as a user reruns into ws-out: a warm rerun then finds
            # the plots of identical results already drawn (report.PLOT_STAMP).
            outs = args.keep_out.resolve() if args.keep_out else tmp
            outs.mkdir(parents=True, exist_ok=True)
            result = run(cwd, cache, outs / f"out-{label}", int(workers), args.extra,
                         args.timeline)
            row = {"run": spec, **result}
            rows.append(row)
            print(json.dumps(row), flush=True)
            os.sync()
        for label in {s.split(":")[0] for s in args.runs} - {"new"}:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / f"rev-{label}")],
                           cwd=ROOT, capture_output=True)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as fh:
            fh.write(_markdown(rows))


if __name__ == "__main__":
    main()
