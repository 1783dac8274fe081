"""Read-only inputs for builders: find every tensor a context holds and detect in-place edits of them.

torch has no read-only tensors, but every tensor carries a version counter that each in-place
operation bumps (views share their base's counter; autograd relies on it). Recording the
counters before a build and comparing after catches `X -= X.mean(0)`, `resid[l][:, :8].mul_(10)`
and the like at the cost of a walk over a few hundred objects, not a pass over the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["InputsModified", "tensor_paths", "versions", "edited"]


class InputsModified(ValueError):
    """A builder edited a tensor of the context it was given, in place."""


def tensor_paths(
    obj: Any, path: str = "fit", _seen: set[int] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor reachable through mappings, sequences, dataclasses and
    plain attributes of `obj`, each once (the first path found names it)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if isinstance(obj, Mapping):
        children: Any = ((f"{path}[{k!r}]", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = ((f"{path}.{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        # Private bundles of inputs last, so a tensor is named by its public attribute.
        attrs = sorted(vars(obj).items(), key=lambda kv: kv[0] == "_inputs")
        children = ((f"{path}.{k.lstrip('_')}", v) for k, v in attrs)
    else:
        return
    for child_path, child in children:
        yield from tensor_paths(child, child_path, seen)


def versions(obj: Any, path: str = "fit") -> dict[str, tuple[torch.Tensor, int]]:
    """path → (tensor, its version counter now), for every tensor `obj` holds."""
    return {p: (t, t._version) for p, t in tensor_paths(obj, path)}


def edited(before: dict[str, tuple[torch.Tensor, int]]) -> list[str]:
    """The paths of `before` whose tensor was modified in place since it was recorded."""
    return sorted(p for p, (t, v) in before.items() if t._version != v)
