"""Weight-steering diffs w = Δ⁺ − Δ⁻ (SPEC §2.3): load, validate, save, diagnose, weight_steer."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ws_harness.cache import safetensors_problem

__all__ = [
    "DIFF_SUFFIXES",
    "Diff",
    "DiffValidationError",
    "model_param_shapes",
    "normalise_key",
    "validate_diff",
    "load_diff",
    "load_diffs",
    "save_diff",
    "diff_sha256",
    "diff_diagnostics",
    "weight_steer",
]

DIFF_SUFFIXES = (".pt", ".safetensors")
# PEFT prefixes parameter names with this; a diff saved from a PeftModel's state_dict still
# names the base model's parameters once it is stripped.
_PEFT_PREFIX = "base_model.model."


class DiffValidationError(ValueError):
    """A diff does not fit the model; the message names the key, the value found and the shape."""


@dataclass
class Diff:
    """One weight-steering diff `w` (SPEC §2.3): parameter name → float32 delta of that shape.

    `seed` is the build seed (None for a loaded file), `source` the file path or
    "built:<recipe>", `sha256` a hash of the tensors (independent of the file format, so the
    same diff saved as .pt or .safetensors keys the same cache entries), `diagnostics` the
    norms and touched keys of `diff_diagnostics`.
    """

    name: str
    seed: int | None
    w: dict[str, torch.Tensor]
    source: str
    sha256: str
    recipe: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # the tensors would flood logs and pytest output
        return (f"Diff(name={self.name!r}, seed={self.seed}, keys={len(self.w)}, "
                f"source={self.source!r}, sha256={self.sha256[:12]}…)")


def model_param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of `model`, keyed by name (tied weights appear once)."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def normalise_key(key: str) -> str:
    """Strip PEFT's `base_model.model.` prefix, so a PeftModel-named diff names base parameters."""
    return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


def _shapes_of(target: Any) -> dict[str, tuple[int, ...]]:
    # Accept an Architecture (its .model), a model, or a precomputed {name: shape} mapping.
    if isinstance(target, Mapping):
        return {str(k): tuple(v) for k, v in target.items()}
    model = getattr(target, "model", None)
    if isinstance(target, torch.nn.Module):
        return model_param_shapes(target)
    if isinstance(model, torch.nn.Module):
        return model_param_shapes(model)
    raise TypeError(
        f"validate_diff needs an Architecture, a model or a {{name: shape}} mapping, "
        f"got {type(target).__name__}"
    )


def _example_keys(shapes: Mapping[str, tuple[int, ...]], n: int = 3) -> str:
    layer_keys = [k for k in shapes if ".layers." in k] or list(shapes)
    return ", ".join(f"{k} {list(shapes[k])}" for k in layer_keys[:n])


