"""Content-addressed on-disk cache: atomic, verified entries, one builder per entry across xdist workers."""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from ws_harness import __version__, progress
from ws_harness.progress import pid_alive

__all__ = [
    "CacheWarning",
    "DiskCache",
    "HEAVY_KINDS",
    "HEAVY_SLOTS_ENV",
    "default_heavy_slots",
    "code_closure",
    "code_version",
    "content_hash",
    "file_sha256",
    "package_modules",
    "safetensors_problem",
    "verify_entry",
    "worker_order",
    "write_manifest",
]

T = TypeVar("T")
Producer = Callable[..., Any] | Sequence[Callable[..., Any]] | None

# Part of every key: entries written before manifests existed are never looked up.
CACHE_FORMAT = 2
MANIFEST = "manifest.json"
# Files up to this size are sha256-verified on every load (~1 GB/s, so ≤ 0.07 s each); larger
# ones get the cheap checks (size, safetensors header), except in HASHED_KINDS.
FULL_HASH_MAX_BYTES = 64 << 20
# A flipped bit in a diff moves every score of it (r_w_oproj by 2.35 once): always hash diffs.
HASHED_KINDS = frozenset({"diff"})
WAIT_NOTICE_S = 5.0  # say who holds a build lock after this long, then every WAIT_REPEAT_S
WAIT_REPEAT_S = 60.0
FOREIGN_TMP_MAX_AGE_S = 24 * 3600  # another host's tmp folder: its pid cannot be checked here
# Builds that run the model with activations (and gradients) held: each holds 1-1.5 GB at 135M
# on top of its worker. At most `heavy_slots` of them run at once across the processes sharing a
# cache: more than there are cores run no faster, and their peaks add up.
HEAVY_KINDS = frozenset({"diff", "adapter_diff", "steering", "labels", "attribution",
                         "retention_reference", "retention"})
HEAVY_SLOTS_ENV = "WS_HEAVY_SLOTS"

_PACKAGE = "ws_harness"
_PACKAGE_DIR = Path(__file__).resolve().parent
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# .<key>.tmp-<host tag>-<pid>-<random>; older builds wrote .<key>.tmp-<pid>-<random>.
_TMP_RE = re.compile(r"^\.(?P<key>[0-9a-f]+)\.tmp-(?:(?P<host>[0-9a-f]{8})-)?(?P<pid>\d+)-[0-9a-f]{8}$")
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                         "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
                         "F8_E4M3": 1, "F8_E5M2": 1}


class CacheWarning(UserWarning):
    """A cache entry failed its verification or could not be loaded, and is being rebuilt."""


class _DamagedEntry(Exception):
    """An entry does not match its manifest; the message says which file and how."""


def content_hash(obj: Any) -> str:
    """sha256 of a canonical JSON rendering (sorted keys); stable across processes, unlike hash()."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    ).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- code versions: the producer's import closure inside the package -----------------------
def _module_file(name: str) -> Path | None:
    """The source file of package module `name` (found statically, without importing it)."""
    if name != _PACKAGE and not name.startswith(_PACKAGE + "."):
        return None
    parts = name.split(".")[1:]
    base = _PACKAGE_DIR.joinpath(*parts)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def package_modules() -> list[str]:
    """Every module of the ws_harness package, by dotted name."""
    names = []
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(_PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join((_PACKAGE, *parts)))
    return names


def package_sources() -> list[tuple[str, str]]:
    """(module, sha256 of its source) for every module of the package."""
    return [(m, _module_source_hash(m)) for m in package_modules()]


@functools.cache
def _module_source_hash(name: str) -> str:
    path = _module_file(name)
    return "missing" if path is None else hashlib.sha256(path.read_bytes()).hexdigest()


def _package_imports(tree: ast.AST, importer: str | None) -> set[str]:
    """Package modules that `tree` imports, anywhere (lazy imports in functions count too)."""
    found: set[str] = set()

    def add(name: str) -> None:
        while name and _module_file(name) is None:  # `from ws_harness.x import f`: x's file
            name = name.rpartition(".")[0]
        if name.startswith(_PACKAGE):
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == _PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: only meaningful inside the package
                if importer is None or not importer.startswith(_PACKAGE):
                    continue
                is_package = (_module_file(importer) or Path()).name == "__init__.py"
                base = importer.split(".")[: len(importer.split(".")) - node.level + is_package]
                module = ".".join([*base, module] if module else base)
            if module.split(".")[0] != _PACKAGE:
                continue
            for alias in node.names:  # `from ws_harness import schema` imports a module
                sub = f"{module}.{alias.name}"
                add(sub if _module_file(sub) is not None else module)
    return found


@functools.cache
def _direct_imports(name: str) -> frozenset[str]:
    path = _module_file(name)
    if path is None:
        return frozenset()
    return frozenset(_package_imports(ast.parse(path.read_text(encoding="utf-8")), name))


# Modules that store and look up entries but compute none of their numbers: editing them
# (locking, manifests, progress) must not turn every entry cold. The format of what they
# store is versioned by CACHE_FORMAT instead, which is part of every key: an edit of what
# they write, or of one_thread (it decides the last bits of every build), must bump it.
STORAGE_MODULES = frozenset({f"{_PACKAGE}.cache", f"{_PACKAGE}.progress"})


@functools.cache
def _closure(name: str) -> frozenset[str]:
    """`name`, every package module it imports transitively, and their parent packages
    (less STORAGE_MODULES, whose code does not change what an entry holds)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(_direct_imports(current))
        parent = current.rpartition(".")[0]
        if parent:  # importing ws_harness.x runs ws_harness/__init__.py first
            todo.append(parent)
    return frozenset(seen - STORAGE_MODULES)


