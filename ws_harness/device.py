"""Where model forwards run: --ws-device and --ws-dtype resolved, probe batches moved to the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DEVICES", "DTYPES", "Placement", "resolve_placement", "model_device", "DEFAULT"]

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


@dataclass(frozen=True)
class Placement:
    """The device and dtype of model forwards (captures, steering checks, training, attribution,
    retention). Scoring is unaffected: bases and targets come from the float32 CPU weights and
    are scored in float64/float32 on the CPU, as always."""

    device: str  # "cpu", "cuda", "cuda:1", "mps"
    dtype: str  # a DTYPES key

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_default(self) -> bool:
        """float32 on the CPU: the model as loaded, no copy, and cache keys as they always were."""
        return self.device == "cpu" and self.dtype == "float32"

    def key(self) -> dict[str, str]:
        """What a cache entry built by forwards must be keyed by: the device type and dtype
        change the numbers (kernels, rounding); which GPU of a type does not, by assumption."""
        return {} if self.is_default else {
            "forward_device": self.torch_device.type, "forward_dtype": self.dtype}

    def __str__(self) -> str:
        return f"{self.device}/{self.dtype}"


DEFAULT = Placement("cpu", "float32")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_placement(device: str, dtype: str) -> Placement:
    """Placement for `--ws-device` / `--ws-dtype` values; ValueError naming the option and the fix.

    auto: the first CUDA GPU if torch sees one, else the CPU (MPS only when asked for: it has
    no float64 and fewer kernels). float16 needs a GPU; bfloat16 runs on the CPU too (slowly;
    useful to check a GPU configuration's numbers here).
    """
    kind, colon, index = device.partition(":") if isinstance(device, str) else ("", "", "")
    if kind not in DEVICES or (colon and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"--ws-device: {device!r} is not one of {', '.join(DEVICES)} "
                         "(or cuda:N)")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"--ws-dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--ws-device {device}: torch {torch.__version__} sees no CUDA GPU "
                             "(a CPU-only build, or no driver); pass --ws-device cpu or auto")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ValueError(f"--ws-device {device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s), numbered from 0; "
                             "pass --ws-device cuda:0 or auto")
    if kind == "mps" and not _mps_available():
        raise ValueError(f"--ws-device mps: torch {torch.__version__} has no MPS backend here; "
                         "pass --ws-device cpu or auto")
    if dtype == "float16" and kind == "cpu":
        raise ValueError("--ws-dtype float16 needs a GPU (CPU half-precision matmuls are slow and "
                         "lose the small steering deltas); pass --ws-dtype bfloat16 or float32")
    return Placement(device, dtype)


def model_device(model: Any) -> torch.device:
    """The device of a model's parameters (where its inputs must be)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
