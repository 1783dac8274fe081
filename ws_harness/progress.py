"""Progress of a run: what every process of it is building, gathered into one status line on stderr."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "ENV_VAR",
    "LINE_INTERVAL_S",
    "PHASE_NAMES",
    "ProgressState",
    "Renderer",
    "TTY_INTERVAL_S",
    "begin",
    "done",
    "end",
    "expect",
    "own_stderr",
    "pid_alive",
    "rendering",
    "step",
]

# The run folder: each process appends its events to <folder>/<pid>.jsonl. Set by whoever
# renders (the pytest controller, the CLI) before it starts workers, which inherit it.
ENV_VAR = "WS_PROGRESS_DIR"
TTY_INTERVAL_S = 1.0  # a terminal's status line is redrawn at most this often
LINE_INTERVAL_S = 30.0  # a log (not a terminal) gets a new line at most this often
PREFIX = "ws-harness: "
MIN_ROOM = 24  # fewer free columns after others' output on the line: draw on the line below

# Phases are the cache's entry kinds (and "diff" for training steps), in pipeline order; the
# names are what the status line calls them. A kind not listed is shown by its own name.
PHASE_NAMES: dict[str, str] = {
    "model": "model conversion",
    "tokenizer": "tokenizer",
    "diff": "diffs",
    "adapter_diff": "adapter diffs",
    "steering": "steering checks",
    "capture": "captures",
    "labels": "labels",
    "attribution": "attribution",
    "basis": "bases",
    "structured_null": "structured nulls",
    "scores": "scores",
    "retention_reference": "retention references",
    "retention": "retention",
}
_CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colour and cursor escapes take no columns


# ---- events: any process of the run ---------------------------------------------------------
class _Sink:
    """This process's event file in the run folder; events are dropped when no run folder is set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened: tuple[str, int] | None = None  # (folder, pid) of self._file
        self._file: TextIO | None = None
        self._unwritable: set[str] = set()

    def write(self, record: dict[str, Any]) -> None:
        folder = os.environ.get(ENV_VAR)
        if not folder or folder in self._unwritable:
            return
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                opened, fh = (folder, os.getpid()), self._file
                if fh is None or self._opened != opened:  # a forked child, or a new run folder
                    self._close()
                    fh = (Path(folder) / f"{os.getpid()}.jsonl").open(
                        "a", buffering=1, encoding="utf-8")  # line-buffered: no fsync per event
                    self._file, self._opened = fh, opened
                fh.write(line)
            except OSError:
                # A folder that is gone (its renderer has finished) or unwritable: progress is
                # news, never a reason for a build to fail.
                self._unwritable.add(folder)
                self._close()

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file, self._opened = None, None

    def close(self) -> None:
        with self._lock:
            self._close()


_SINK = _Sink()


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {value!r}")


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")


def expect(phase: str, total: int) -> None:
    """The run has `total` items of `phase` (the largest total any process reports counts)."""
    _check_text("phase", phase)
    _check_count("total", total)
    _SINK.write({"event": "expect", "phase": phase, "total": total})


def done(phase: str, key: str) -> None:
    """One item of `phase` is available, built or read from the cache; `key` names it, so the
    same item reported by several processes counts once."""
    _check_text("phase", phase)
    _check_text("key", key)
    _SINK.write({"event": "done", "phase": phase, "key": key})


def begin(phase: str, label: str) -> None:
    """This process starts building `label` of `phase` (shown while it lasts)."""
    _check_text("phase", phase)
    _check_text("label", label)
    _SINK.write({"event": "begin", "phase": phase, "label": label})


def end(phase: str, label: str) -> None:
    """This process has finished (or abandoned) building `label` of `phase`."""
    _check_text("phase", phase)
    _check_text("label", label)
    _SINK.write({"event": "end", "phase": phase, "label": label})


def step(phase: str, label: str, n: int, total: int) -> None:
    """Step `n` of `total` of one long job, e.g. ("diff", "diff scripted seed 1 positive", 4, 16)."""
    _check_text("phase", phase)
    _check_text("label", label)
    _check_count("n", n)
    _check_count("total", total)
    _SINK.write({"event": "step", "phase": phase, "label": label, "n": n, "total": total})


