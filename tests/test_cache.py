"""The content-addressed cache: keys, atomic entries, corrupt-entry rebuild, one build under xdist."""

from pathlib import Path

import pytest
import torch

from ws_harness.cache import CacheWarning, DiskCache, content_hash


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
    with pytest.warns(CacheWarning, match="failed to load"):
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
