"""Measured causal recovery (SPEC §4.1): steering effect of residual-write variants via forward hooks."""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ws_harness.arch import ROLES, WRITE_ROLES, Architecture
from ws_harness.data import ProbeSet
from ws_harness.device import model_device
from ws_harness.linalg import BASIS_ORTHONORMAL_TOL
from ws_harness.nulls import haar_bases
from ws_harness.prefix import (
    SplitPrompts,
    block_inputs,
    first_touched_layer,
    hidden_entering,
    replayed_prefix,
    split_shared_prefix,
)

__all__ = [
    "Key",
    "Deltas",
    "PROJECTION_MODES",
    "write_part",
    "project_writes",
    "norm_matched",
    "added_writes",
    "steering_effects",
    "retention_ratio",
    "random_reference",
    "percentile",
]

Key = tuple[int, str]  # (layer, role)
Deltas = dict[Key, Tensor]  # nn.Linear layout [out, in]; o/down: [d_model, in]
PROJECTION_MODES = ("keep", "drop")


# ---- variants --------------------------------------------------------------------------------
def _check_key(key: Any) -> Key:
    if (
        not isinstance(key, tuple) or len(key) != 2 or isinstance(key[0], bool)
        or not isinstance(key[0], (int, np.integer)) or not isinstance(key[1], str)
    ):
        raise TypeError(f"delta key {key!r} is not a (layer: int, role: str) pair")
    layer, role = int(key[0]), key[1]
    if layer < 0:
        raise ValueError(f"delta key {key!r}: layer {layer} is negative")
    if role not in ROLES:
        raise ValueError(f"delta key {key!r}: unknown role {role!r}; roles are {sorted(ROLES)}")
    return layer, role


def _check_delta(key: Key, delta: Any) -> Tensor:
    if not isinstance(delta, Tensor):
        raise TypeError(f"delta at layer {key[0]}, role {key[1]!r} is a {type(delta).__name__}, "
                        "not a tensor")
    if delta.ndim != 2 or not delta.is_floating_point():
        raise ValueError(f"delta at layer {key[0]}, role {key[1]!r} must be a 2-D floating "
                         f"[out, in] tensor, got shape {tuple(delta.shape)} dtype {delta.dtype}")
    return delta


def write_part(
    deltas: Mapping[Key, Tensor] | Mapping[str, Tensor], arch: Architecture | None = None
) -> Deltas:
    """w_W of SPEC §4.1: only the residual-writing (o_proj, down_proj) entries of a diff.

    Keys are (layer, role) pairs, or parameter names (a Diff's `.w`), which need `arch` to be
    parsed; parameter names outside the seven roles (norms, embeddings) belong to w_R and are
    left out like the read roles. The tensors are the caller's (not copied).
    """
    out: Deltas = {}
    for raw_key, delta in deltas.items():
        if isinstance(raw_key, str):
            if arch is None:
                raise TypeError(f"delta key {raw_key!r} is a parameter name; pass arch= to parse it "
                                "(or key the deltas by (layer, role))")
            parsed = arch.parse_param_name(raw_key)
            if parsed is None:
                continue
            key = parsed
        else:
            key = _check_key(raw_key)
        if key[1] in WRITE_ROLES:
            if key in out:
                raise ValueError(f"deltas name layer {key[0]}, role {key[1]!r} twice")
            out[key] = _check_delta(key, delta)
    return out


def _basis_at(bases: Tensor | Sequence[Tensor | None], layer: int) -> Tensor | None:
    if isinstance(bases, Tensor):  # one global basis for every layer
        return bases
    if layer >= len(bases):
        raise ValueError(f"bases has {len(bases)} entries (one per layer) but the deltas touch "
                         f"layer {layer}")
    return bases[layer]


def _check_basis(basis: Any, layer: int, d: int) -> Tensor:
    if not isinstance(basis, Tensor):
        raise TypeError(f"basis at layer {layer} is a {type(basis).__name__}, not a [d, k] tensor "
                        "(or None)")
    if basis.ndim != 2 or basis.shape[0] != d or not basis.is_floating_point():
        raise ValueError(f"basis at layer {layer} has shape {tuple(basis.shape)} dtype {basis.dtype}; "
                         f"expected a floating [d={d}, k] tensor (d = the delta's output size)")
    b = basis.detach().to(torch.float64)
    err = float((b.T @ b - torch.eye(b.shape[1], dtype=torch.float64)).abs().max()) if b.shape[1] else 0.0
    if not err < BASIS_ORTHONORMAL_TOL:
        raise ValueError(f"basis at layer {layer} (shape {tuple(basis.shape)}) is not orthonormal: "
                         f"‖BᵀB − I‖_max = {err:.3g} ≥ {BASIS_ORTHONORMAL_TOL}")
    return b


