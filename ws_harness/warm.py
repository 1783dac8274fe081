"""Run records: the cache entries a sweep used, so a rerun whose every entry is cached runs in one process.

Starting xdist workers costs more than a fully cached sweep does: each worker imports torch,
collects every hypothesis file and reads every score again (the claims need all of them), so
on 2 cores `-n 4` took 27 s where one process took 10 s. A sweep that ran only hypothesis
items records which entries it read or built under ``<cache>/runs/<fingerprint>.json``; the
fingerprint covers everything that decides what a rerun needs (the command line but its
worker count, the configuration, the package's and the collected folders' sources, the model,
behaviour and diff inputs). When a later invocation has the same fingerprint and every entry
of its record is still in the cache, there is nothing to distribute and the plugin turns
``-n N`` into ``-n 0``, saying so in the report header. Any difference means a normal run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ws_harness.cache import package_sources

if TYPE_CHECKING:
    import pytest

    from ws_harness.session import HarnessSession

__all__ = ["RECORD_FOLDER", "run_fingerprint", "write_record", "missing_entries",
           "run_in_process_if_cached"]

RECORD_FOLDER = "runs"
RECORD_FORMAT = 1


# Options that change where a run works, not what it computes.
_IGNORED_WITH_VALUE = ("-n", "--numprocesses", "--basetemp")


def _args_without_workers(args: Iterable[str]) -> list[str]:
    """The command line less its worker count (-n 4, -n4, --numprocesses=4, -n auto) and
    --basetemp (pytester gives every run its own)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in _IGNORED_WITH_VALUE:
            skip = True
            continue
        if arg.startswith(("--numprocesses=", "--basetemp=")) or (
                arg.startswith("-n") and len(arg) > 2 and not arg.startswith("--")):
            continue
        out.append(arg)
    return out


_PRUNED = {"__pycache__", "node_modules", "site-packages", "venv"}


def _py_files(folder: Path) -> set[Path]:
    """Python files under a folder, skipping hidden folders (.venv, .git, .ws-cache) and the like."""
    found: set[Path] = set()
    for where, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _PRUNED]
        found |= {Path(where) / f for f in files if f.endswith(".py")}
    return found


def _sources(targets: Iterable[Path], rootpath: Path) -> list[tuple[str, str]]:
    """Every python file a sweep of `targets` can depend on: the targets' files (a file target
    brings its whole folder: the catalog that forms its BH family) and each conftest.py from
    the root down to every target."""
    files: set[Path] = set()
    for target in targets:
        folder = target if target.is_dir() else target.parent
        files |= _py_files(folder)
        for parent in [folder, *folder.parents]:
            if (parent / "conftest.py").is_file():
                files.add(parent / "conftest.py")
            if parent == rootpath:
                break
    return [(str(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(files)]


def _file_stamps(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    stamps = []
    for path in paths:
        for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if p.is_file():
                stat = p.stat()
                stamps.append((str(p.resolve()), stat.st_size, stat.st_mtime_ns))
    return stamps


def run_fingerprint(config: pytest.Config, session: HarnessSession) -> str:
    """What decides which cache entries this invocation needs (see the module docstring)."""
    cfg = session.config
    args = _args_without_workers(config.invocation_params.args)
    where, rootpath = Path(config.invocation_params.dir), Path(config.rootpath)
    # pytest's own positional paths (or testpaths, or the root), not option values
    targets = [where / str(a).split("::")[0] for a in config.args]
    targets = [t.resolve() for t in targets if t.exists()] or [rootpath]
    diff_inputs: list[Path] = []
    if not cfg.builds_diffs:
        for item in cfg.diff:  # files, or adapter pairs (their folders)
            diff_inputs += [Path(folder) for _, folder in item.sides()] if hasattr(
                item, "sides") else [Path(item)]
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "sources")}
    parts: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "args": args,
        "addopts": [os.environ.get("PYTEST_ADDOPTS", ""), config.getini("addopts"),
                    config.getini("python_files")],
        "settings": json.loads(json.dumps(settings, default=str)),
        "package": package_sources(),
        "sources": _sources(targets, rootpath),
        "model": session.identity.fingerprint,
        "forward": session.placement.key(),  # "auto" means a GPU on one machine, the CPU on another
        "behaviour": session.behaviour.fingerprint(),
        "diff_inputs": _file_stamps(diff_inputs),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _record(cache_root: Path, fingerprint: str) -> Path:
    return Path(cache_root) / RECORD_FOLDER / f"{fingerprint}.json"


def write_record(cache_root: Path, fingerprint: str, used: Iterable[str]) -> Path:
    """Record the entries (``kind/key``) a finished sweep used; written atomically."""
    path = _record(cache_root, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": RECORD_FORMAT, "entries": sorted(set(used))}, indent=0))
    os.replace(tmp, path)
    return path


def missing_entries(cache_root: Path, fingerprint: str) -> list[str] | None:
    """Entries of the record absent from the cache; None when there is no usable record."""
    try:
        record = json.loads(_record(cache_root, fingerprint).read_text())
        entries = list(record["entries"]) if record.get("format") == RECORD_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not entries:
        return None
    return [e for e in entries if not (Path(cache_root) / e).is_dir()]


def run_in_process_if_cached(config: pytest.Config, session: HarnessSession) -> str | None:
    """On an xdist controller started with ``-n N`` (plain local workers): when this
    invocation's record lists only entries the cache holds, switch to one process (``-n 0``)
    and return the line that says so; otherwise change nothing and return None."""
    option = config.option
    workers = getattr(option, "numprocesses", None)
    tx = list(getattr(option, "tx", None) or [])
    if not workers or not tx or any(spec != "popen" for spec in tx):
        return None  # no workers, or gateways a user chose (--tx): leave them alone
    if any(getattr(option, name, False) for name in ("lf", "failedfirst", "newfirst", "stepwise")):
        return None  # the selection depends on .pytest_cache, which the record does not cover
    records = Path(session.config.cache_dir) / RECORD_FOLDER
    if not records.is_dir() or not any(records.glob("*.json")):
        return None  # no sweep recorded yet: do not hash the sources at all
    try:
        fingerprint = run_fingerprint(config, session)
    except Exception:  # noqa: BLE001 - an input problem is the preflight's to report
        return None
    missing = missing_entries(session.config.cache_dir, fingerprint)
    if missing is None or missing:
        return None
    option.numprocesses, option.dist, option.tx = 0, "no", []
    return (f"ws-harness: every result of this sweep is cached (run record {fingerprint[:12]}); "
            f"running in this process instead of {workers} xdist workers")