@functools.cache
def _external_source_hash(module: ModuleType) -> tuple[str, frozenset[str]]:
    """A module outside the package (a hypothesis file): its source hash and package imports."""
    # The file as it is now (inspect.getsource may answer from linecache's older copy).
    filename = inspect.getsourcefile(module)
    source = Path(filename).read_text(encoding="utf-8") if filename else inspect.getsource(module)
    imports = _package_imports(ast.parse(source), module.__name__)
    return hashlib.sha256(source.encode()).hexdigest(), frozenset(imports)


def _producer_parts(producer: Callable[..., Any]) -> tuple[set[str], str | None]:
    """(package modules the producer depends on, hash of its own out-of-package source or None)."""
    module = inspect.getmodule(producer)
    name = getattr(module, "__name__", "")
    if module is not None and _module_file(name) is not None:
        return set(_closure(name)), None
    try:
        if module is None:
            raise TypeError(f"no module for {producer!r}")
        own, imports = _external_source_hash(module)
    except (OSError, TypeError):
        # No source to read (a builtin, a partial, a REPL function): its name is all we have.
        label = getattr(producer, "__qualname__", repr(producer))
        return set(), hashlib.sha256(label.encode()).hexdigest()
    modules: set[str] = set()
    for imported in imports:
        modules |= _closure(imported)
    return modules, own


def _as_producers(producer: Producer) -> list[Callable[..., Any]]:
    if producer is None:
        return []
    if callable(producer):
        return [producer]
    return list(producer)


def code_closure(producer: Producer) -> list[str]:
    """Sorted package modules whose source keys `producer`'s entries (several: the union)."""
    modules: set[str] = set()
    for fn in _as_producers(producer):
        modules |= _producer_parts(fn)[0]
    return sorted(modules)


