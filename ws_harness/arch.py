"""Architecture view: per-layer weights by role (q, k, v, o, gate, up, down, unembedding) and GQA layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ROLES", "WRITE_ROLES", "READ_ROLES", "NORM_OF_ROLE", "Architecture", "LayerWeights",
    "expand_kv",
]

# role -> module path inside decoder layer i (Llama/Qwen/Mistral/Gemma naming).
ROLES: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
WRITE_ROLES = ("o", "down")  # their rows live in d_model: they write to the residual stream
READ_ROLES = ("q", "k", "v", "gate", "up")  # their columns live in d_model: they read from it
# Which RMSNorm a read role reads through: attention's input norm or the MLP's.
NORM_OF_ROLE: dict[str, str] = {"q": "attn", "k": "attn", "v": "attn", "gate": "mlp", "up": "mlp"}
# Module path of the norm in front of attention / the MLP, in order of preference: Gemma 2/3
# put a post-attention norm on attention's *output* and read the MLP through
# pre_feedforward_layernorm; Llama/Qwen/Mistral read the MLP through post_attention_layernorm.
NORM_MODULES: dict[str, tuple[str, ...]] = {
    "attn": ("input_layernorm",),
    "mlp": ("pre_feedforward_layernorm", "post_attention_layernorm"),
}


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights, as stored by nn.Linear: [out_features, in_features].

    q [H·hd, d], k/v [H_kv·hd, d], o [d, H·hd], gate/up [d_ff, d], down [d, d_ff].
    attn_norm / mlp_norm [d]: the effective gains γ of the RMSNorm in front of attention and of
    the MLP (Gemma's stored ``weight`` is γ − 1; Architecture resolves that), so q/k/v read
    γ_attn ⊙ x/rms(x) and gate/up read γ_mlp ⊙ x/rms(x).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor

    @property
    def write(self) -> torch.Tensor:
        """[W_o | W_down]: every direction this layer can add to the residual stream, [d, H·hd + d_ff]."""
        return torch.cat([self.o, self.down], dim=1)

    def read(self, role: str) -> torch.Tensor:
        """W·diag(γ) for a read role: the read matrix in residual coordinates (SPEC §5).

        The matrix reads γ ⊙ x/rms(x), so the residual directions it is sensitive to are the
        rows of W·diag(γ), not of W (rms(x) is a scalar per token and changes no direction).
        """
        if role not in NORM_OF_ROLE:
            raise ValueError(f"role {role!r} does not read the residual; read roles are {READ_ROLES}")
        gain = self.attn_norm if NORM_OF_ROLE[role] == "attn" else self.mlp_norm
        return getattr(self, role) * gain.to(getattr(self, role).dtype)


def expand_kv(w_kv: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[H_kv·hd, d] → [H·hd, d]: each KV head's rows repeated for the query heads that share it."""
    if w_kv.shape[0] != n_kv_heads * head_dim:
        raise ValueError(
            f"expand_kv expects {n_kv_heads * head_dim} rows "
            f"(n_kv_heads·head_dim), got shape {tuple(w_kv.shape)}"
        )
    heads = w_kv.reshape(n_kv_heads, head_dim, -1)
    return heads.repeat_interleave(n_heads // n_kv_heads, dim=0).reshape(n_heads * head_dim, -1)


class Architecture:
    """Names and shapes of a decoder-only model, so no other module hard-codes parameter names."""

    def __init__(self, model: Any) -> None:
        self.model = model
        config = model.config
        self.n_layers: int = int(config.num_hidden_layers)
        self.d_model: int = int(config.hidden_size)
        self.n_heads: int = int(config.num_attention_heads)
        self.n_kv_heads: int = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        head_dim = getattr(config, "head_dim", None)
        self.head_dim: int = int(head_dim or self.d_model // self.n_heads)
        self.d_ff: int = int(config.intermediate_size)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.n_heads} is not a multiple of "
                f"num_key_value_heads={self.n_kv_heads}; grouped-query attention needs it to be"
            )
        self._modules = dict(model.named_modules())
        self._check_modules()

    # ---- names -------------------------------------------------------------------------
    @property
    def gqa_group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def layer_name(self, layer: int) -> str:
        """The decoder block whose output is the residual stream after layer `layer`."""
        self._check_layer(layer)
        return f"model.layers.{layer}"

    def module_name(self, layer: int, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {sorted(ROLES)}")
        return f"{self.layer_name(layer)}.{ROLES[role]}"

    def param_name(self, layer: int, role: str) -> str:
        """e.g. param_name(12, 'o') == 'model.layers.12.self_attn.o_proj.weight'."""
        return f"{self.module_name(layer, role)}.weight"

    def parse_param_name(self, name: str) -> tuple[int, str] | None:
        """Inverse of param_name; None for parameters outside the seven roles."""
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None
        layer = int(parts[2])
        path = ".".join(parts[3:])
        for role, sub in ROLES.items():
            if path == f"{sub}.weight":
                return layer, role
        return None

    def module(self, name: str) -> torch.nn.Module:
        try:
            return self._modules[name]
        except KeyError:
            raise ValueError(f"model has no module {name!r}") from None

    # ---- weights -----------------------------------------------------------------------
    def weight(self, layer: int, role: str) -> torch.Tensor:
        return self.module(self.module_name(layer, role)).weight

    def layer(self, layer: int) -> LayerWeights:
        return LayerWeights(
            **{role: self.weight(layer, role).detach() for role in ROLES},
            attn_norm=self.norm_gain(layer, "attn"), mlp_norm=self.norm_gain(layer, "mlp"),
        )

    def norm_module_name(self, layer: int, which: str) -> str:
        """The RMSNorm in front of attention (``which='attn'``) or the MLP (``'mlp'``) of a layer."""
        if which not in NORM_MODULES:
            raise ValueError(f"which must be one of {tuple(NORM_MODULES)}, got {which!r}")
        for sub in NORM_MODULES[which]:
            name = f"{self.layer_name(layer)}.{sub}"
            if name in self._modules:
                return name
        raise ValueError(
            f"layer {layer} has none of {[f'{self.layer_name(layer)}.{s}' for s in NORM_MODULES[which]]}; "
            "ws-harness needs a pre-norm (Llama/Qwen/Mistral/Gemma) decoder to fold RMSNorm gains"
        )

    def _gain(self, module: torch.nn.Module) -> torch.Tensor:
        """Effective elementwise gain γ of an RMSNorm module, float32 [d]."""
        weight = getattr(module, "weight", None)
        if weight is None:  # a norm without a learned gain
            return torch.ones(self.d_model)
        gain = weight.detach().float().clone()
        # Gemma's RMSNorm multiplies by (1 + weight): its stored weight is γ − 1.
        if type(module).__name__.startswith("Gemma"):
            gain = gain + 1.0
        if gain.shape != (self.d_model,):
            raise ValueError(
                f"norm {type(module).__name__} has gain shape {tuple(gain.shape)}, expected "
                f"({self.d_model},)"
            )
        return gain

    def norm_gain(self, layer: int, which: str) -> torch.Tensor:
        """γ [d] of the RMSNorm that attention (``'attn'``) or the MLP (``'mlp'``) reads through."""
        return self._gain(self.module(self.norm_module_name(layer, which)))

    @property
    def final_norm_gain(self) -> torch.Tensor:
        """γ [d] of the final RMSNorm (``model.norm``), through which lm_head reads the residual."""
        if "model.norm" not in self._modules:
            raise ValueError("model has no final norm 'model.norm'; lm_head's read gain is unknown")
        return self._gain(self._modules["model.norm"])

    @property
    def unembedding(self) -> torch.Tensor:
        """W_U [vocab, d]: lm_head, which is the embedding matrix when embeddings are tied."""
        return self.model.get_output_embeddings().weight.detach()

    @property
    def embedding(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach()

    def expand_kv(self, w_kv: torch.Tensor) -> torch.Tensor:
        """Repeat a K or V weight's rows per GQA group: [H_kv·hd, d] → [H·hd, d], head-aligned with q/o."""
        return expand_kv(w_kv, self.n_heads, self.n_kv_heads, self.head_dim)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of every parameter of the seven roles, keyed by parameter name."""
        return {
            self.param_name(layer, role): tuple(self.weight(layer, role).shape)
            for layer in range(self.n_layers)
            for role in ROLES
        }

    def touched_layer_range(self, lo: float = 0.3, hi: float = 0.8) -> range:
        """Layers round(lo·n) … round(hi·n)−1, where SPEC §2.3's LoRAs train."""
        return range(round(lo * self.n_layers), round(hi * self.n_layers))

    # ---- checks ------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has {self.n_layers} layers")

    def _check_modules(self) -> None:
        for name in ("model.embed_tokens", "model.layers"):
            if name not in self._modules:
                raise ValueError(
                    f"model lacks module {name!r}; ws-harness needs Llama/Qwen/Mistral/Gemma "
                    "module naming (model.layers.{i}.self_attn.*, model.layers.{i}.mlp.*)"
                )
        for layer in range(self.n_layers):
            for role, sub in ROLES.items():
                name = f"model.layers.{layer}.{sub}"
                if name not in self._modules or getattr(self._modules[name], "weight", None) is None:
                    raise ValueError(
                        f"model lacks module {name!r} (role {role!r}); ws-harness needs "
                        "Llama/Qwen/Mistral/Gemma module naming"
                    )
        if self.model.get_output_embeddings() is None:
            raise ValueError("model has no output embeddings (lm_head); a causal LM is required")