def project_writes(
    write_deltas: Mapping[Key, Tensor], bases: Tensor | Sequence[Tensor | None], mode: str
) -> Deltas:
    """keep_B(w) = {P_l ΔW} ("keep") or drop_B(w) = {(I − P_l) ΔW} ("drop"), P_l = B_l B_lᵀ.

    `bases` is a list indexed by layer of orthonormal [d, k] tensors (or one tensor: a global
    basis, the same at every layer); None at a layer means no basis there: "keep" keeps nothing
    (the layer gets no entry, i.e. a zero delta), "drop" leaves ΔW unchanged. Only o/down
    deltas (rows in d_model) can be projected on their output side. Computed in float64 and
    returned in each delta's dtype; drop = ΔW − keep, so keep + drop = ΔW up to one rounding.
    """
    if mode not in PROJECTION_MODES:
        raise ValueError(f"mode {mode!r} is not one of {PROJECTION_MODES}")
    out: Deltas = {}
    for raw_key, delta in write_deltas.items():
        key = _check_key(raw_key)
        layer, role = key
        if role not in WRITE_ROLES:
            raise ValueError(f"delta at layer {layer}, role {role!r} is not a residual write "
                             f"({WRITE_ROLES}); use write_part first")
        delta = _check_delta(key, delta)
        basis = _basis_at(bases, layer)
        if basis is None:
            if mode == "drop":
                out[key] = delta
            continue
        b = _check_basis(basis, layer, delta.shape[0])
        d64 = delta.detach().to(device="cpu", dtype=torch.float64)
        kept = b @ (b.T @ d64)
        result = kept if mode == "keep" else d64 - kept
        out[key] = result.to(device=delta.device, dtype=delta.dtype)
    return out


def _total_norm(deltas: Mapping[Key, Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in deltas.values()))


def norm_matched(variant: Mapping[Key, Tensor], reference: Mapping[Key, Tensor]) -> Deltas:
    """The variant scaled so its total Frobenius norm (over all entries) equals the reference's:
    does the direction, not the amount, carry it? (A keep_B variant is shorter than w_W; matching
    the norm separates "B holds the right direction" from "B holds much of the length".)"""
    norm_v, norm_r = _total_norm(variant), _total_norm(reference)
    if not (math.isfinite(norm_v) and math.isfinite(norm_r)):
        raise ValueError(f"norm_matched: norms must be finite (variant {norm_v}, reference {norm_r})")
    if norm_v == 0.0:
        raise ValueError("norm_matched: the variant is all-zero (or empty); it has no direction to scale")
    scale = norm_r / norm_v
    return {key: (delta.double() * scale).to(delta.dtype) for key, delta in variant.items()}


# ---- hooks -----------------------------------------------------------------------------------
def _check_chunks(arch: Architecture, chunks: Sequence[tuple[float, Mapping[Key, Tensor]]]
                  ) -> dict[str, dict[int, tuple[float, Tensor]]]:
    """{module name: {chunk j: (α_j, ΔW_j)}} for the non-zero chunks, every delta checked."""
    if not isinstance(chunks, Sequence) or len(chunks) == 0:
        raise ValueError("added_writes: chunks must be a non-empty list of (alpha, deltas) pairs")
    per_module: dict[str, dict[int, tuple[float, Tensor]]] = {}
    for j, chunk in enumerate(chunks):
        if not isinstance(chunk, tuple) or len(chunk) != 2 or not isinstance(chunk[1], Mapping):
            raise TypeError(f"added_writes: chunk {j} must be an (alpha, {{(layer, role): ΔW}}) pair, "
                            f"got {type(chunk).__name__}")
        alpha, deltas = chunk
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"added_writes: chunk {j} alpha must be a finite number, got {alpha!r}")
        for raw_key, delta in deltas.items():
            layer, role = _check_key(raw_key)
            if layer >= arch.n_layers:
                raise ValueError(f"added_writes: chunk {j} delta at layer {layer}, role {role!r}: the "
                                 f"model has {arch.n_layers} layers")
            delta = _check_delta((layer, role), delta)
            name = arch.module_name(layer, role)
            weight = arch.module(name).weight
            if tuple(delta.shape) != tuple(weight.shape):
                raise ValueError(f"added_writes: chunk {j} delta at layer {layer}, role {role!r} has "
                                 f"shape {tuple(delta.shape)}, expected {tuple(weight.shape)} "
                                 f"(the weight of {name})")
            if float(alpha) == 0.0:
                continue
            dw = delta.detach().to(device=weight.device, dtype=torch.float32)
            per_module.setdefault(name, {})[j] = (float(alpha), dw)
    return per_module


