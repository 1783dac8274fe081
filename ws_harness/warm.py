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


def _sources_under(paths: Iterable[Path]) -> list[tuple[str, str]]:
    files: set[Path] = set()
    for path in paths:
        if path.is_dir():
            files |= {p for p in path.rglob("*.py") if "__pycache__" not in p.parts}
        elif path.is_file():
            files.add(path)
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
    where = Path(config.invocation_params.dir)
    targets = [where / a.split("::")[0] for a in args if not a.startswith("-")]
    targets = [t for t in targets if t.exists()] or [Path(config.rootpath)]
    diff_inputs: list[Path] = []
    if not cfg.builds_diffs:
        for item in cfg.diff:  # files, or adapter pairs (their folders)
            diff_inputs += [Path(folder) for _, folder in item.sides()] if hasattr(
                item, "sides") else [Path(item)]
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "sources")}
    parts: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "args": args,
        "addopts": os.environ.get("PYTEST_ADDOPTS", ""),
        "settings": json.loads(json.dumps(settings, default=str)),
        "package": package_sources(),
        "sources": _sources_under([*targets, Path(config.rootpath) / "conftest.py"]),
        "model": session.identity.fingerprint,
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
