"""Activation capture with forward hooks and output_hidden_states (a small TraceDict, no baukit)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ws_harness.arch import Architecture
from ws_harness.data import ProbeSet
from ws_harness.device import model_device

__all__ = [
    "Trace",
    "trace_modules",
    "capture_last_token",
    "capture_tokens",
    "BATCH_SIZE",
]

BATCH_SIZE = 16


@dataclass
class Trace:
    """What one hooked module saw in the last forward pass (detached)."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def _first_tensor(value: Any) -> torch.Tensor:
    # Decoder layers in recent transformers return a tensor, older ones a tuple (hidden, ...).
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def trace_modules(
    model: torch.nn.Module, names: Sequence[str], *, inputs: bool = False, outputs: bool = True
) -> Iterator[dict[str, Trace]]:
    """Record the input and/or output of each named module; hooks are removed on exit, always."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"cannot trace {missing}: no such module in the model")
    traces = {name: Trace() for name in names}
    handles = []
    try:
        for name in names:

            def hook(module: torch.nn.Module, args: tuple, output: Any, name: str = name) -> None:
                if inputs:
                    traces[name].input = _first_tensor(args).detach()
                if outputs:
                    traces[name].output = _first_tensor(output).detach()

            handles.append(modules[name].register_forward_hook(hook))
        yield traces
    finally:
        for handle in handles:
            handle.remove()


def _batches(probes: ProbeSet, batch_size: int) -> Iterator[ProbeSet]:
    for start in range(0, len(probes), batch_size):
        yield probes.slice(start, start + batch_size)


def _forward(model: torch.nn.Module, batch: ProbeSet, **kwargs: Any) -> Any:
    batch = batch.to(model_device(model))
    return model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        position_ids=batch.position_ids, use_cache=False, **kwargs,
    )


@torch.no_grad()
def capture_last_token(
    model: torch.nn.Module, arch: Architecture, probes: ProbeSet, *, mlp: bool = False,
    batch_size: int = BATCH_SIZE,
) -> dict[str, torch.Tensor]:
    """Last-prompt-token activations per layer.

    `resid` [L, n, d]: output of decoder block l (the residual stream after it). With `mlp`:
    `up_in` [L, n, d] (input of mlp.up_proj, i.e. the normed residual) and `up_out` [L, n, d_ff].
    """
    layers = [arch.layer_name(i) for i in range(arch.n_layers)]
    ups = [arch.module_name(i, "up") for i in range(arch.n_layers)] if mlp else []
    chunks: dict[str, list[torch.Tensor]] = {"resid": [], "up_in": [], "up_out": []}
    for batch in _batches(probes, batch_size):
        with trace_modules(model, layers) as traces, \
                trace_modules(model, ups, inputs=True) as up_traces:
            _forward(model, batch)
        # Each batch to the CPU at once: a GPU would otherwise hold every batch's copy.
        chunks["resid"].append(torch.stack([traces[n].output[:, -1] for n in layers]).cpu())
        if mlp:
            chunks["up_in"].append(torch.stack([up_traces[n].input[:, -1] for n in ups]).cpu())
            chunks["up_out"].append(torch.stack([up_traces[n].output[:, -1] for n in ups]).cpu())
    return {k: torch.cat(v, dim=1).float().cpu().contiguous() for k, v in chunks.items() if v}


@torch.no_grad()
def capture_tokens(
    model: torch.nn.Module, arch: Architecture, probes: ProbeSet, *, batch_size: int = BATCH_SIZE
) -> dict[str, torch.Tensor]:
    """Token-level residuals and the last token's attention (mean over heads), right-aligned.

    `resid_tokens` [L, n, T, d], `attn_last` [L, n, T] (attention of the last query position to
    each key, averaged over heads; needs eager attention), `mask` [n, T] (1 = real token).
    Prompts are left-padded, so position −1 is every prompt's last token.
    """
    layers = [arch.layer_name(i) for i in range(arch.n_layers)]
    resid, attn, masks = [], [], []
    width = probes.input_ids.shape[1]
    for batch in _batches(probes, batch_size):
        with trace_modules(model, layers) as traces:
            out = _forward(model, batch, output_attentions=True)
        if not out.attentions or out.attentions[0] is None:
            raise ValueError(
                "the model returned no attention weights; load it with attn_implementation='eager'"
            )
        pad = width - batch.input_ids.shape[1]
        resid.append(F.pad(torch.stack([traces[n].output for n in layers]), (0, 0, pad, 0)).cpu())
        attn.append(F.pad(torch.stack([a[:, :, -1, :].mean(1) for a in out.attentions]),
                          (pad, 0)).cpu())
        masks.append(F.pad(batch.attention_mask.cpu(), (pad, 0)))
    return {
        "resid_tokens": torch.cat(resid, dim=1).float().cpu().contiguous(),
        "attn_last": torch.cat(attn, dim=1).float().cpu().contiguous(),
        "mask": torch.cat(masks, dim=0).cpu().contiguous(),
    }