@contextmanager
def added_writes(
    model: torch.nn.Module, arch: Architecture, chunks: Sequence[tuple[float, Mapping[Key, Tensor]]]
) -> Iterator[torch.nn.Module]:
    """Within the block, chunk j of every batch behaves as if its weights were θ + α_j·ΔW_j.

    `chunks` = [(α_j, {(layer, role): ΔW_j})]; the model must then be called on a batch of
    len(chunks) equal-size blocks of rows stacked along dim 0 (block j = chunk j). Each touched
    nn.Linear computes its blocks itself. With float32 weights, block j goes through the edited
    weight W + α_j ΔW_j, formed as `diffs.weight_steer` forms it, so a forward costs what the
    unedited one costs. With reduced-precision weights, block j is W x plus α_j ΔW_j x computed
    in float32 and rounded once: a bfloat16 W + αΔW would round away most of a small ΔW (a
    rank-k keep of a diff). Blocks without a delta use W alone. The residual writes (o_proj,
    down_proj) are the point, but any of the seven roles works. For forwards without gradients
    (measured effects): the deltas are constants. Weights are never modified: the modules'
    forwards are replaced by instance attributes, removed on exit, also when the body raises.
    Nesting is refused. A batch whose size is not a multiple of len(chunks) raises ValueError
    from the forward.
    """
    per_module = _check_chunks(arch, chunks)
    n_chunks = len(chunks)

    def make_forward(name: str, module: torch.nn.Module, entries: dict[int, tuple[float, Tensor]]):
        weight, bias = module.weight, module.bias

        def forward(x: Tensor) -> Tensor:
            rows = x.shape[0]
            if rows % n_chunks:
                raise ValueError(f"added_writes: batch of {rows} rows at {name} is not divisible by "
                                 f"len(chunks)={n_chunks}; stack len(chunks) equal copies of the prompts")
            size = rows // n_chunks
            pieces = []
            for j in range(n_chunks):
                x_j = x[j * size:(j + 1) * size]
                if j not in entries:
                    pieces.append(F.linear(x_j, weight, bias))
                    continue
                alpha, dw = entries[j]
                if weight.dtype == torch.float32:
                    pieces.append(F.linear(x_j, torch.add(weight.detach(), dw, alpha=alpha), bias))
                else:
                    added = torch.matmul(x_j.to(torch.float32), dw.T).mul_(alpha)
                    pieces.append(F.linear(x_j, weight, bias) + added.to(weight.dtype))
            return torch.cat(pieces, dim=0)

        return forward

    modules = {name: arch.module(name) for name in per_module}
    for name, module in modules.items():
        if "forward" in module.__dict__:
            raise ValueError(f"added_writes: {name} already has its forward replaced (a nested "
                             "added_writes?); apply every chunk in one added_writes")
        if type(module).forward is not torch.nn.Linear.forward:
            raise TypeError(f"added_writes: {name} is a {type(module).__name__} with its own forward, "
                            "not a plain nn.Linear; its output cannot be recomputed from its weight")
    try:
        for name, entries in per_module.items():
            modules[name].forward = make_forward(name, modules[name], entries)
        yield model
    finally:
        for module in modules.values():
            module.__dict__.pop("forward", None)


