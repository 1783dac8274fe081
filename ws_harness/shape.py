"""Model shapes without weights: layer count, widths, parameter names and shapes (ModelShape)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ws_harness.arch import ROLES

__all__ = ["ModelShape"]


@dataclass(frozen=True)
class ModelShape:
    """What a run needs to know about a model before (or instead of) loading its weights.

    Built from the model's config and its parameter shapes, both recorded once per model in
    the cache, so a warm run names layers, parses diff keys and validates diff files without
    reading a weight. Its names follow :class:`ws_harness.arch.Architecture` (``model.layers.
    {l}.self_attn.q_proj.weight`` …); ``HarnessSession.arch`` checks the two agree.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    shapes: Mapping[str, tuple[int, ...]]  # every parameter of the model, by name

    @classmethod
    def from_config(cls, config: Mapping[str, Any],
                    param_shapes: Mapping[str, Any]) -> ModelShape:
        """From a Hugging Face config dict and {parameter name: shape}."""
        try:
            n_heads = int(config["num_attention_heads"])
            d_model = int(config["hidden_size"])
            shape = cls(
                n_layers=int(config["num_hidden_layers"]), d_model=d_model, n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
                head_dim=int(config.get("head_dim") or d_model // n_heads),
                d_ff=int(config["intermediate_size"]),
                shapes={str(k): tuple(int(x) for x in v) for k, v in param_shapes.items()},
            )
        except KeyError as exc:
            raise ValueError(f"model config lacks {exc.args[0]!r}; ws-harness needs a "
                             "decoder-only Llama/Qwen/Mistral/Gemma config") from None
        names = [shape.param_name(l, r) for l in range(shape.n_layers) for r in ROLES]
        missing = [n for n in names if n not in shape.shapes]
        if missing:
            raise ValueError(f"model has no parameter {missing[0]!r}; ws-harness needs "
                             "Llama/Qwen/Mistral/Gemma module naming")
        return shape

    def param_name(self, layer: int, role: str) -> str:
        """e.g. param_name(12, 'o') == 'model.layers.12.self_attn.o_proj.weight'."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {sorted(ROLES)}")
        return f"model.layers.{layer}.{ROLES[role]}.weight"

    def parse_param_name(self, name: str) -> tuple[int, str] | None:
        """(layer, role) of a parameter of the seven roles; None for any other parameter."""
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None
        path = ".".join(parts[3:])
        for role, sub in ROLES.items():
            if path == f"{sub}.weight":
                return int(parts[2]), role
        return None

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the seven roles' parameters (as Architecture.param_shapes)."""
        return {self.param_name(l, r): self.shapes[self.param_name(l, r)]
                for l in range(self.n_layers) for r in ROLES}
