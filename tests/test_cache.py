"""The content-addressed cache: keys, atomic entries, corrupt-entry rebuild, one build under xdist."""

import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ws_harness import cache as cache_module
from ws_harness.cache import CacheWarning, DiskCache, code_version, content_hash


def make_tensors() -> dict[str, torch.Tensor]:
    return {"x": torch.arange(6.0).reshape(2, 3)}


def test_entry_is_built_once_and_keyed_by_content(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    calls = []

    def build() -> dict[str, torch.Tensor]:
        calls.append(1)
        return make_tensors()

    a = cache.get_or_build_tensors("t", {"n": 1}, build)
    b = cache.get_or_build_tensors("t", {"n": 1}, build)
    assert torch.equal(a["x"], b["x"]) and len(calls) == 1
    cache.get_or_build_tensors("t", {"n": 2}, build)
    assert len(calls) == 2
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})


def test_producer_code_is_part_of_the_key(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    assert cache.key("t", {}, make_tensors) == cache.key("t", {}, make_tensors)
    assert cache.key("t", {}, make_tensors) != cache.key("t", {}, DiskCache.size_bytes)


def test_interrupted_build_leaves_no_entry(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)

    def broken() -> dict[str, torch.Tensor]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build_tensors("t", {"n": 1}, broken)
    kind_dir = tmp_path / "t"
    assert [p.name for p in kind_dir.iterdir() if not p.name.endswith(".lock")] == []
    assert cache.builds == []


def test_corrupt_entry_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    cache.get_or_build_tensors("t", {"n": 1}, make_tensors)
    (entry,) = [p for p in (tmp_path / "t").iterdir() if p.is_dir()]
    (entry / "tensors.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(CacheWarning, match=rf"t/{entry.name}: tensors.safetensors has 22 bytes"):
        again = cache.get_or_build_tensors("t", {"n": 1}, make_tensors)
    assert torch.equal(again["x"], make_tensors()["x"])
    assert len(cache.builds) == 2


def test_json_entries(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    assert cache.get_or_build_json("j", {}, lambda: {"a": [1, 2]}) == {"a": [1, 2]}
    assert cache.size_bytes() > 0


def test_each_artifact_is_built_once_across_xdist_workers(pytester: pytest.Pytester) -> None:
    counter = pytester.path / "builds.txt"
    pytester.makeconftest(
        f"""
        import os, time, pytest, torch
        from ws_harness.cache import DiskCache

        def build():
            with open({str(counter)!r}, "a") as fh:
                fh.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
            time.sleep(1.0)  # long enough that the other worker asks while it is building
            return {{"x": torch.ones(3)}}

        @pytest.fixture(scope="session")
        def artifact():
            return DiskCache({str(pytester.path / "cache")!r}).get_or_build_tensors("a", {{}}, build)
        """
    )
    pytester.makepyfile(
        "\n".join(
            f"def test_{i}(artifact):\n    assert float(artifact['x'].sum()) == 3.0\n"
            for i in range(6)
        )
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    workers = counter.read_text().split()
    assert len(workers) == 1, workers


# ---- integrity: every entry is verified against the manifest written when it was built ------
def _only_entry(root: Path, kind: str) -> Path:
    (entry,) = [p for p in (root / kind).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return entry


def test_a_flipped_bit_in_a_diff_entry_is_caught_by_its_sha256(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    w = {"model.layers.0.self_attn.o_proj.weight": torch.ones(8, 8)}

    def write(out: Path) -> None:
        save_file(w, str(out / "w.safetensors"))

    def load(path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path / "w.safetensors"))

    cache.get_or_build_dir("diff", {"seed": 0}, write, load)
    entry = _only_entry(tmp_path, "diff")
    data = bytearray((entry / "w.safetensors").read_bytes())
    data[-5] ^= 0x10  # one bit of one float: the file still loads, with a different value
    (entry / "w.safetensors").write_bytes(bytes(data))
    with pytest.warns(CacheWarning, match=rf"diff/{entry.name}: w.safetensors has sha256 .* "
                      r"expected .*; removed, rebuilding"):
        again = cache.get_or_build_dir("diff", {"seed": 0}, write, load)
    assert torch.equal(again["model.layers.0.self_attn.o_proj.weight"], torch.ones(8, 8))
    assert len(cache.builds) == 2


def test_large_entries_get_size_and_header_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Above the hashing threshold only the cheap checks run: a truncated or shortened file, or a
    # damaged safetensors header, is still caught even when `load` itself would not notice.
    monkeypatch.setattr(cache_module, "FULL_HASH_MAX_BYTES", 0)
    cache = DiskCache(tmp_path)

    def write(out: Path) -> None:
        save_file(make_tensors(), str(out / "tensors.safetensors"))
        (out / "blob.bin").write_bytes(b"x" * 100)

    def build() -> Path:
        return cache.get_or_build_dir("capture", {}, write, load=lambda p: p)

    entry = build()
    (entry / "blob.bin").write_bytes(b"x" * 99)
    with pytest.warns(CacheWarning, match=rf"capture/{entry.name}: blob.bin has 99 bytes, "
                      "expected 100"):
        build()
    st = entry / "tensors.safetensors"
    data = bytearray(st.read_bytes())
    data[8:10] = b"[["  # same size, but the JSON header no longer parses
    st.write_bytes(bytes(data))
    with pytest.warns(CacheWarning, match=r"tensors.safetensors: its header is not valid JSON"):
        build()
    (entry / "blob.bin").unlink()
    with pytest.warns(CacheWarning, match=r"blob.bin is missing"):
        build()
    assert len(cache.builds) == 4


def test_an_entry_without_a_manifest_is_not_trusted(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    cache.get_or_build_json("j", {}, lambda: [1])
    (_only_entry(tmp_path, "j") / "manifest.json").unlink()
    with pytest.warns(CacheWarning, match="no manifest.json"):
        assert cache.get_or_build_json("j", {}, lambda: [1]) == [1]


# ---- keys follow the producing code's import closure inside the package -------------------
def _producers() -> dict[str, Callable[..., object]]:
    from ws_harness.capture import capture_last_token
    from ws_harness.retention import steering_effects
    from ws_harness.scoring import score_bases
    from ws_harness.steering import steering_curve

    return {"scores": score_bases, "retention": steering_effects, "capture": capture_last_token,
            "steering": steering_curve}


def _hypothesis_builder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: str = ""
) -> Callable[..., object]:
    """A hypothesis file outside the package, importing builders (as hypotheses/ files do)."""
    path = tmp_path / "hyp_closure_probe.py"
    path.write_text(
        "from ws_harness.builders import write_not\n"
        "from ws_harness.hypothesis import per_layer\n\n\n"
        "def basis(fit, layer):\n    return None\n" + edit
    )
    spec = importlib.util.spec_from_file_location("hyp_closure_probe", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "hyp_closure_probe", module)  # as pytest imports test files
    spec.loader.exec_module(module)
    return module.basis


def test_keys_follow_the_producers_import_closure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = DiskCache(tmp_path)
    producers = {**_producers(), "basis": _hypothesis_builder(tmp_path, monkeypatch)}

    def keys() -> dict[str, str]:
        return {name: cache.key(name, {}, fn) for name, fn in producers.items()}

    before = keys()
    real = cache_module._module_source_hash
    changed: dict[str, set[str]] = {}
    for module in cache_module.package_modules():
        monkeypatch.setattr(cache_module, "_module_source_hash",
                            lambda name, edited=module: "edited" if name == edited else real(name))
        after = keys()
        changed[module] = {name for name in producers if after[name] != before[name]}
    monkeypatch.setattr(cache_module, "_module_source_hash", real)
    assert keys() == before
    # The issue's cases: scores depend on scores/nulls/linalg, bases on builders/linalg, curves
    # and labels on weight_steer (diffs.py); nothing depends on the report or the CLI.
    for module in ("ws_harness.scores", "ws_harness.nulls", "ws_harness.linalg",
                   "ws_harness.scoring"):
        assert "scores" in changed[module], module
    for module in ("ws_harness.builders", "ws_harness.linalg", "ws_harness.hypothesis"):
        assert "basis" in changed[module], module
    assert "steering" in changed["ws_harness.diffs"]
    for module in ("ws_harness.report", "ws_harness.cli", "ws_harness.findings",
                   "ws_harness.plugin", "ws_harness.cache"):
        assert changed[module] == set(), module
    assert "basis" not in changed["ws_harness.retention"]
    assert "capture" not in changed["ws_harness.scores"]
    # Editing the hypothesis file itself changes only its own key.
    producers["basis"] = _hypothesis_builder(tmp_path, monkeypatch, edit="# edited\n")
    now = keys()
    assert now["basis"] != before["basis"]
    assert {k: v for k, v in now.items() if k != "basis"} == {
        k: v for k, v in before.items() if k != "basis"}


def test_several_producers_key_on_the_union_of_their_closures() -> None:
    # Labels are captured under weight_steer: (capture_last_token, weight_steer) keys on both.
    from ws_harness.capture import capture_last_token
    from ws_harness.diffs import weight_steer

    both = cache_module.code_closure((capture_last_token, weight_steer))
    assert {"ws_harness.capture", "ws_harness.diffs"} <= set(both)
    assert "ws_harness.diffs" not in cache_module.code_closure(capture_last_token)
    assert code_version((capture_last_token, weight_steer)) != code_version(capture_last_token)


def test_code_version_is_computed_once_per_process() -> None:
    producers = list(_producers().values())
    code_version(producers[0])
    start = time.perf_counter()
    for _ in range(2000):
        for fn in producers:
            code_version(fn)
    assert time.perf_counter() - start < 1.0


# ---- waiting on another process's build, and what an interrupted build leaves ---------------
_HOLDER = """
import os, sys, time
from ws_harness.cache import DiskCache

def build():
    open(sys.argv[2], "w").write("started")
    {action}
    return [1]

# The producer is named so that the test process computes the same key.
DiskCache(sys.argv[1]).get_or_build_json("slow", {{"n": 1}}, build, producer=DiskCache.size_bytes)
"""


def _start(tmp_path: Path, action: str) -> tuple[subprocess.Popen[bytes], Path]:
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER.format(action=action))
    marker = tmp_path / "started.txt"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(marker)])
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None or action.startswith("os._exit"), "the holder died early"
        assert time.monotonic() < deadline, "the holder never started building"
        time.sleep(0.05)
    return proc, marker


def test_a_waiting_build_says_which_entry_and_which_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cache_module, "WAIT_NOTICE_S", 0.2)
    proc, _ = _start(tmp_path, "time.sleep(3)")
    try:
        cache = DiskCache(tmp_path / "cache")
        got = cache.get_or_build_json("slow", {"n": 1}, lambda: pytest.fail("built twice"),
                                      producer=DiskCache.size_bytes)
    finally:
        proc.wait(60)
    assert got == [1] and cache.builds == []
    err = capsys.readouterr().err
    key = cache.key("slow", {"n": 1}, DiskCache.size_bytes)
    assert f"waiting for slow/{key}" in err and f"pid {proc.pid}" in err, err
    assert not list((tmp_path / "cache" / "slow").glob("*.owner"))  # the sidecar goes with the lock


def test_an_interrupted_builds_temporary_folder_is_removed_at_next_access(tmp_path: Path) -> None:
    proc, _ = _start(tmp_path, "os._exit(9)")  # as kill -9: no finally block runs
    assert proc.wait(60) == 9
    kind = tmp_path / "cache" / "slow"
    assert [p.name for p in kind.iterdir() if ".tmp-" in p.name], "the holder left no tmp folder"
    cache = DiskCache(tmp_path / "cache")
    assert cache.get_or_build_json("slow", {"n": 2}, lambda: [2]) == [2]  # another entry
    assert [p.name for p in kind.iterdir() if ".tmp-" in p.name] == []


# ---- heavy builds take one of a few cross-process slots ---------------------------------------
_HEAVY_HOLDER = """
import sys, time
from ws_harness.cache import DiskCache

def build():
    open(sys.argv[2], "w").write("started")
    time.sleep(1.5)
    open(sys.argv[3], "w").write(repr(time.time()))
    return [1]

DiskCache(sys.argv[1], heavy_slots=int(sys.argv[5])).get_or_build_json(
    sys.argv[4], {"holder": 1}, build, producer=DiskCache.size_bytes)
"""


@pytest.mark.parametrize(("kind", "slots", "waits"), [
    ("attribution", 1, True),  # heavy, one slot: the second build waits for the first
    ("attribution", 2, False),  # heavy, two slots: both run at once
    ("scores", 1, False),  # not a heavy kind: never waits for a slot
])
def test_heavy_builds_take_turns_when_the_slots_are_taken(
    tmp_path: Path, kind: str, slots: int, waits: bool
) -> None:
    script, started, ended = tmp_path / "heavy.py", tmp_path / "started", tmp_path / "ended"
    script.write_text(_HEAVY_HOLDER)
    root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(started), str(ended),
                             kind, str(slots)])
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the holder never built"
            time.sleep(0.02)
        began: list[float] = []
        cache = DiskCache(root, heavy_slots=slots)
        cache.get_or_build_json(kind, {"other": 2}, lambda: began.append(time.time()) or [2])
    finally:
        assert proc.wait(60) == 0
    holder_end = float(ended.read_text())
    assert (began[0] >= holder_end) is waits, (began[0], holder_end)
    assert len(cache.slot_waits) == (1 if kind in cache_module.HEAVY_KINDS else 0)