# The base model's residual entering layer `first` for a prompt block is the same in every call
# on that model (each hypothesis's retention entry is one call), so it is kept per model, keyed
# by the block's tokens and by the storage and version counter of every weight upstream of
# `first`: any in-place edit there, even one undone since, computes it afresh. (Edits through
# `.data`, which bumps no version counter, would go unseen; nothing in the harness makes them.)
_BASE_HIDDEN: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Tensor]] = \
    weakref.WeakKeyDictionary()
_BASE_HIDDEN_PER_MODEL = 4


def _base_hidden(model: torch.nn.Module, arch: Architecture, batch: ProbeSet,
                 split: SplitPrompts | None, first: int) -> Tensor:
    upstream = [*arch.module("model.embed_tokens").parameters()] + [
        p for layer in range(first) for p in arch.module(arch.layer_name(layer)).parameters()]
    tokens = hashlib.sha256(repr(tuple(batch.input_ids.shape)).encode()
                            + batch.input_ids.cpu().numpy().tobytes()
                            + batch.attention_mask.cpu().numpy().tobytes()).hexdigest()
    key = (first, split is None, tokens, tuple((p.data_ptr(), p._version) for p in upstream))
    memo = _BASE_HIDDEN.setdefault(model, {})
    if key not in memo:
        while len(memo) >= _BASE_HIDDEN_PER_MODEL:
            memo.pop(next(iter(memo)))
        memo[key] = hidden_entering(model, arch, block_inputs(model, batch, split),
                                    first)
    return memo[key]


def steering_effects(
    model: torch.nn.Module,
    arch: Architecture,
    probes: ProbeSet,
    answer_ids: tuple[int, int],
    variants: Mapping[str, Mapping[Key, Tensor]],
    *,
    max_batch: int = 40,
    share_upstream: bool = True,
    share_prefix: bool = True,
) -> dict[str, Tensor]:
    """Per-prompt steering effect d_i(v) = m_i(θ + v) − m_i(θ − v) of each named variant (float64 [n]).

    m_i = logit(pos) − logit(neg) at the last prompt token (as steering.answer_logit_diff), so
    S(v) = mean_i d_i(v) (SPEC §4.1). The ±v pair, and as many variants as fit, run as chunks of
    one forward of at most `max_batch` rows (prompt blocks of min(n, max_batch // 2) rows),
    through `added_writes`: no weight is modified. Only last-token logits are computed.
    `share_upstream`: the layers below the lowest layer any variant touches are run once per
    prompt block, not once per forward (`prefix.replayed_prefix`): every variant's input there
    is the base model's. `share_prefix`: the token prefix all prompts of a block share (the chat
    template's system turn: about half of each EVAL prompt) is run once per chunk, not once per
    row, and its keys and values serve every row (`prefix.split_shared_prefix`). Both change
    the effects only by float rounding (≤ 2e-5 relative on SmolLM2; tests/test_prefix.py).
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 2:
        raise ValueError(f"max_batch must be an int >= 2 (one +v and one −v row), got {max_batch!r}")
    if not isinstance(variants, Mapping):
        raise TypeError(f"variants must be a {{name: deltas}} mapping, got {type(variants).__name__}")
    n = len(probes)
    if n == 0:
        raise ValueError("steering_effects: the probe set is empty")
    pos, neg = int(answer_ids[0]), int(answer_ids[1])
    names = list(variants)
    block = min(n, max_batch // 2)
    per_forward = max(1, max_batch // (2 * block))
    first = first_touched_layer(arch, [key for v in variants.values() for key in v]) \
        if share_upstream else 0
    device = model_device(model)
    margins: dict[str, list[Tensor]] = {name: [] for name in names}
    for start in range(0, n, block):
        batch = probes.slice(start, start + block).to(device)
        rows = len(batch)
        split = split_shared_prefix(batch.input_ids, batch.attention_mask) if share_prefix else None
        with torch.no_grad():
            hidden = _base_hidden(model, arch, batch, split, first) if first else None
            for g in range(0, len(names), per_forward):
                group = names[g:g + per_forward]
                chunks = [(sign, variants[name]) for name in group for sign in (1.0, -1.0)]
                with ExitStack() as stack:
                    stack.enter_context(added_writes(model, arch, chunks))
                    inputs = block_inputs(model, batch, split, len(chunks))
                    if hidden is not None:
                        stack.enter_context(replayed_prefix(arch, first, hidden, times=len(chunks)))
                    logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()
                m = (logits[:, pos] - logits[:, neg]).to(device="cpu", dtype=torch.float64)
                for i, name in enumerate(group):
                    plus = m[(2 * i) * rows:(2 * i + 1) * rows]
                    minus = m[(2 * i + 1) * rows:(2 * i + 2) * rows]
                    margins[name].append(plus - minus)
    return {name: torch.cat(parts) for name, parts in margins.items()}


# ---- statistics ------------------------------------------------------------------------------
def _check_vector(t: Any, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t)
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 1-D per-prompt vector, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} has non-finite values")
    return t


def retention_ratio(
    effect: Tensor, reference: Tensor, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean(effect) / mean(reference), lo, hi): the point ratio and a paired percentile bootstrap CI.

    Each replicate resamples prompt indices with replacement once (one torch.Generator seeded
    with `seed`) and applies them to both vectors, so the pairing is kept. Replicates whose
    reference mean is 0 give ±inf/nan; nan ones are ignored by the quantiles. Deterministic.
    """
    e, r = _check_vector(effect, "effect"), _check_vector(reference, "reference")
    if e.shape != r.shape:
        raise ValueError(f"effect {tuple(e.shape)} and reference {tuple(r.shape)} must be paired "
                         "per prompt (same length)")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    mean_r = float(r.mean())
    if mean_r == 0.0:
        raise ValueError("retention_ratio: the reference effect has mean 0; the ratio is undefined")
    point = float(e.mean()) / mean_r
    g = torch.Generator().manual_seed(int(seed))
    n = e.numel()
    idx = torch.randint(n, (n_boot, n), generator=g)
    ratios = e[idx].mean(dim=1) / r[idx].mean(dim=1)
    qs = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=torch.float64)
    lo, hi = torch.nanquantile(ratios, qs).tolist()
    return point, float(lo), float(hi)


