"""Content-addressed on-disk cache: atomic entries, one builder per entry across xdist workers."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from ws_harness import __version__

__all__ = ["CacheWarning", "DiskCache", "code_version", "content_hash", "worker_order"]

T = TypeVar("T")


class CacheWarning(UserWarning):
    """A cache entry could not be loaded and is being rebuilt."""


def content_hash(obj: Any) -> str:
    """sha256 of a canonical JSON rendering (sorted keys); stable across processes, unlike hash()."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    ).hexdigest()


def code_version(producer: Callable[..., Any] | None) -> str:
    """Hash of the source of the module that defines `producer`: editing it invalidates its entries."""
    if producer is None:
        return __version__
    module = inspect.getmodule(producer)
    try:
        source = inspect.getsource(module) if module is not None else producer.__qualname__
    except (OSError, TypeError):
        source = getattr(producer, "__qualname__", repr(producer))
    return hashlib.sha256(f"{__version__}\n{source}".encode()).hexdigest()[:16]


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


class DiskCache:
    """Entries live at `root/<kind>/<key>/`; the key hashes the inputs and the producing code.

    An entry is built in a private temporary directory and renamed into place, so readers only
    ever see complete entries and an interrupted build leaves none. A `filelock` per entry makes
    concurrent workers wait for the one builder instead of building again. An entry that fails
    to load is reported with a CacheWarning, removed and rebuilt, never trusted.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.builds: list[str] = []  # "<kind>/<key>" built by this process, for reports and tests

    def key(self, kind: str, parts: dict[str, Any], producer: Callable[..., Any] | None) -> str:
        return content_hash({"kind": kind, "parts": parts, "code": code_version(producer)})[:32]

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get_or_build_dir(
        self,
        kind: str,
        parts: dict[str, Any],
        build: Callable[[Path], None],
        load: Callable[[Path], T],
        producer: Callable[..., Any] | None = None,
    ) -> T:
        """Return `load(entry_dir)`, first running `build(tmp_dir)` if the entry is missing or bad."""
        key = self.key(kind, parts, producer or build)
        final = self.path(kind, key)
        if final.is_dir():
            try:
                return load(final)
            except Exception:  # noqa: BLE001 - re-checked under the lock below
                pass
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if final.is_dir():
                try:
                    return load(final)
                except Exception as exc:  # noqa: BLE001 - any load failure means rebuild
                    warnings.warn(
                        CacheWarning(f"cache entry {final} failed to load ({exc!r}); rebuilding"),
                        stacklevel=2,
                    )
                    shutil.rmtree(final, ignore_errors=True)
            tmp = final.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                build(tmp)
                (tmp / "parts.json").write_text(
                    json.dumps({"kind": kind, "parts": parts}, indent=1, default=str)
                )
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.builds.append(f"{kind}/{key}")
            return load(final)

    def get_or_build_tensors(
        self,
        kind: str,
        parts: dict[str, Any],
        build: Callable[[], dict[str, torch.Tensor]],
        producer: Callable[..., Any] | None = None,
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
        producer: Callable[..., Any] | None = None,
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