def test_a_heavy_build_nested_in_another_uses_its_slot(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, heavy_slots=1)

    def outer() -> list[int]:
        inner = cache.get_or_build_json("retention_reference", {"n": 1}, lambda: [1])
        return inner + [2]

    assert cache.get_or_build_json("retention", {"n": 1}, outer) == [1, 2]
    assert len(cache.slot_waits) == 1 and cache.builds[0].startswith("retention_reference/")
    assert cache._slot is None  # given back


def test_a_heavy_build_inside_a_light_one_still_takes_a_slot(tmp_path: Path) -> None:
    """scores builds call attribution: the light outer build must not lend a slot it lacks."""
    cache = DiskCache(tmp_path, heavy_slots=1)

    def scores() -> list[int]:
        assert cache._slot is None  # a light build holds nothing
        return cache.get_or_build_json("attribution", {"n": 1}, lambda: [int(cache._slot is not None)])

    assert cache.get_or_build_json("scores", {"n": 1}, scores) == [1]
    assert len(cache.slot_waits) == 1 and cache._slot is None


_SLOT_WAITER = """
import os, sys, threading, time
from ws_harness.cache import DiskCache

threading.Timer(30, lambda: os._exit(3)).start()  # a deadlock ends the test, not the CI run
DiskCache(sys.argv[1], heavy_slots=1).get_or_build_json(
    "retention_reference", {"n": 1}, lambda: [7], producer=DiskCache.size_bytes)
os._exit(0)
"""