def validate_diff(
    w: Any, target: Any, source: str = "diff"
) -> dict[str, torch.Tensor]:
    """Check a diff against a model and return it as {base parameter name: float32 tensor}.

    Every key must name a parameter of the model (any parameter, not only the seven LoRA
    roles q,k,v,o,gate,up,down: a diff that also moved a norm or the embedding still steers,
    and the weight scores of SPEC §4 simply read its o_proj/down_proj entries); its value must
    be a finite floating tensor of exactly that parameter's shape; the diff must not be empty.
    Raises DiffValidationError (a ValueError) naming the key, what was found and the expected
    shape, or TypeError for values that are not tensors. Nothing is modified.
    """
    shapes = _shapes_of(target)
    if not isinstance(w, Mapping):
        raise TypeError(
            f"{source}: a diff is a dict {{parameter name: delta tensor}}, got "
            f"{type(w).__name__}; save it with torch.save({{name: tensor, ...}}, path)"
        )
    if len(w) == 0:
        raise DiffValidationError(
            f"{source}: the diff is empty; it needs at least one key such as "
            f"{_example_keys(shapes, 1)} (name [expected shape])"
        )
    out: dict[str, torch.Tensor] = {}
    for raw_key, value in w.items():
        if not isinstance(raw_key, str):
            raise TypeError(f"{source}: key {raw_key!r} is not a parameter-name string")
        key = normalise_key(raw_key)
        if key not in shapes:
            raise DiffValidationError(
                f"{source}: key {raw_key!r} is not a parameter of the model "
                f"(expected names like {_example_keys(shapes)}; name [expected shape])"
            )
        expected = shapes[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{source}: key {raw_key!r} holds a {type(value).__name__}, not a tensor "
                f"of shape {list(expected)}"
            )
        if not value.is_floating_point():
            raise DiffValidationError(
                f"{source}: key {raw_key!r} has dtype {value.dtype}; expected a floating "
                f"tensor of shape {list(expected)}"
            )
        if tuple(value.shape) != expected:
            raise DiffValidationError(
                f"{source}: key {raw_key!r} has shape {list(value.shape)}, expected shape "
                f"{list(expected)} (the shape of that model parameter)"
            )
        if key in out:
            raise DiffValidationError(
                f"{source}: key {raw_key!r} names {key!r}, which the diff already holds "
                f"(with and without the {_PEFT_PREFIX!r} prefix); keep one, shape {list(expected)}"
            )
        value = value.detach().to(device="cpu", dtype=torch.float32)
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise DiffValidationError(
                f"{source}: key {raw_key!r} (shape {list(expected)}) has {bad} non-finite "
                "value(s) (NaN or inf); a diff must be finite everywhere"
            )
        out[key] = value.contiguous()
    return out