def code_version(producer: Producer) -> str:
    """Hash of the code that produces an entry: the sources of every ws_harness module the
    producer's module imports, transitively (found with `ast`, once per process), plus the
    producer's own file when it lives outside the package (a hypothesis file). Editing scores.py
    therefore invalidates cached scores, while editing report.py invalidates no basis.
    `producer` may be a sequence of callables (the union of their closures)."""
    producers = _as_producers(producer)
    if not producers:
        return __version__
    lines = [f"format {CACHE_FORMAT}", __version__]
    modules: set[str] = set()
    for fn in producers:
        closure, own = _producer_parts(fn)
        modules |= closure
        if own is not None:
            lines.append(f"own {own}")
    lines += [f"{m} {_module_source_hash(m)}" for m in sorted(modules)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def worker_order(items: list[T]) -> list[T]:
    """`items` rotated to start at this xdist worker's share (gw1 of 4 starts a quarter in).

    Workers that all need every entry then build different entries first and read the rest,
    instead of queueing on one lock after another.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    start = (len(items) * index) // max(count, 1)
    return items[start:] + items[:start]


# ---- entry integrity ---------------------------------------------------------------------
def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None; reads only its header.

    Checks that the 8-byte header length, the JSON header and the tensor data it declares fit
    the file exactly, so a truncated, padded or garbage file is named before anything loads it.
    """
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    if size < 8:
        return f"not a safetensors file (only {size} bytes; its header length alone takes 8)"
    with path.open("rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if length > size - 8:
            return (f"not a safetensors file (its header length field says {length} bytes, the "
                    f"file holds {size - 8} after it)")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its header is not valid JSON ({exc})"
    if not isinstance(header, dict):
        return f"its header is a JSON {type(header).__name__}, not an object of tensors"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = [int(n) for n in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"its header entry {name!r} lacks dtype, shape or data_offsets"
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None and stop - begin != itemsize * _prod(shape):
            return (f"its header entry {name!r} gives {stop - begin} bytes to a {dtype} tensor of "
                    f"shape {shape}")
        end = max(end, stop)
    data = size - 8 - length
    if data < end:
        return f"truncated: its header declares {end} bytes of tensor data, the file holds {data}"
    if data > end:
        return f"{data - end} bytes follow the {end} bytes of tensor data its header declares"
    return None


def _prod(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def write_manifest(entry: Path, kind: str) -> None:
    """Record every file of a finished build: size always, sha256 where it is cheap or required."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(entry.rglob("*")):
        if not path.is_file() or path.name == MANIFEST:
            continue
        size = path.stat().st_size
        record: dict[str, Any] = {"size": size}
        if kind in HASHED_KINDS or size <= FULL_HASH_MAX_BYTES:
            record["sha256"] = file_sha256(path)
        files[path.relative_to(entry).as_posix()] = record
    (entry / MANIFEST).write_text(json.dumps({"format": CACHE_FORMAT, "files": files}, indent=1))


def verify_entry(entry: Path) -> str | None:
    """What is wrong with a cache entry compared with its manifest, or None when it matches."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except FileNotFoundError:
        return f"no {MANIFEST} (an entry from an older ws-harness, or one edited by hand)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is damaged ({exc})"
    for rel, record in files.items():
        path = entry / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != record.get("size"):
            return f"{rel} has {size} bytes, expected {record.get('size')}"
        if path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
            return f"{rel}: {problem}"
        expected = record.get("sha256")
        if expected and (got := file_sha256(path)) != expected:
            return f"{rel} has sha256 {got[:16]}…, expected {expected[:16]}… (its content changed)"
    return None


def _say(message: str) -> None:
    # stderr, not a warning: it is news while the wait lasts, not a summary item afterwards.
    print(message, file=sys.stderr, flush=True)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread while an entry is built, then as before.

    Float reductions can split differently across threads, so an entry built by a 2-thread
    `-n 0` process and one built by a 1-thread xdist worker could differ in the last bits;
    the cache keeps whichever came first. Building on one thread makes them identical.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim() if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Hand memory freed by a build back to the OS (glibc keeps it otherwise).

    A build's temporaries (a backward pass's activations: ~2 GB at 135M) stay in the
    process's heap after they are freed, so each xdist worker would keep the peak of the
    largest build it ever ran; with four workers those peaks add up.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def default_heavy_slots() -> int:
    """How many heavy builds may run at once: $WS_HEAVY_SLOTS, else the cores this process may use."""
    raw = os.environ.get(HEAVY_SLOTS_ENV, "").strip()
    if raw:
        try:
            slots = int(raw)
        except ValueError:
            slots = -1
        if slots < 0:
            raise ValueError(f"{HEAVY_SLOTS_ENV}={raw!r}: expected a whole number of concurrent "
                             "heavy builds (0 = no limit)")
        return slots
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class DiskCache:
    """Entries live at `root/<kind>/<key>/`; the key hashes the inputs and the producing code.

    An entry is built in a private temporary directory, given a manifest (every file's size, and
    its sha256 where that is cheap or the kind is in HASHED_KINDS) and renamed into place, so
    readers only ever see complete entries and an interrupted build leaves none; its temporary
    folder is removed at the next access. A `filelock` per entry makes concurrent workers wait
    for the one builder instead of building again, and says after WAIT_NOTICE_S which process
    they are waiting for. An entry that fails its manifest check or fails to load is reported
    with a CacheWarning naming it, removed and rebuilt, never trusted. Each build, and each entry
    returned, is reported to :mod:`ws_harness.progress` (phase: the kind; key: the entry's key).

    Builds of HEAVY_KINDS also take one of `heavy_slots` cross-process slots (0: no limit), so
    that four xdist workers on two cores hold at most two builds' activations at once.
    """

    def __init__(self, root: Path | str, heavy_slots: int | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.heavy_slots = default_heavy_slots() if heavy_slots is None else heavy_slots
        if self.heavy_slots < 0:
            raise ValueError(f"heavy_slots={heavy_slots}: expected 0 (no limit) or more")
        self._slot_depth = 0  # heavy builds in progress in this process (nested ones share a slot)
        self._slot: FileLock | None = None  # the slot this process holds, if any
        self.slot_waits: list[float] = []  # seconds each heavy build waited for its slot
        self.builds: list[str] = []  # "<kind>/<key>" built by this process, for reports and tests
        self.used: set[str] = set()  # "<kind>/<key>" this process returned, built or read (warm)
        self._swept: set[str] = set()  # kinds whose stale tmp folders this process has removed

    def _served(self, kind: str, key: str) -> None:
        """An entry was returned to a caller: count it for the status line and the run record."""
        self.used.add(f"{kind}/{key}")
        progress.done(kind, key)

    def key(self, kind: str, parts: dict[str, Any], producer: Producer) -> str:
        return content_hash({"kind": kind, "parts": parts, "code": code_version(producer)})[:32]

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def _load(self, entry: Path, load: Callable[[Path], T]) -> T:
        problem = verify_entry(entry)
        if problem is not None:
            raise _DamagedEntry(problem)
        return load(entry)

    def _sweep_tmp(self, kind: str) -> None:
        """Remove temporary folders of builds whose process is gone (killed, crashed)."""
        if kind in self._swept:
            return
        self._swept.add(kind)
        folder = self.root / kind
        if not folder.is_dir():
            return
        now = time.time()
        for child in folder.iterdir():
            match = _TMP_RE.match(child.name)
            if match is None or not child.is_dir():
                continue
            ours = match["host"] in (None, _HOST_TAG)
            try:
                old = now - child.stat().st_mtime > FOREIGN_TMP_MAX_AGE_S
            except FileNotFoundError:
                continue
            if (ours and not pid_alive(int(match["pid"]))) or (not ours and old):
                shutil.rmtree(child, ignore_errors=True)

    @contextmanager
    def _locked(self, kind: str, key: str) -> Iterator[None]:
        """Hold the entry's lock; name its holder (from the `.owner` sidecar) while waiting."""
        final = self.path(kind, key)
        lock = FileLock(str(final) + ".lock")
        owner = Path(str(final) + ".lock.owner")
        start = time.monotonic()
        wait = WAIT_NOTICE_S
        try:
            lock.acquire(timeout=0)
        except Timeout:
            # Another process builds this entry. A heavy build of ours waiting for it lends its
            # slot meanwhile (that build may need it), and takes one again before going on.
            lent = self._slot is not None
            self._drop_slot()
            while True:
                try:
                    lock.acquire(timeout=wait)
                    break
                except Timeout:
                    _say(f"ws-harness cache: waiting for {kind}/{key}, which {_owner_text(owner)} "
                         f"is building ({time.monotonic() - start:.0f} s so far); it is read, not "
                         f"built again, once that finishes (lock {final}.lock)")
                    wait = WAIT_REPEAT_S
            if lent:
                try:
                    self._take_slot(kind)
                except BaseException:
                    lock.release()
                    raise
        try:
            owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "since": time.time(), "entry": f"{kind}/{key}"}))
            yield
        finally:
            owner.unlink(missing_ok=True)  # before the release: the next holder writes its own
            lock.release()

    def _take_slot(self, kind: str) -> float:
        """Block until one of the heavy-build slots is this process's; return the seconds waited."""
        folder = self.root / ".heavy-slots"
        folder.mkdir(exist_ok=True)
        locks = [FileLock(str(folder / f"slot-{i}.lock")) for i in range(self.heavy_slots)]
        start = time.monotonic()
        notice = start + WAIT_REPEAT_S
        while True:
            for lock in locks:
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    continue
                self._slot = lock
                return time.monotonic() - start
            if time.monotonic() > notice:
                _say(f"ws-harness cache: {kind} is waiting for one of {self.heavy_slots} heavy-build "
                     f"slots ({time.monotonic() - start:.0f} s so far; {HEAVY_SLOTS_ENV} sets how "
                     "many heavy builds run at once)")
                notice += WAIT_REPEAT_S
            time.sleep(0.1)

    def _drop_slot(self) -> None:
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    @contextmanager
    def _heavy_slot(self, kind: str) -> Iterator[None]:
        """Hold one of the cache's heavy-build slots while a HEAVY_KINDS entry is built.

        Re-entrant: a heavy build nested in another (retention building its reference) uses the
        slot its process holds; a light build (scores) takes none, so a heavy one inside it
        still does. No deadlock: a slot holder never waits for an entry lock with its slot
        (`_locked` lets it go meanwhile), so every slot is held by a build that can go on.
        """
        if kind not in HEAVY_KINDS or self.heavy_slots == 0:
            yield
            return
        if self._slot_depth == 0:
            self.slot_waits.append(self._take_slot(kind))
        self._slot_depth += 1
        try:
            yield
        finally:
            self._slot_depth -= 1
            if self._slot_depth == 0:
                self._drop_slot()

    def get_or_build_dir(
        self,
        kind: str,
        parts: dict[str, Any],
        build: Callable[[Path], None],
        load: Callable[[Path], T],
        producer: Producer = None,
    ) -> T:
        """Return `load(entry_dir)`, first running `build(tmp_dir)` if the entry is missing or bad.

        `load` should check what the entry must hold (files present, the object loads): anything
        it raises, like a failed manifest check, means "remove and rebuild".
        """
        key = self.key(kind, parts, producer or build)
        final = self.path(kind, key)
        self._sweep_tmp(kind)
        if final.is_dir():
            try:
                value = self._load(final, load)
            except Exception:  # noqa: BLE001 - re-checked under the lock below
                pass
            else:
                self._served(kind, key)  # the status line counts entries read as well as built
                return value
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(kind, key):
            # Holding the lock, no one else is building this entry: its tmp folders are debris.
            for stale in final.parent.glob(f".{key}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.is_dir():
                try:
                    value = self._load(final, load)
                except Exception as exc:  # noqa: BLE001 - any load failure means rebuild
                    problem = str(exc) if isinstance(exc, _DamagedEntry) else (
                        f"failed to load ({type(exc).__name__}: {' '.join(str(exc).split())})")
                    warnings.warn(
                        CacheWarning(f"cache entry {kind}/{key}: {problem}; removed, rebuilding "
                                     f"({final})"),
                        stacklevel=2,
                    )
                    shutil.rmtree(final, ignore_errors=True)
                else:
                    self._served(kind, key)  # another process built it while we waited
                    return value
            tmp = final.parent / f".{key}.tmp-{_HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            progress.begin(kind, key)
            try:
                with self._heavy_slot(kind), one_thread():
                    build(tmp)
                (tmp / "parts.json").write_text(
                    json.dumps({"kind": kind, "parts": parts}, indent=1, default=str)
                )
                write_manifest(tmp, kind)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                progress.end(kind, key)
                release_freed_memory()  # ~0.1 ms; a build's temporaries otherwise stay resident
            self.builds.append(f"{kind}/{key}")
            value = load(final)
            self._served(kind, key)
            return value

    def lookup(
        self, kind: str, parts: dict[str, Any], load: Callable[[Path], T], producer: Producer,
    ) -> T | None:
        """`load(entry_dir)` of an existing, intact entry, or None; never builds, never waits.

        For callers that can skip expensive set-up (loading a model) when the entry is there;
        a missing or damaged entry is left to get_or_build_* to report and rebuild.
        """
        key = self.key(kind, parts, producer)
        final = self.path(kind, key)
        if not final.is_dir():
            return None
        try:
            value = self._load(final, load)
        except Exception:  # noqa: BLE001 - the build path re-checks, warns and rebuilds
            return None
        self._served(kind, key)
        return value

    def get_or_build_tensors(
        self,
        kind: str,
        parts: dict[str, Any],
        build: Callable[[], dict[str, torch.Tensor]],
        producer: Producer = None,
    ) -> dict[str, torch.Tensor]:
        """A dict of tensors stored as one safetensors file."""

        def write(out: Path) -> None:
            tensors = build()
            bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise TypeError(f"cache kind {kind!r}: values for {bad} are not tensors")
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(out / "tensors.safetensors"))

        return self.get_or_build_dir(
            kind, parts, write, lambda p: load_file(str(p / "tensors.safetensors")),
            producer=producer or build,
        )

    def get_or_build_json(
        self,
        kind: str,
        parts: dict[str, Any],
        build: Callable[[], Any],
        producer: Producer = None,
    ) -> Any:
        """A JSON-serialisable value."""

        def write(out: Path) -> None:
            (out / "value.json").write_text(json.dumps(build(), indent=1))

        return self.get_or_build_dir(
            kind, parts, write, lambda p: json.loads((p / "value.json").read_text()),
            producer=producer or build,
        )

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


def _owner_text(owner: Path) -> str:
    try:
        info = json.loads(owner.read_text())
        since = time.strftime("%H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {int(info['pid'])} on {info['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return f"another process (its {owner.name} sidecar is not readable yet)"
