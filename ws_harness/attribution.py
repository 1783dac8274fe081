"""Linear (attribution) retention (SPEC §4.1): path-averaged gradients, causal matrices C_l, exact null."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ws_harness.arch import READ_ROLES, ROLES, WRITE_ROLES, Architecture
from ws_harness.data import ProbeSet
from ws_harness.device import model_device
from ws_harness.diffs import Diff, validate_diff, weight_steer
from ws_harness.linalg import BASIS_ORTHONORMAL_TOL, top_eigenvectors
from ws_harness.nulls import SIGNED_P_METHODS, null_moments, signed_layer_sum_p_value
from ws_harness.prefix import (
    block_inputs,
    first_touched_layer,
    hidden_entering,
    replayed_prefix,
    split_shared_prefix,
)
from ws_harness.steering import answer_logit_diff

__all__ = [
    "Key",
    "SIDES",
    "SCOPES",
    "PathGradients",
    "LinearRetention",
    "path_gradients",
    "steering_effect",
    "role_deltas",
    "causal_matrices",
    "causal_oracle",
    "linear_retention",
]

Key = tuple[int, str]  # (layer, role)
SIDES: dict[str, tuple[str, ...]] = {"write": WRITE_ROLES, "read": READ_ROLES}
SCOPES = ("per_layer", "global")

# Σ tr C ≤ this × Σ_l ‖C_l‖_* (nuclear norm) counts as "no first-order steering": a ratio
# over it would read rounding, so the scores are NaN with a reason instead.
_TRACE_TOL = 1e-9


def _diff_tensors(w: Mapping[str, Tensor] | Diff) -> Mapping[str, Tensor]:
    return w.w if isinstance(w, Diff) else w


def steering_effect(
    model: torch.nn.Module,
    probes: ProbeSet,
    answer_ids: tuple[int, int],
    w: Mapping[str, Tensor] | Diff,
    *,
    batch_size: int = 20,
) -> float:
    """Measured S(w) = mean_i [m_i(θ + w) − m_i(θ − w)]: two forwards under weight_steer(±1)."""
    with weight_steer(model, w, 1.0):
        plus = answer_logit_diff(model, probes, answer_ids, batch_size)
    with weight_steer(model, w, -1.0):
        minus = answer_logit_diff(model, probes, answer_ids, batch_size)
    return float((plus.double() - minus.double()).mean())


@dataclass
class PathGradients:
    """Ḡ_T,l = ∫ ∇_{W_T,l} mean_i m_i (θ + t·w) dt / 2 over t ∈ [−1, 1] (Gauss–Legendre).

    ``grads``: (layer, role) → float32 CPU tensor [out, in] for every role in ``roles`` of
    every layer w touches. ``dots``: parameter name → ⟨Ḡ, Δ⟩ for every parameter w touches
    (norms and embeddings included). ``s_linear`` = 2·Σ dots, the first-order (integrated-
    gradients) prediction of S(w); ``s_measured`` the measured S(w) (None if not measured),
    so ``quadrature_error`` = |s_linear − s_measured| is the quadrature's error.
    """

    grads: dict[Key, Tensor] = field(repr=False)
    dots: dict[str, float] = field(repr=False)
    s_linear: float
    n_nodes: int
    nodes: tuple[float, ...]
    weights: tuple[float, ...]
    layers: tuple[int, ...]
    roles: tuple[str, ...]
    n_prompts: int
    s_measured: float | None = None

    @property
    def quadrature_error(self) -> float:
        """|s_linear − S(w)|; NaN when S(w) was not measured."""
        return math.nan if self.s_measured is None else abs(self.s_linear - self.s_measured)

    @property
    def rel_error(self) -> float:
        """|s_linear − S(w)| / |S(w)|; NaN when not measured or S(w) = 0."""
        if self.s_measured is None or self.s_measured == 0.0:
            return math.nan
        return self.quadrature_error / abs(self.s_measured)


def path_gradients(
    model: torch.nn.Module,
    arch: Architecture,
    probes: ProbeSet,
    answer_ids: tuple[int, int],
    w: Mapping[str, Tensor] | Diff,
    *,
    roles: Iterable[str] = tuple(ROLES),
    n_nodes: int = 4,
    batch_size: int = 20,
    measure: bool = True,
    share_upstream: bool = True,
    share_prefix: bool = True,
) -> PathGradients:
    """Gradients of mean_i m_i averaged over the straight path θ + t·w, t ∈ [−1, 1].

    m_i = logit(pos) − logit(neg) at the last token of prompt i (as ``answer_logit_diff``,
    ``logits_to_keep=1``). The t-average uses ``n_nodes``-point Gauss–Legendre nodes with
    weights/2 (n_nodes = 1 is the gradient at θ). Gradients are taken only for the given
    ``roles`` in the layers w touches and for w's other parameters (needed for s_linear);
    every other parameter has requires_grad False meanwhile. Weights (bit-for-bit, by
    ``weight_steer``), requires_grad flags and ``.grad`` are restored afterwards, also on
    error. ``measure``: also measure S(w) (two more forward passes). ``batch_size`` prompts
    go through each backward pass: its activations are the memory peak. With the shared prefix
    (below), 20 prompts of the 135M model peak at 2.37 GB of process RSS in 0.70× the time of
    batches of 4 without it (2.09 GB); in batches of 4 the one-row prefix pass per batch eats
    the gain.
    ``share_upstream``: the layers below the first layer w touches are the same at every node
    (w does not change them, and no gradient is taken there), so they run once for all nodes
    (`prefix.replayed_prefix`), not once per node and batch. ``share_prefix``: the token
    prefix a batch's prompts share runs on one row, and its keys and values (with their
    gradient path) serve every row of the batch (`prefix.split_shared_prefix`). Both change
    the gradients only by float rounding.
    """
    roles = tuple(roles)
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ValueError(f"roles must be a non-empty subset of {tuple(ROLES)}, got {roles!r}")
    for name, v in (("n_nodes", n_nodes), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if len(probes) == 0:
        raise ValueError("probes is empty: the margin mean needs at least one prompt")
    checked = validate_diff(_diff_tensors(w), model, source="path_gradients")
    layers = sorted({p[0] for name in checked if (p := arch.parse_param_name(name)) is not None})
    role_of = {arch.param_name(layer, role): (layer, role) for layer in layers for role in roles}
    wanted = set(role_of) | set(checked)
    params = dict(model.named_parameters())
    nodes, gl_weights = np.polynomial.legendre.leggauss(n_nodes)
    weights = gl_weights / 2.0  # mean over t ∈ [−1, 1]
    n = len(probes)
    pos, neg = int(answer_ids[0]), int(answer_ids[1])

    device = model_device(model)
    first = first_touched_layer(arch, checked) if share_upstream else 0
    batches = [probes.slice(start, start + batch_size).to(device) for start in range(0, n, batch_size)]
    splits = [split_shared_prefix(b.input_ids, b.attention_mask) if share_prefix else None
              for b in batches]
    # Per batch, not sliced from one pass: a slice keeps only its own padding.
    with torch.no_grad():  # the base prefix pass needs no graph
        upstream = [hidden_entering(model, arch, block_inputs(model, b, split), first)
                    for b, split in zip(batches, splits, strict=True)] if first else None
    flags = {name: p.requires_grad for name, p in params.items()}
    saved_grads = {name: params[name].grad for name in wanted}
    acc = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in wanted}
    # float32 weights sum a node's batches in .grad; lower precision would round that sum at
    # every batch, so there each batch's gradient goes to the float32 accumulator at once.
    per_batch = any(params[name].dtype != torch.float32 for name in wanted)

    def collect(wt: float) -> None:
        for name in wanted:
            grad = params[name].grad
            if grad is not None:  # None: the margin does not depend on it
                acc[name].add_(grad.float(), alpha=wt)
            params[name].grad = None

    try:
        for name, p in params.items():
            p.requires_grad_(name in wanted)
        for name in wanted:
            params[name].grad = None
        for t, wt in zip(nodes.tolist(), weights.tolist(), strict=True):
            with weight_steer(model, checked, t), torch.enable_grad():
                for i in range(len(batches)):
                    with ExitStack() as stack:
                        # the prefix runs here, at this node's weights
                        inputs = block_inputs(model, batches[i], splits[i])
                        if upstream is not None:
                            stack.enter_context(replayed_prefix(arch, first, upstream[i]))
                        logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()
                    ((logits[:, pos] - logits[:, neg]).sum() / n).backward()
                    if per_batch:
                        collect(wt)
            collect(wt)
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
        for name, grad in saved_grads.items():
            params[name].grad = grad

    dots = {
        name: float((acc[name].cpu().double() * delta.double()).sum())
        for name, delta in checked.items()
    }
    result = PathGradients(
        grads={key: acc[name].cpu() for name, key in role_of.items()},
        dots=dots,
        s_linear=2.0 * math.fsum(dots.values()),
        n_nodes=n_nodes,
        nodes=tuple(nodes.tolist()),
        weights=tuple(weights.tolist()),
        layers=tuple(layers),
        roles=roles,
        n_prompts=n,
    )
    if measure:
        result.s_measured = steering_effect(model, probes, answer_ids, checked, batch_size=batch_size)
    return result


def role_deltas(arch: Architecture, w: Mapping[str, Tensor] | Diff) -> dict[Key, Tensor]:
    """A diff {parameter name: delta} keyed (layer, role); parameters outside the seven roles dropped."""
    out: dict[Key, Tensor] = {}
    for name, delta in _diff_tensors(w).items():
        key = arch.parse_param_name(name)
        if key is not None:
            out[key] = delta
    return out


def causal_matrices(
    deltas: Mapping[Key, Tensor],
    grads: Mapping[Key, Tensor],
    n_layers: int,
    side: str = "write",
    read_gains: Mapping[Key, Tensor] | None = None,
) -> list[Tensor | None]:
    """C_l per layer (float64 CPU, d×d, symmetric, indefinite), None where the layer has no delta.

    ``side="write"``: C_l = Σ_{T ∈ {o, down}} sym(ΔW_T Ḡ_Tᵀ), in the residual stream those
    tensors write to, so tr(P_l C_l) = Σ_T ⟨P_l ΔW_T, Ḡ_T⟩ is the first-order effect of
    keeping the part of the write deltas inside B_l. ``side="read"``: C_l =
    Σ_{T ∈ {q, k, v, gate, up}} sym(D_T ΔW_Tᵀ Ḡ_T D_T⁻¹) in residual coordinates (SPEC §5:
    read bases fold the RMSNorm gain). T reads x̂ = γ ⊙ x/rms(x); keeping what it reads from
    the residual subspace B is ΔW_T·D·P_B·D⁻¹ on x̂ (D = diag(γ_T), `read_gains[(l, T)]`), so
    the first-order effect is tr(P_B D⁻¹Ḡ_TᵀΔW_T D). Without `read_gains` D = I (the normed
    coordinates). Ḡ_T's column j carries the factor γ_j, so dividing by it loses no precision;
    a zero gain makes that coordinate unreadable and is refused. sym(X) = (X + Xᵀ)/2; tr C_l
    = Σ_T ⟨ΔW_T, Ḡ_T⟩ either way.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {tuple(SIDES)}, got {side!r}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
    for layer, _ in deltas:
        if not 0 <= layer < n_layers:
            raise ValueError(f"delta key layer {layer} out of range for n_layers={n_layers}")
    out: list[Tensor | None] = []
    for layer in range(n_layers):
        c: Tensor | None = None
        for role in SIDES[side]:
            if (layer, role) not in deltas:
                continue
            if (layer, role) not in grads:
                raise ValueError(
                    f"no gradient for (layer={layer}, role={role!r}); pass path_gradients(..., "
                    f"roles=...) including {role!r}"
                )
            delta, grad = deltas[(layer, role)].double().cpu(), grads[(layer, role)].double().cpu()
            if delta.ndim != 2 or delta.shape != grad.shape:
                raise ValueError(
                    f"(layer={layer}, role={role!r}): delta shape {tuple(delta.shape)} and "
                    f"gradient shape {tuple(grad.shape)} must be equal [out, in]"
                )
            if side == "write":
                m = delta @ grad.T
            else:
                m = delta.T @ grad
                gain = None if read_gains is None else read_gains.get((layer, role))
                if gain is not None:
                    gain = gain.double().cpu()
                    if bool((gain == 0).any()):
                        raise ValueError(f"(layer={layer}, role={role!r}): the norm gain has "
                                         "zero entries; that coordinate reads nothing")
                    m = gain[:, None] * m / gain[None, :]  # D (ΔWᵀḠ) D⁻¹
            c = m if c is None else c + m
        out.append(None if c is None else (c + c.T) / 2.0)
    return out


