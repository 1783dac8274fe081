"""Editing copies of finished run folders (results.json), shared by the merge and compare tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["copy_run", "set_at"]

Edit = Callable[[dict[str, Any]], None]


def copy_run(run: Path, target: Path, edit: Edit) -> Path:
    """A copy of a run folder whose results.json is passed through `edit(data) -> None`."""
    shutil.copytree(run, target)
    data = json.loads((target / "results.json").read_text())
    edit(data)
    (target / "results.json").write_text(json.dumps(data))
    return target


def set_at(path: str, value: Any) -> Edit:
    """An edit that sets the dotted `path` (e.g. "inputs.model.spec") of results.json to `value`."""
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    return edit