# ---- aggregation: the renderer's side ---------------------------------------------------------
@dataclass
class _Process:
    building: dict[tuple[str, str], int] = field(default_factory=dict)  # (phase, label) → depth
    steps: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # → (n, total)


class ProgressState:
    """Every process's events, merged: done is the union of keys over processes, a phase's total
    the largest any process expects; built says whether anything was built at all."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.done: dict[str, set[str]] = {}
        self.built = False
        self._processes: dict[str, _Process] = {}
        self._phases: list[str] = []  # in order of first appearance

    def apply(self, process: str, event: dict[str, Any]) -> None:
        """Fold in one event of `process` (unknown event kinds are ignored)."""
        kind, phase = event.get("event"), str(event.get("phase"))
        if phase not in self._phases:
            self._phases.append(phase)
        proc = self._processes.setdefault(process, _Process())
        if kind == "expect":
            self.totals[phase] = max(self.totals.get(phase, 0), int(event["total"]))
        elif kind == "done":
            self.done.setdefault(phase, set()).add(str(event["key"]))
        elif kind == "begin":
            self.built = True
            job = (phase, str(event["label"]))
            proc.building[job] = proc.building.get(job, 0) + 1
        elif kind == "end":
            job = (phase, str(event["label"]))
            if proc.building.get(job, 0) > 1:
                proc.building[job] -= 1
            else:
                proc.building.pop(job, None)
            # A finished (or failed) build ends the step counters it ran.
            proc.steps = {k: v for k, v in proc.steps.items() if k[0] != phase}
        elif kind == "step":
            self.built = True
            proc.steps[(phase, str(event["label"]))] = (int(event["n"]), int(event["total"]))

    def busy_processes(self) -> list[str]:
        """Processes with a build or a step counter open."""
        return [name for name, proc in self._processes.items() if proc.building or proc.steps]

    def building(self, process: str) -> list[str]:
        """What `process` has begun and not yet ended, as "phase:label" (outermost first)."""
        proc = self._processes.get(process)
        return [f"{phase}:{label}" for phase, label in proc.building] if proc else []

    def forget_jobs(self, process: str) -> None:
        """Drop what `process` was building (it has died); what it finished still counts."""
        self._processes.pop(process, None)

    def _ordered_phases(self) -> list[str]:
        known = [p for p in PHASE_NAMES if p in self._phases]
        return known + [p for p in self._phases if p not in PHASE_NAMES]

    def completed(self) -> set[str]:
        """Phases with a total whose items are all done."""
        return {p for p, total in self.totals.items() if len(self.done.get(p, ())) >= total > 0}

    def status(self) -> str:
        """The status line, e.g. 'ws-harness: diff scripted seed 1 positive step 4/16 | diffs 1/3 |
        bases 0/44 | scores 0/132'; empty when there is nothing to say.

        Counted phases (those with a total) are always shown; others only while something of
        theirs is being built. Items beyond the expected total (hypotheses of the catalog that
        were not collected are scored too) raise the shown total with the count.
        """
        parts: list[str] = []
        stepping: set[str] = set()
        for proc in self._processes.values():
            for (phase, label), (n, total) in proc.steps.items():
                if n < total:
                    parts.append(f"{label} step {n}/{total}")
                    stepping.add(phase)
        # A phase whose job shows its steps needs no "building…" besides.
        building = {phase for proc in self._processes.values() for phase, _ in proc.building
                    if phase not in stepping}
        for phase in self._ordered_phases():
            name = PHASE_NAMES.get(phase, phase.replace("_", " "))
            count = len(self.done.get(phase, ()))
            if phase in self.totals:
                parts.append(f"{name} {count}/{max(count, self.totals[phase])}")
            elif phase in building:
                parts.append(f"{name} {count}…" if count else f"{name}…")
        return PREFIX + " | ".join(parts) if parts else ""


# ---- rendering --------------------------------------------------------------------------------
@dataclass
class _FileReader:
    offset: int = 0
    rest: bytes = b""  # a line not finished yet


def _fit(text: str, room: int) -> str:
    return text if len(text) <= room else text[: max(room - 1, 0)] + "…"


def _advance(column: int, text: str) -> int:
    """The cursor column after `text` is written at `column`."""
    text = _CSI.sub("", text)
    if "\n" in text:
        column, text = 0, text.rsplit("\n", 1)[1]
    if "\r" in text:
        column, text = 0, text.rsplit("\r", 1)[1]
    return column + len(text)


class Renderer:
    """Reads a run folder's event files and keeps one status line on `stream` up to date.

    On a terminal the line is rewritten in place (at most every TTY_INTERVAL_S); another
    writer's output that goes through :meth:`share` (pytest's terminal) lifts it off first and
    puts it back after. Elsewhere (a CI log) a full line is printed when the status changed and
    LINE_INTERVAL_S have passed since the last one, or a counted phase has just completed.
    Nothing is printed unless something was built. `clock` and `width` are injectable for tests.
    """

    def __init__(
        self,
        folder: Path | str,
        stream: TextIO,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        width: Callable[[], int] | None = None,
        line_interval: float = LINE_INTERVAL_S,
        tick_interval: float = TTY_INTERVAL_S,
    ) -> None:
        self.folder = Path(folder)
        self.stream = stream
        self.tty = _isatty(stream) if tty is None else tty
        self.state = ProgressState()
        self._clock = clock
        self._width = width or (lambda: shutil.get_terminal_size().columns)
        self._line_interval = line_interval
        self._tick_interval = tick_interval
        self._readers: dict[str, _FileReader] = {}
        self._lock = threading.RLock()  # one writer at a time: the thread, share()'s writers, stop
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        # log mode
        self._last_line = ""
        self._last_time: float | None = None
        self._completed: set[str] = set()
        # terminal mode: others' output on the current line, and where our text sits
        self._column = 0
        self._shown: str | None = None  # None, "inline" (after others' text) or "below"
        self._text = ""

    # -- reading
    def poll(self) -> None:
        """Fold in the events written since the last poll."""
        try:
            paths = sorted(self.folder.glob("*.jsonl"))
        except OSError:
            return
        for path in paths:
            reader = self._readers.setdefault(path.name, _FileReader())
            try:
                with path.open("rb") as fh:
                    fh.seek(reader.offset)
                    chunk = fh.read()
            except OSError:
                continue
            reader.offset += len(chunk)
            *lines, reader.rest = (reader.rest + chunk).split(b"\n")
            for line in lines:
                try:
                    self.state.apply(path.stem, json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue  # a line from a newer or broken writer: skip it, keep the rest
        for process in self.state.busy_processes():
            # A killed worker never reports the end of its build (file names are pids).
            if process.isdigit() and not pid_alive(int(process)):
                self.state.forget_jobs(process)

    # -- drawing
    def tick(self) -> None:
        """Poll, then draw (terminal) or print (log) the status if it is due."""
        self.poll()
        with self._lock:
            text = self.state.status()
            if self._stopped or not self.state.built or not text:
                return
            if self.tty:
                if text != self._text or self._shown is None:
                    self._out(self._erase() + self._draw(text))
            else:
                self._log_line(text)

    def _log_line(self, text: str) -> None:
        now = self._clock()
        completed = self.state.completed()
        just_completed, self._completed = completed - self._completed, completed
        if text == self._last_line:
            return
        if self._last_time is None or now - self._last_time >= self._line_interval or just_completed:
            self._out(self._own_line(text))
            self._last_line, self._last_time = text, now

    def _own_line(self, text: str) -> str:
        """`text` as a line of its own, after a newline if others' output left the line open."""
        start = "\n" if self._column else ""
        self._column = 0
        return start + text + "\n"

    def _columns(self) -> tuple[int, int]:
        width = max(self._width(), 2)
        return width, self._column % width  # a wrapped line: the cursor is on its last row

    def _erase(self) -> str:
        """Escapes that remove our text and put the cursor back after others' text."""
        _, column = self._columns()
        right = f"\x1b[{column}C" if column else ""
        shown, self._shown = self._shown, None
        if shown == "inline":
            return "\r" + right + "\x1b[K"
        if shown == "below":
            return "\r\x1b[K\x1b[1A\r" + right
        return ""

    def _draw(self, text: str) -> str:
        width, column = self._columns()
        self._text = text
        room = width - column - (2 if column else 1)
        if column == 0 or room >= MIN_ROOM:
            self._shown = "inline"
            return (" " if column else "") + _fit(text, room)
        self._shown = "below"
        return "\n" + _fit(text, width - 1)

    def _out(self, text: str) -> None:
        if text:
            self.stream.write(text)
            self.stream.flush()

    def share(self, other: TextIO, column: int = 0) -> TextIO:
        """A stand-in for `other` (a writer on the same terminal or log, now at `column`): on a
        terminal its writes lift the status line off first and put it back after, so neither
        overwrites the other; in a log, a status line starts on a line of its own."""
        self._column = column
        return _SharedOutput(other, self)

    def _write_other(self, other: TextIO, text: str) -> int:
        with self._lock:
            shown = self._shown is not None
            self._out(self._erase())
            written = other.write(text)
            other.flush()  # before ours: the two streams reach the terminal in this order
            self._column = _advance(self._column, text)
            if shown and not self._stopped:
                self._out(self._draw(self._text))
            return written

    # -- lifecycle
    def start(self) -> None:
        """Tick on a daemon thread every tick_interval until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="ws-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.wait(self._tick_interval):
            self.tick()

    def stop(self) -> None:
        """Stop the thread and leave the final status: a last line (log), or the line on its own
        row followed by a newline (terminal). Idempotent."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.poll()
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            text = self.state.status()
            if not self.state.built or not text:
                self._out(self._erase())
                return
            if self.tty:
                width, column = self._columns()
                erase = self._erase()
                self._out(erase + ("\n" if column else "") + _fit(text, width - 1) + "\n")
            elif text != self._last_line:
                self._out(self._own_line(text))