def causal_oracle(Cs: Sequence[Tensor | None], k: int | Sequence[int]) -> list[Tensor | None]:
    """Top-k eigenvectors of each C_l ([d, k] float64): by Ky Fan no rank-k basis has a larger c_lin."""
    ks = [k] * len(Cs) if isinstance(k, int) else list(k)
    if len(ks) != len(Cs):
        raise ValueError(f"need one rank per layer: {len(ks)} ranks for {len(Cs)} layers")
    out: list[Tensor | None] = []
    for c, kk in zip(Cs, ks, strict=True):
        if c is None:
            out.append(None)
            continue
        if not 1 <= kk <= c.shape[0]:
            raise ValueError(f"k must be in [1, d={c.shape[0]}], got {kk}")
        out.append(top_eigenvectors(c.double(), kk))
    return out


@dataclass
class LinearRetention:
    """c_lin(B) = Σ_l tr(B_lᵀC_lB_l) / Σ_l tr C_l over ``layers`` (those with a basis and a C).

    ``c_lin_layers``: tr(B_lᵀC_lB_l)/tr C_l per layer (NaN where excluded or tr C_l ≈ 0).
    Exact null (a uniformly random k_l-dim subspace per layer for ``per_layer``, one shared
    for ``global``): ``null_mean`` = Σ (k_l/d) tr C_l / Σ tr C_l, ``null_sd`` from
    Var tr(PC) = 2k(d−k)/(d(d−1)(d+2))·(tr C² − (tr C)²/d) (layers' variances summed; C̄ =
    Σ_l C_l for global). ``r`` = c_lin/null_mean (R_causal; 1 = a random subspace),
    ``null_sd_r`` its null sd, ``z`` = (r − 1)/null_sd_r (0 for a point-mass null), ``p`` =
    P(null ≥ observed) by ``signed_layer_sum_p_value``. ``pct_oracle`` = Σ tr(BᵀCB) / Σ_l
    (top-k_l eigenvalues of C_l) (Ky Fan ceiling at equal rank, per layer for either scope).
    ``numerator`` = Σ tr(BᵀCB), ``tr_c`` = Σ tr C, ``abs_c`` = Σ ‖C_l‖_*. When Σ tr C ≤ 0
    (the writes do not carry the steering at first order) or the null mean is ≤ 0 the scores
    are NaN and ``reason`` says why.
    """

    scope: str
    d: int
    layers: list[int]
    ks: list[int]
    c_lin: float
    c_lin_layers: list[float]
    null_mean: float
    null_sd: float
    r: float
    null_sd_r: float
    z: float
    p: float
    pct_oracle: float
    numerator: float
    tr_c: float
    tr_c_layers: list[float]
    abs_c: float
    oracle: float
    p_method: str
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_basis(b: Tensor, d: int, layer: int) -> Tensor:
    if not isinstance(b, Tensor) or b.ndim != 2:
        raise ValueError(f"layer {layer}: a basis must be a 2-D tensor [d, k], got {b!r:.60}")
    if b.shape[0] != d or not 1 <= b.shape[1] <= d:
        raise ValueError(
            f"layer {layer}: basis shape {tuple(b.shape)} must be [d={d}, k] with 1 <= k <= d"
        )
    b = b.detach().double().cpu()
    err = float((b.T @ b - torch.eye(b.shape[1], dtype=torch.float64)).abs().max())
    if err > BASIS_ORTHONORMAL_TOL:
        raise ValueError(
            f"layer {layer}: basis is not orthonormal (max |BᵀB − I| = {err:.3g}); "
            "orthonormalise it (QR) first"
        )
    return b