def _derived_seed(seed: int, draw: int, layer: int) -> int:
    # SeedSequence mixes (seed, draw, layer) into an independent, platform-stable stream seed.
    a, b = np.random.SeedSequence((seed, draw, layer)).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


def random_reference(
    write_deltas: Mapping[Key, Tensor], ranks: Sequence[int | None], n_draws: int, seed: int
) -> list[Deltas]:
    """n_draws keep_B(w) variants for Haar-random bases B_l at the per-layer ranks `ranks`.

    `ranks[l]` is layer l's rank (0 or None: no basis, the layer keeps nothing). Draw j's basis
    at layer l comes from its own generator, seeded from (seed, j, l) through numpy's
    SeedSequence (no Python hash()), so it does not depend on which other layers are present.
    """
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 0:
        raise ValueError(f"n_draws must be an int >= 0, got {n_draws!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    dims: dict[int, int] = {}
    for raw_key, delta in write_deltas.items():
        layer, role = _check_key(raw_key)
        dims.setdefault(layer, _check_delta((layer, role), delta).shape[0])
    for layer in dims:
        if layer >= len(ranks):
            raise ValueError(f"ranks has {len(ranks)} entries (one per layer) but the deltas touch "
                             f"layer {layer}")
    for layer, k in enumerate(ranks):
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0):
            raise ValueError(f"rank at layer {layer} must be an int >= 0 or None, got {k!r}")
        if k and layer in dims and k > dims[layer]:
            raise ValueError(f"rank {k} at layer {layer} exceeds d={dims[layer]}")
    out = []
    for draw in range(n_draws):
        bases: list[Tensor | None] = [None] * len(ranks)
        for layer, d in dims.items():
            k = ranks[layer]
            if k:
                g = torch.Generator().manual_seed(_derived_seed(int(seed), draw, layer))
                bases[layer] = haar_bases(d, int(k), 1, g, dtype=torch.float64)[0]
        out.append(project_writes(write_deltas, bases, "keep"))
    return out


def percentile(value: float, reference_values: Sequence[float] | Tensor) -> float:
    """Fraction of reference values ≤ value. Ties count as ≤ (a value equal to every reference
    scores 1.0), so an oracle at the top of its null has percentile 1."""
    ref = _check_vector(reference_values, "reference_values")
    value = float(value)
    if math.isnan(value):
        raise ValueError("percentile: value is nan")
    return float((ref <= value).double().mean())
