"""Work shared by every variant's forward, done once: the untouched lower layers, the common prompt prefix."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ws_harness.arch import Architecture
from ws_harness.data import ProbeSet

__all__ = [
    "SplitPrompts",
    "block_inputs",
    "cache_argument",
    "first_touched_layer",
    "hidden_entering",
    "prefix_cache",
    "replayed_prefix",
    "split_shared_prefix",
]


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
            model(**{"use_cache": False, **inputs}, logits_to_keep=1)
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
        if not isinstance(got, Tensor) or tuple(got.shape) != tuple(replay.shape):
            shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise ValueError(f"replayed_prefix: layer {layer} got input of shape {shape} but the "
                             f"replayed residual has shape {tuple(replay.shape)}; the inputs must "
                             f"be {times} copies of the prompts it was computed on (a model whose "
                             "decoder layers return tuples cannot skip layers: pass "
                             "share_upstream=False)")
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


# ---- a prompt prefix shared by every row ------------------------------------------------------
@dataclass(frozen=True)
class SplitPrompts:
    """Prompts cut after the token prefix they all share (the chat template's system turn).

    `prefix_ids` [P]; `input_ids` [rows, S] the rest of each prompt, left-padded;
    `attention_mask` [rows, P + S] (the prefix's ones, then the rest's mask: the padding sits
    between the two and is masked); `position_ids` [rows, S] continue at P, so every token sees
    the positions it has in the whole prompt.
    """

    prefix_ids: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rest_inputs(self, times: int = 1) -> dict[str, Tensor]:
        """Model inputs for the rest of the prompts, stacked `times` along dim 0."""
        return {"input_ids": self.input_ids.repeat(times, 1),
                "attention_mask": self.attention_mask.repeat(times, 1),
                "position_ids": self.position_ids.repeat(times, 1)}

    def prefix_inputs(self, rows: int) -> dict[str, Tensor]:
        p = self.prefix_ids.shape[0]
        return {"input_ids": self.prefix_ids.repeat(rows, 1),
                "attention_mask": torch.ones(rows, p, dtype=self.attention_mask.dtype,
                                             device=self.prefix_ids.device),
                "position_ids": torch.arange(p, device=self.prefix_ids.device).repeat(rows, 1)}


def split_shared_prefix(input_ids: Tensor, attention_mask: Tensor, min_prefix: int = 4
                        ) -> SplitPrompts | None:
    """The longest token prefix every (left-padded) row shares, less at least one token per row
    (the last token must be computed with the rest); None when it is shorter than `min_prefix`."""
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"split_shared_prefix: input_ids {tuple(input_ids.shape)} and "
                         f"attention_mask {tuple(attention_mask.shape)} must be the same [rows, T]")
    rows = [ids[m.bool()] for ids, m in zip(input_ids, attention_mask, strict=True)]
    shortest = min((len(r) for r in rows), default=0)
    if shortest < 2:
        return None
    heads = torch.stack([r[:shortest] for r in rows])
    same = (heads == heads[0]).all(0).long()
    p = min(int(same.cumprod(0).sum()), shortest - 1)
    if p < min_prefix:
        return None
    rests = [r[p:] for r in rows]
    width = max(len(r) for r in rests)
    ids = torch.zeros(len(rows), width, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros(len(rows), width, dtype=attention_mask.dtype, device=attention_mask.device)
    for i, rest in enumerate(rests):
        ids[i, width - len(rest):] = rest
        mask[i, width - len(rest):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) + p
    full_mask = torch.cat([torch.ones(len(rows), p, dtype=mask.dtype, device=mask.device), mask], 1)
    return SplitPrompts(heads[0, :p].clone(), ids, full_mask, position_ids)


def cache_argument(model: torch.nn.Module) -> str:
    """The forward's name for past keys and values: `cache` (transformers ≥ 5) or
    `past_key_values` (4.x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefix_cache(model: torch.nn.Module, split: SplitPrompts, chunks: int, rows: int) -> Any:
    """Keys and values of the shared prefix, computed on `chunks` rows (one per chunk, under
    whatever weight edits are active) and repeated `rows` times each, chunk-major, for a
    forward of the rest of the prompts stacked `chunks` times."""
    from transformers import DynamicCache

    cache = DynamicCache()
    name = cache_argument(model)
    model(**split.prefix_inputs(chunks), use_cache=True, logits_to_keep=1, **{name: cache})
    p = split.prefix_ids.shape[0]
    if cache.get_seq_length() != p:  # the forward did not take the cache under that name
        raise RuntimeError(f"prefix_cache: after a forward of the {p}-token prefix the cache holds "
                           f"{cache.get_seq_length()} positions; {type(model).__name__}.forward "
                           f"did not fill it through {name}=; pass share_prefix=False")
    cache.batch_repeat_interleave(rows)
    return cache


def block_inputs(model: torch.nn.Module, batch: ProbeSet, split: SplitPrompts | None,
                 times: int = 1) -> dict[str, Any]:
    """Model inputs (`use_cache` included) for `times` stacked copies of a prompt block already
    on the model's device. With a split: the rest of the prompts and the keys and values of their
    shared prefix, computed here on one row per copy, so under whatever weight edits are active
    (copy j = chunk j)."""
    if split is None:
        return {"input_ids": batch.input_ids.repeat(times, 1),
                "attention_mask": batch.attention_mask.repeat(times, 1),
                "position_ids": batch.position_ids.repeat(times, 1), "use_cache": False}
    return {**split.rest_inputs(times), "use_cache": True,
            cache_argument(model): prefix_cache(model, split, times, len(batch))}