def linear_retention(
    bases: Tensor | Sequence[Tensor | None],
    Cs: Sequence[Tensor | None],
    scope: str = "per_layer",
    *,
    p_method: str = "beta",
    eigenvalues: Sequence[Tensor | None] | None = None,
) -> LinearRetention:
    """c_lin, R_causal, exact null, p and pct_oracle of bases (SPEC §4.1); see LinearRetention.

    ``bases``: one orthonormal [d, k_l] tensor or None per layer (or one tensor, used at
    every layer); ``Cs``: ``causal_matrices`` output. ``scope="global"`` needs the same
    basis at every used layer (its null is one shared subspace: C̄ = Σ_l C_l).
    ``eigenvalues``: optional precomputed eigenvalues of each C_l (same indexing as Cs), so
    scoring many bases against one diff does not redo the d×d eigendecompositions.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if p_method not in SIGNED_P_METHODS:
        raise ValueError(f"p_method must be one of {SIGNED_P_METHODS}, got {p_method!r}")
    Cs = list(Cs)
    basis_list = [bases] * len(Cs) if isinstance(bases, Tensor) else list(bases)
    if len(basis_list) != len(Cs):
        raise ValueError(f"need one basis (or None) per layer: {len(basis_list)} for {len(Cs)} Cs")
    used = [l for l, (b, c) in enumerate(zip(basis_list, Cs, strict=True)) if b is not None and c is not None]
    if not used:
        raise ValueError("no layer has both a basis and a C: nothing to score")
    d = int(Cs[used[0]].shape[0])
    mats, bs = {}, {}
    for l in used:
        c = Cs[l].detach().double().cpu()
        if c.shape != (d, d):
            raise ValueError(f"layer {l}: C has shape {tuple(c.shape)}, expected [{d}, {d}]")
        mats[l], bs[l] = (c + c.T) / 2.0, _check_basis(basis_list[l], d, l)
    ks = [int(bs[l].shape[1]) for l in used]
    if scope == "global":
        first = bs[used[0]]
        for l in used[1:]:
            if bs[l].shape != first.shape or not torch.allclose(bs[l], first, atol=1e-6):
                raise ValueError(
                    f"scope='global' needs one basis at every layer; layer {l}'s differs from "
                    f"layer {used[0]}'s (use scope='per_layer')"
                )

    # tr(BᵀCB) summed like tr C, so B = I gives c_lin = 1 exactly (I·X is exact).
    nums = {l: float(torch.diagonal(bs[l].T @ (mats[l] @ bs[l])).sum()) for l in used}
    if eigenvalues is not None and len(eigenvalues) != len(Cs):
        raise ValueError(f"need eigenvalues per layer like Cs: {len(eigenvalues)} for {len(Cs)}")
    eigs = {}
    for l in used:
        given = None if eigenvalues is None else eigenvalues[l]
        if given is None:
            eigs[l] = torch.linalg.eigvalsh(mats[l])
            continue
        eigs[l] = torch.as_tensor(given).detach().double().cpu().reshape(-1)
        if eigs[l].numel() != d:
            raise ValueError(f"layer {l}: {eigs[l].numel()} eigenvalues given, C is {d}×{d}")
        if abs(float(eigs[l].sum()) - float(torch.diagonal(mats[l]).sum())) > 1e-6 * (
            float(eigs[l].abs().sum()) + 1e-300
        ):
            raise ValueError(f"layer {l}: the given eigenvalues do not sum to tr C_l; wrong layer?")
    traces = {l: float(torch.diagonal(mats[l]).sum()) for l in used}
    numerator = math.fsum(nums.values())
    tr_c = math.fsum(traces.values())
    abs_c = math.fsum(float(eigs[l].abs().sum()) for l in used)
    oracle = math.fsum(float(eigs[l].flip(0)[:k].sum()) for l, k in zip(used, ks, strict=True))
    mean_num = math.fsum(k * traces[l] / d for l, k in zip(used, ks, strict=True))
    if scope == "global":
        c_bar = sum(mats[l] for l in used)
        spectra = [torch.linalg.eigvalsh(c_bar)]
        var_num = null_moments(float(spectra[0].sum()), float(spectra[0].square().sum()), ks[0], d)[1]
        p_ks = [ks[0]]
    else:
        spectra = [eigs[l] for l in used]
        var_num = math.fsum(
            null_moments(traces[l], float(eigs[l].square().sum()), k, d)[1]
            for l, k in zip(used, ks, strict=True)
        )
        p_ks = ks
    sd_num = math.sqrt(var_num)

    def per_layer(l: int) -> float:
        if l not in mats or traces[l] <= _TRACE_TOL * float(eigs[l].abs().sum()):
            return math.nan
        return nums[l] / traces[l]

    nan = math.nan
    reason = None
    if not tr_c > _TRACE_TOL * abs_c:
        reason = (
            f"Σ tr C = {tr_c:.4g} ≤ 0 (Σ‖C_l‖_* = {abs_c:.4g}): these deltas do not carry the "
            "steering at first order, so a retained fraction is undefined"
        )
    elif not mean_num > _TRACE_TOL * abs_c:
        reason = (
            f"null mean Σ (k_l/d) tr C_l = {mean_num:.4g} ≤ 0: layers with negative tr C_l "
            "outweigh the rest at these ranks, so R_causal is undefined"
        )
    if reason is not None:
        c_lin = null_mean = null_sd = r = sd_r = z = p = pct = nan
    else:
        c_lin, null_mean, null_sd = numerator / tr_c, mean_num / tr_c, sd_num / tr_c
        r, sd_r = numerator / mean_num, sd_num / mean_num
        z = (r - 1.0) / sd_r if sd_r > 0 else 0.0
        p = signed_layer_sum_p_value(numerator, spectra, p_ks, d, method=p_method)
        pct = numerator / oracle if oracle > 0 else nan
    return LinearRetention(
        scope=scope,
        d=d,
        layers=used,
        ks=ks,
        c_lin=c_lin,
        c_lin_layers=[per_layer(l) for l in range(len(Cs))],
        null_mean=null_mean,
        null_sd=null_sd,
        r=r,
        null_sd_r=sd_r,
        z=z,
        p=p,
        pct_oracle=pct,
        numerator=numerator,
        tr_c=tr_c,
        tr_c_layers=[traces.get(l, nan) for l in range(len(Cs))],
        abs_c=abs_c,
        oracle=oracle,
        p_method=p_method,
        reason=reason,
    )
