"""The status line: processes merged, a throttled log, a line rewritten in place, cold and warm sweeps."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ws_harness import progress
from ws_harness.progress import ENV_VAR, PREFIX, Renderer
from ws_harness.session import HarnessSession

WriteProject = Callable[[pytest.Pytester, Path, list[Path]], Path]  # conftest fixture


@pytest.fixture
def run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A run folder this process's events go to (as a worker's would)."""
    folder = tmp_path / "run"
    folder.mkdir()
    monkeypatch.setenv(ENV_VAR, str(folder))
    yield folder
    progress._SINK.close()  # the next test's folder gets a fresh file


def _write(folder: Path, process: str, *events: dict) -> None:
    with (folder / f"{process}.jsonl").open("a") as fh:
        for event in events:
            fh.write(json.dumps(event) + "\n")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_events_go_to_this_process_file_only_when_a_run_folder_is_set(
    run_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    progress.expect("basis", 3)
    progress.begin("capture", "k1")
    progress.step("diff", "diff scripted seed 0 positive", 2, 16)
    (events_file,) = run_folder.glob("*.jsonl")
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [e["event"] for e in events] == ["expect", "begin", "step"]
    assert events[2] == {"event": "step", "phase": "diff", "label": "diff scripted seed 0 positive",
                         "n": 2, "total": 16}
    monkeypatch.delenv(ENV_VAR)
    progress.done("basis", "k2")  # a library call outside any run: dropped
    assert len(events_file.read_text().splitlines()) == 3
    with pytest.raises(TypeError, match="total must be an int, got '3'"):
        progress.expect("basis", "3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be non-negative, got -1"):
        progress.step("diff", "x", -1, 4)


def test_processes_are_merged_union_of_keys_and_largest_total(tmp_path: Path) -> None:
    _write(tmp_path, "proc-a",
           {"event": "expect", "phase": "basis", "total": 4},
           {"event": "done", "phase": "basis", "key": "b1"},
           {"event": "done", "phase": "basis", "key": "b2"},
           {"event": "begin", "phase": "capture", "label": "c1"})
    _write(tmp_path, "proc-b",
           {"event": "expect", "phase": "basis", "total": 5},
           {"event": "done", "phase": "basis", "key": "b2"},  # read by both: counted once
           {"event": "done", "phase": "basis", "key": "b3"},
           {"event": "expect", "phase": "scores", "total": 4},
           {"event": "done", "phase": "scores", "key": "s1"},
           {"event": "step", "phase": "diff", "label": "diff scripted seed 1 positive", "n": 4,
            "total": 16})
    renderer = Renderer(tmp_path, io.StringIO(), tty=False)
    renderer.poll()
    assert renderer.state.totals == {"basis": 5, "scores": 4}
    assert renderer.state.done["basis"] == {"b1", "b2", "b3"}
    assert renderer.state.status() == (
        "ws-harness: diff scripted seed 1 positive step 4/16 | captures… | bases 3/5 | scores 1/4")
    assert renderer.state.building("proc-a") == ["capture:c1"]
    assert renderer.state.building("proc-b") == [] and renderer.state.building("gone") == []

    # Only new lines are read; a line still being written waits for its newline.
    with (tmp_path / "proc-a.jsonl").open("a") as fh:
        fh.write(json.dumps({"event": "end", "phase": "capture", "label": "c1"}) + "\n")
        fh.write('{"event": "done", "phase": "capture", "key": "c1"}\n')
        fh.write('{"event": "done", "phase": "basis", "ke')
    renderer.poll()
    assert renderer.state.status() == (
        "ws-harness: diff scripted seed 1 positive step 4/16 | bases 3/5 | scores 1/4")
    assert renderer.state.building("proc-a") == []  # its build has ended
    with (tmp_path / "proc-a.jsonl").open("a") as fh:
        fh.write('y": "b4"}\n{"event": "done", "phase": "basis", "key": "b5"}\n'
                 '{"event": "done", "phase": "basis", "key": "b6"}\n')
    renderer.poll()
    # More items than expected (the catalog's hypotheses): the total follows the count.
    assert "bases 6/6" in renderer.state.status()


def test_a_log_gets_one_line_per_30_s_and_one_when_a_phase_completes(run_folder: Path) -> None:
    clock, out = FakeClock(), io.StringIO()
    renderer = Renderer(run_folder, out, tty=False, clock=clock)
    progress.expect("scores", 1200)
    progress.begin("scores", "first")
    for second in range(1200):  # a 20-minute run finishing one score a second
        clock.now = float(second)
        progress.done("scores", f"s{second}")
        renderer.tick()
    renderer.stop()
    lines = out.getvalue().splitlines()
    # the first at 0 s, one per 30 s until 1170 s, and the phase's completion at 1199 s
    assert len(lines) == 1 + 39 + 1, lines
    assert lines[0] == "ws-harness: scores 1/1200"
    assert lines[1] == "ws-harness: scores 31/1200"
    assert lines[-1] == "ws-harness: scores 1200/1200"
    assert out.getvalue().count("\r") == 0


def test_a_log_line_starts_on_a_line_of_its_own(run_folder: Path) -> None:
    clock, out = FakeClock(), io.StringIO()
    renderer = Renderer(run_folder, out, tty=False, clock=clock)
    shared = renderer.share(io.StringIO())
    progress.begin("capture", "c1")
    shared.write("...")  # pytest's letters, their line still open
    renderer.tick()
    assert out.getvalue() == "\nws-harness: captures…\n"
    progress.end("capture", "c1")
    progress.begin("basis", "b1")
    clock.now = 30.0
    renderer.tick()  # nothing of pytest's since: no empty line
    assert out.getvalue() == "\nws-harness: captures…\nws-harness: bases…\n"


def test_the_builds_of_a_dead_process_are_not_shown(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write(tmp_path, str(gone.pid), {"event": "begin", "phase": "capture", "label": "c1"},
           {"event": "done", "phase": "basis", "key": "b1"})
    _write(tmp_path, str(os.getpid()), {"event": "begin", "phase": "labels", "label": "l1"})
    renderer = Renderer(tmp_path, io.StringIO(), tty=False)
    renderer.poll()
    assert renderer.state.status() == "ws-harness: labels…"  # not "captures…" of the killed one
    assert renderer.state.done["basis"] == {"b1"}  # what it finished still counts


def test_a_terminal_line_is_rewritten_in_place_and_yields_to_other_output(run_folder: Path) -> None:
    out, other = io.StringIO(), io.StringIO()
    renderer = Renderer(run_folder, out, tty=True, width=lambda: 80)
    shared = renderer.share(other)
    progress.expect("basis", 2)
    progress.begin("model", "m")
    renderer.tick()
    assert out.getvalue() == "ws-harness: model conversion… | bases 0/2"
    progress.end("model", "m")
    progress.done("basis", "b1")
    renderer.tick()
    assert out.getvalue().endswith("\r\x1b[Kws-harness: bases 1/2")  # same line, cleared first
    renderer.tick()  # nothing new: nothing written
    assert out.getvalue().count("ws-harness") == 2

    # pytest writes "..": the status is lifted off, the dots written, the status put back after them
    before = len(out.getvalue())
    assert shared.write("..") == 2
    assert other.getvalue() == ".."
    assert out.getvalue()[before:] == "\r\x1b[K ws-harness: bases 1/2"
    progress.done("basis", "b2")
    renderer.tick()
    assert out.getvalue().endswith("\r\x1b[2C\x1b[K ws-harness: bases 2/2")  # after the dots

    # a line almost full of others' output: the status goes to the row below, and comes back
    shared.write("." * 70)
    assert out.getvalue().endswith("\nws-harness: bases 2/2")
    shared.write("\n")
    assert out.getvalue().endswith("\r\x1b[K\x1b[1A\r\x1b[72C" + "ws-harness: bases 2/2")
    renderer.stop()
    assert out.getvalue().endswith("ws-harness: bases 2/2\n")
    assert out.getvalue().count("\n") == 2  # the row below once, and the final newline


def test_nothing_is_printed_when_nothing_was_built(run_folder: Path) -> None:
    for tty in (False, True):
        out = io.StringIO()
        renderer = Renderer(run_folder, out, tty=tty)
        progress.expect("scores", 2)
        progress.done("scores", "s1")  # read from the cache, as in a warm run
        renderer.tick()
        renderer.stop()
        assert out.getvalue() == "", tty


def test_rendering_sets_and_restores_the_run_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "/outer/run")
    out = io.StringIO()
    with progress.rendering(out) as renderer:
        assert renderer is not None
        folder = Path(renderer.folder)
        assert folder.is_dir() and str(folder) == os.environ[ENV_VAR]
        progress.begin("diff", "k")
        progress.step("diff", "diff scripted seed 3 positive", 5, 16)
    assert os.environ[ENV_VAR] == "/outer/run" and not folder.exists()
    assert out.getvalue() == "ws-harness: diff scripted seed 3 positive step 5/16\n"


# ---- sweeps -----------------------------------------------------------------------------------
HYPOTHESIS = '''
"""{name}: {doc}"""
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="test", axis="write")
def basis(fit, layer):
    return left_basis(fit.weights(layer).{role}, fit.k)
'''
STATUS = re.compile(r"^ws-harness: .*$", re.MULTILINE)


def test_a_cold_sweep_shows_its_progress_and_a_warm_one_stays_quiet(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject, tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    tiny.loaded  # noqa: B018 - the shared cache holds the converted tokenizer: seed it (~10 s less)
    for kind in ("tokenizer", "hashes"):
        shutil.copytree(tiny.cache.root / kind, cache / kind, dirs_exist_ok=True)
    folder = write_tiny_project(pytester, cache, tiny_diff_files)
    for role in ("o", "down"):
        (folder / f"test_{role}_write.py").write_text(
            HYPOTHESIS.format(name=f"{role}_write", doc=f"left SVs of W_{role}", role=role))
    sweep = ("hypotheses", "-p", "no:cacheprovider", "--deselect", "ws_ranking")
    cold = pytester.runpytest_subprocess(*sweep, "-n", "2")
    assert (pytester.path / "out" / "summary.csv").is_file(), cold.stdout.str()
    lines = STATUS.findall(cold.stderr.str())
    # A log, not a terminal: a line at once, one per 30 s, one per completed phase (bases,
    # scores) and the last at the end; never a line per event.
    assert 2 <= len(lines) <= 4 + cold.duration / 30, cold.stderr.str()
    # 2 hypotheses: 2 bases; 2 diffs: 4 scores; counted over both workers
    assert lines[-1].endswith("bases 2/2 | scores 4/4"), lines

    warm = pytester.runpytest_subprocess(*sweep, "-n", "0")
    assert (pytester.path / "out" / "summary.csv").is_file(), warm.stdout.str()
    assert PREFIX not in warm.stderr.str(), warm.stderr.str()


def test_nested_timed_phases_count_once(tiny: HarnessSession,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A phase timed inside another counts for itself only: the phases add up to the time spent
    (a fake clock, so the accounting is checked exactly, not against real time)."""
    import types

    from ws_harness import session as session_module

    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(session_module, "time", types.SimpleNamespace(
        perf_counter=lambda: clock["wall"], process_time=lambda: clock["cpu"]))

    def spend(wall: float, cpu: float) -> None:
        clock["wall"] += wall
        clock["cpu"] += cpu

    session = HarnessSession(tiny.config)
    with session.timed("outer"):
        spend(1.0, 0.5)
        with session.timed("inner"):
            spend(4.0, 3.0)
        spend(2.0, 1.0)
    with session.timed("inner"):
        spend(8.0, 8.0)
    assert session.timings == {"outer": 3.0, "outer.cpu": 1.5, "inner": 12.0, "inner.cpu": 11.0}