class _SharedOutput:
    """Another writer's file on the renderer's terminal; see :meth:`Renderer.share`."""

    def __init__(self, inner: TextIO, renderer: Renderer) -> None:
        self._inner = inner
        self._renderer = renderer

    def write(self, text: str) -> int:
        return self._renderer._write_other(self._inner, text)

    def flush(self) -> None:
        self._inner.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, … of the real file
        return getattr(self._inner, name)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (cache locks and event files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


@contextmanager
def own_stderr() -> Iterator[TextIO]:
    """A private handle on this process's stderr as it is now (a dup of fd 2), so later
    redirections of fd 2 (pytest capturing a test's output) do not swallow the status line;
    sys.stderr itself where it has no file descriptor (a test's capture object)."""
    try:
        fd: int | None = os.dup(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        fd = None
    if fd is None:
        yield sys.stderr
        return
    stream = os.fdopen(fd, "w", encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                       errors="replace")
    try:
        yield stream
    finally:
        stream.close()


@contextmanager
def rendering(stream: TextIO | None = None, *, enabled: bool = True) -> Iterator[Renderer | None]:
    """Show the progress of this process and of those it starts while the block runs.

    Makes a fresh run folder, points WS_PROGRESS_DIR at it (inherited by processes started
    inside the block) and renders it on `stream` (default: sys.stderr) from a thread; afterwards
    the final status is left, the variable restored and the folder removed. With `enabled`
    False it does nothing and yields None.
    """
    if not enabled:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix=f"ws-progress-{os.getpid()}-"))
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(folder)
    renderer = Renderer(folder, sys.stderr if stream is None else stream)
    renderer.start()
    try:
        yield renderer
    finally:
        try:
            renderer.stop()
        finally:
            if previous is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = previous
            _SINK.close()
            shutil.rmtree(folder, ignore_errors=True)