def diff_sha256(w: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted (key, shape, float32 bytes): one diff hashes alike in any file format."""
    digest = hashlib.sha256()
    for key in sorted(w):
        tensor = w[key].detach().to(torch.float32).contiguous().cpu()
        digest.update(f"{key}|{list(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _pt_problem(path: Path, exc: Exception) -> str:
    """Our one-line account of why torch.load(weights_only=True) refused a .pt file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
    text = str(exc)
    save_hint = "save the diff as torch.save({name: tensor, ...}, path) or as .safetensors"
    if head.startswith(b"PK"):  # torch.save's zip container
        refused = re.search(r"GLOBAL ([\w.]+) was not an allowed global", text)
        if refused:
            return (f"{path}: holds a pickled {refused[1]}, which ws-harness will not unpickle "
                    f"(loading a diff must not run code); a .pt diff holds only tensors: "
                    f"torch.save({{name: tensor, ...}}, path), converting arrays with "
                    f"torch.from_numpy")
        if isinstance(exc, pickle.UnpicklingError):
            detail = re.search(r"WeightsUnpickler error: (.*?)(?:\n\n|$)", text, re.S)
            what = " ".join((detail[1] if detail else type(exc).__name__).split())
            return (f"{path}: holds pickled objects other than tensors ({what}), which ws-harness "
                    f"will not unpickle; {save_hint}")
        return f"{path}: a damaged or truncated torch.save file ({size} bytes); save or copy it again"
    if head[:1] == b"\x80":  # a pickle protocol marker without the zip container
        return (f"{path}: a Python pickle, not a torch.save file; ws-harness does not unpickle "
                f"arbitrary pickles (they can run code): {save_hint}")
    return f"{path}: not a torch.save file (it starts with {head!r}); {save_hint}"


def _read_file(path: Path) -> tuple[Any, dict[str, str]]:
    if path.stat().st_size == 0:
        raise DiffValidationError(f"{path}: the file is empty (0 bytes); write the diff again")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        # Checked first: safetensors' own errors ("header too large") do not name the file.
        problem = safetensors_problem(path)
        if problem is not None:
            raise DiffValidationError(f"{path}: {problem}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
                return {k: fh.get_tensor(k) for k in fh.keys()}, metadata
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
            message = " ".join(str(exc).split())
            raise DiffValidationError(
                f"{path}: cannot be read as a safetensors file ({type(exc).__name__}: {message})"
            ) from None
    if path.suffix == ".pt":
        # weights_only: a diff is plain tensors; refusing pickled code keeps loading safe.
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True), {}
        except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
            raise DiffValidationError(_pt_problem(path, exc)) from None
    raise DiffValidationError(
        f"{path}: unsupported suffix {path.suffix!r}; a diff is a torch.save'd dict (.pt) "
        "or a .safetensors file"
    )


def _metadata(path: Path, metadata: dict[str, str]) -> tuple[int | None, dict[str, Any]]:
    """The seed and hparams that save_diff writes into a .safetensors header, checked."""
    seed: int | None = None
    raw_seed = metadata.get("seed")
    if raw_seed not in (None, "", "None"):
        try:
            seed = int(raw_seed)
        except ValueError:
            raise DiffValidationError(
                f"{path}: header metadata 'seed' is {raw_seed!r}, not an integer; rewrite it "
                "with save_diff or drop the key"
            ) from None
    raw_hparams = metadata.get("hparams", "") or "{}"
    try:
        hparams = json.loads(raw_hparams)
        if not isinstance(hparams, dict):
            raise ValueError(f"a JSON {type(hparams).__name__}")
    except ValueError as exc:
        raise DiffValidationError(
            f"{path}: header metadata 'hparams' is not a JSON object ({exc}); rewrite it with "
            "save_diff or drop the key"
        ) from None
    return seed, hparams


def load_diff(
    path: str | Path, target: Any, *, name: str | None = None, seed: int | None = None
) -> Diff:
    """Read a `.pt` ({name: tensor}, as the original research's w.pt) or `.safetensors` diff and
    validate it against `target` (Architecture, model or shapes) before anything can use it.
    Every failure is a DiffValidationError or TypeError whose one-line message names the file."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in DIFF_SUFFIXES)
        holds = f"it holds {', '.join(inside)}" if inside else "it holds no .pt or .safetensors file"
        raise DiffValidationError(
            f"{path} is a folder, not a diff file; load_diffs() reads every diff in a folder "
            f"({holds})"
        )
    if not path.is_file():
        raise FileNotFoundError(f"diff file {path} does not exist")
    raw, metadata = _read_file(path)
    w = validate_diff(raw, target, source=str(path))
    meta_seed, hparams = _metadata(path, metadata)
    if seed is None:
        seed = meta_seed
    return Diff(
        name=name or path.stem, seed=seed, w=w, source=str(path), sha256=diff_sha256(w),
        recipe=metadata.get("recipe") or None, hparams=hparams, diagnostics=diff_diagnostics(w),
    )


def load_diffs(paths: str | Path | Iterable[str | Path], target: Any) -> list[Diff]:
    """Several seeds as several files: a comma-separated string, a list, or a directory of them."""
    if isinstance(paths, (str, Path)):
        items: list[Path] = [Path(p.strip()) for p in str(paths).split(",") if p.strip()]
    else:
        items = [Path(p) for p in paths]
    files: list[Path] = []
    for item in items:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix in DIFF_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"directory {item} holds no .pt or .safetensors diff")
            files.extend(found)
        else:
            files.append(item)
    if not files:
        raise ValueError("no diff files given; pass .pt/.safetensors paths or a directory")
    return [load_diff(p, target) for p in files]


def save_diff(diff: Diff | Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write `w` as `.pt` (a plain {name: float32 tensor} dict, loadable by torch.load) or
    `.safetensors` (with seed/recipe/hparams in its header metadata). Atomic: tmp + rename."""
    import os

    path = Path(path)
    if path.suffix not in DIFF_SUFFIXES:
        raise ValueError(f"{path}: choose a .pt or .safetensors file name for the diff")
    w = diff.w if isinstance(diff, Diff) else dict(diff)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in w.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.suffix == ".pt":
            torch.save(tensors, str(tmp))
        else:
            from safetensors.torch import save_file

            meta = {}
            if isinstance(diff, Diff):
                meta = {"name": diff.name, "seed": str(diff.seed), "recipe": diff.recipe or "",
                        "hparams": json.dumps(diff.hparams, sort_keys=True)}
            save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def diff_diagnostics(
    w: Mapping[str, torch.Tensor],
    delta_pos: Mapping[str, torch.Tensor] | None = None,
    delta_neg: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Norms and touched keys of a diff; with the two sides of a built one also

    ‖Δ⁺‖, ‖Δ⁻‖, cos(Δ⁺, −Δ⁻) (near 1: the sides are mirror images), and the drift ratio
    ‖(Δ⁺+Δ⁻)/2‖ / ‖(Δ⁺−Δ⁻)/2‖ (the common-mode change both sides share, which w cancels,
    relative to the contrast it keeps). Norms are Frobenius over all touched tensors.
    """
    layers = sorted({int(k.split(".")[2]) for k in w if k.startswith("model.layers.")
                     and k.split(".")[2].isdigit()})
    out: dict[str, Any] = {
        "norm_w": _norm(w.values()),
        "n_touched": len(w),
        "touched_keys": sorted(w),
        "touched_layers": layers,
        "per_key_norm": {k: _norm([v]) for k, v in sorted(w.items())},
    }
    if delta_pos is not None and delta_neg is not None:
        keys = sorted(set(delta_pos) | set(delta_neg))

        def get(side: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
            ref = delta_pos.get(key, delta_neg.get(key))
            return side.get(key, torch.zeros_like(ref)).double()

        norm_pos = _norm(delta_pos.values())
        norm_neg = _norm(delta_neg.values())
        dot = sum(float((get(delta_pos, k) * -get(delta_neg, k)).sum()) for k in keys)
        common = _norm((get(delta_pos, k) + get(delta_neg, k)) / 2 for k in keys)
        contrast = _norm((get(delta_pos, k) - get(delta_neg, k)) / 2 for k in keys)
        out.update(
            norm_pos=norm_pos,
            norm_neg=norm_neg,
            cos_pos_negneg=dot / (norm_pos * norm_neg) if norm_pos and norm_neg else float("nan"),
            drift_ratio=common / contrast if contrast else float("nan"),
        )
    return out


@contextmanager
def weight_steer(
    model: torch.nn.Module, w: Mapping[str, torch.Tensor] | Diff, alpha: float
) -> Iterator[torch.nn.Module]:
    """Within the block the model's weights are θ + α·w; on exit, also when the body raises,
    every touched parameter is restored bit-for-bit. `w` is validated first, so nothing is
    applied to a model it does not fit.

    Each touched parameter gets a new tensor θ + α·w for the block and its own tensor back
    afterwards (not an in-place add, then a copy back): a model read memory-mapped from the
    cache then keeps its file pages shared, where writing into them would give every xdist
    worker a private copy of each touched weight (0.2 GB at 135M)."""
    tensors = w.w if isinstance(w, Diff) else w
    checked = validate_diff(tensors, model, source="weight_steer")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"weight_steer: alpha must be finite, got {alpha!r}")
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            if alpha != 0.0:  # α = 0 is the base model: touch nothing
                for key, delta in checked.items():
                    param = params[key]
                    original = param.data
                    if param.dtype == torch.float32:  # the same sum as param.add_(δ, alpha=α)
                        steered = torch.add(original, delta.to(device=param.device,
                                                                dtype=param.dtype), alpha=alpha)
                    else:  # bfloat16/float16: add in float32, round once (not delta, then sum)
                        steered = (original.float() + alpha * delta.to(
                            device=param.device, dtype=torch.float32)).to(param.dtype)
                    saved[key] = original
                    param.data = steered
        yield model
    finally:
        for key, original in saved.items():
            params[key].data = original