def test_a_slot_holder_lends_its_slot_while_it_waits_for_another_process(tmp_path: Path) -> None:
    """The deadlock the rule prevents: we hold the only slot and need an entry another process
    is about to build, and that process needs the slot. We lend it while we wait."""
    cache = DiskCache(tmp_path / "cache", heavy_slots=1)
    script = tmp_path / "waiter.py"
    script.write_text(_SLOT_WAITER)
    key = cache.key("retention_reference", {"n": 1}, DiskCache.size_bytes)
    owner = cache.path("retention_reference", key).with_name(f"{key}.lock.owner")
    procs = []

    def outer() -> list[int]:
        procs.append(subprocess.Popen([sys.executable, str(script), str(cache.root)]))
        deadline = time.monotonic() + 60
        while not owner.exists():  # it holds the entry's lock and now waits for our slot
            assert procs[0].poll() is None and time.monotonic() < deadline, "the waiter died"
            time.sleep(0.02)
        return cache.get_or_build_json("retention_reference", {"n": 1},
                                       lambda: pytest.fail("built here"),
                                       producer=DiskCache.size_bytes) + [8]

    try:
        assert cache.get_or_build_json("retention", {"n": 1}, outer) == [7, 8]
    finally:
        assert procs and procs[0].wait(60) == 0  # 3: it timed out on the slot (a deadlock)
    assert cache._slot is None


def test_the_slot_count_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache_module.HEAVY_SLOTS_ENV, "3")
    assert cache_module.default_heavy_slots() == 3
    monkeypatch.setenv(cache_module.HEAVY_SLOTS_ENV, "0")  # no limit
    assert cache_module.default_heavy_slots() == 0
    for bad in ("two", "-1"):
        monkeypatch.setenv(cache_module.HEAVY_SLOTS_ENV, bad)
        with pytest.raises(ValueError, match=f"WS_HEAVY_SLOTS={bad!r}"):
            cache_module.default_heavy_slots()
