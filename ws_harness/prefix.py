"""Shared upstream prefix: the residual entering a diff's first touched layer, computed once and replayed."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ws_harness.arch import Architecture

__all__ = ["first_touched_layer", "hidden_entering", "replayed_prefix"]


class _Stop(Exception):
    """Raised by the capture hook to end a forward once the wanted residual is in hand."""


def first_touched_layer(arch: Architecture, names: Any) -> int:
    """The lowest layer among parameter names or (layer, role) keys; 0 when any name is not a
    layer parameter (an embedding or final-norm delta changes everything from the start), and
    0 for no names at all (nothing to share)."""
    layers = []
    for name in names:
        if isinstance(name, tuple):
            layers.append(int(name[0]))
            continue
        parsed = arch.parse_param_name(name)
        if parsed is None:
            return 0
        layers.append(parsed[0])
    return min(layers, default=0)


def _layer(arch: Architecture, layer: int) -> torch.nn.Module:
    return arch.module(arch.layer_name(layer))


def hidden_entering(model: torch.nn.Module, arch: Architecture, inputs: Mapping[str, Tensor],
                    layer: int) -> Tensor:
    """The residual stream h_in of `layer` ([rows, T, d], detached) for the model inputs, from a
    forward that stops there: layers ≥ `layer`, the final norm and lm_head are never run."""
    if not 0 < layer < arch.n_layers:
        raise ValueError(f"hidden_entering: layer {layer} must be in 1..{arch.n_layers - 1} "
                         "(layer 0's input is the embedding; nothing upstream to share)")
    captured: dict[str, Tensor] = {}

    def stop(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop

    handle = _layer(arch, layer).register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError(f"hidden_entering: the forward never reached layer {layer} "
                           f"({arch.layer_name(layer)})")
    return captured["h"]


def _passthrough(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return hidden_states


@contextmanager
def replayed_prefix(arch: Architecture, layer: int, hidden: Tensor, times: int = 1) -> Iterator[None]:
    """Within the block, layers < `layer` do no work and `layer` receives `hidden` (stacked
    `times` along dim 0) as its input residual, whatever the embeddings were.

    Valid only while nothing upstream of `layer` differs from the forward that produced
    `hidden` (the same inputs, and weights below `layer` unchanged): callers take `layer` from
    `first_touched_layer` of what they change. Position embeddings and the attention mask are
    still built by the model from the inputs, which must be `times` copies of the prompts
    `hidden` came from. Restored on exit, also when the body raises.
    """
    if not 0 < layer < arch.n_layers:
        raise ValueError(f"replayed_prefix: layer {layer} must be in 1..{arch.n_layers - 1}")
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError(f"replayed_prefix: times must be an int >= 1, got {times!r}")
    replay = hidden.repeat(times, *([1] * (hidden.ndim - 1))) if times > 1 else hidden

    def inject(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        got = args[0] if args else kwargs["hidden_states"]
        if tuple(got.shape) != tuple(replay.shape):
            raise ValueError(f"replayed_prefix: layer {layer} got input of shape {tuple(got.shape)} "
                             f"but the replayed residual has shape {tuple(replay.shape)}; the "
                             f"inputs must be {times} copies of the prompts it was computed on")
        if args:
            return (replay, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replay}

    skipped = [_layer(arch, l) for l in range(layer)]
    saved = {id(m): m.__dict__["forward"] for m in skipped if "forward" in m.__dict__}
    handle = _layer(arch, layer).register_forward_pre_hook(inject, with_kwargs=True)
    try:
        for module in skipped:
            module.forward = _passthrough  # an instance attribute shadows the class's forward
        yield
    finally:
        handle.remove()
        for module in skipped:
            module.__dict__.pop("forward", None)
            if id(module) in saved:
                module.forward = saved[id(module)]
