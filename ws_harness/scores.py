"""Scores of a basis against the diff (SPEC §4): targets A, E/R with nulls, oracles, summaries."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .linalg import DEFAULT_RTOL, complement, left_basis, orthonormalize, validate_basis
from .linalg import overlap as _overlap
from .nulls import (
    DEFAULT_MC_SAMPLES,
    DEFAULT_STRUCTURED_P_SAMPLES,
    DEFAULT_STRUCTURED_SAMPLES,
    StructuredDraws,
    beta_p_value,
    layer_mean_saddlepoint_p_value,
    mc_p_value,
    monte_carlo_null,
    null_moments,
    saddlepoint_p_value,
    shared_complement_layer_mean_p_value,
    shared_complement_weights,
    structured_null,
    structured_null_draws,
    sum_sq64,
)

__all__ = [
    "Target",
    "Score",
    "StructuredScore",
    "LayerSummary",
    "activation_target",
    "weight_target",
    "combined_weight_target",
    "mean_tr_a2",
    "mean_spectrum",
    "recovery",
    "structured_recovery",
    "structured_reference",
    "structured_test",
    "structured_layer_mean",
    "specificity_summary",
    "oracle_basis",
    "oracle_energy",
    "pct_oracle",
    "diff_overlap",
    "specificity",
    "bootstrap_r_act_ci",
    "bootstrap_mean_r_act_ci",
    "benjamini_hochberg",
    "summarize_layers",
    "joint_score",
    "act_w_gap_log2",
]

NullKind = Literal["exact", "monte_carlo"]
PMethod = Literal["beta", "saddlepoint"]
BasisKind = Literal["per_layer", "global"]

# tr A = ‖F‖_F² must be 1 to this tolerance (float32 normalisation leaves ~1e-7).
_TRACE_TOL = 1e-4
# E(B) may exceed the Ky Fan bound only by rounding; beyond this pct_oracle signals a bug.
_KY_FAN_SLACK = 1e-3


def _work_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (half, bf16, ints) is scored in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_2d(t: object, name: str, shape_hint: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_hint}, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D {shape_hint}, got shape {tuple(t.shape)}")
    n_bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
    if n_bad:
        raise ValueError(
            f"{name} has {n_bad} non-finite entries (NaN/inf); fix the captured tensor"
        )
    return t


def _gram_small(F: Tensor) -> Tensor:
    """Smaller Gram of F [d, m] in float64: FᵀF if m ≤ d else FFᵀ (nonzero spectrum of A)."""
    F64 = F.detach().to("cpu" if F.device.type == "mps" else F.device, torch.float64)
    return F64.T @ F64 if F64.shape[1] <= F64.shape[0] else F64 @ F64.T


@dataclass(frozen=True, eq=False)
class Target:
    """A target matrix A = F Fᵀ with tr A = ‖F‖_F² = 1, held through its factor F [d, m].

    E(B) = tr(BᵀAB) = ‖BᵀF‖_F² for an orthonormal basis B [d, k]. ``tr_a2`` = tr(A²) is
    computed once from the smaller Gram matrix in float64 (it sets the null variance).
    A float32 factor has ‖F‖_F² = 1 only to ~1e-7, which would leak into tr(A²) − 1/d for
    near-isotropic A; so ``norm2`` = ‖F‖_F² is kept in float64 and E, tr(A²) and the
    spectrum are all taken for A/‖F‖_F², whose trace is exactly 1.
    Build targets with ``activation_target``, ``weight_target`` or ``combined_weight_target``.
    """

    factor: Tensor
    kind: str = "custom"
    norm2: float = field(init=False)
    tr_a2: float = field(init=False)
    # k → top-k eigenvectors of A: the same for every basis scored against this target.
    _oracles: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False)
    _layer_means: dict[tuple, tuple] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        F = _check_2d(self.factor, "factor", "[d, m]")
        if not F.is_floating_point():
            raise TypeError(f"factor must be floating, got {F.dtype}")
        if F.shape[0] < 1 or F.shape[1] < 1:
            raise ValueError(f"factor must be non-empty [d, m], got shape {tuple(F.shape)}")
        G = _gram_small(F)
        tr_a = float(G.trace())
        if abs(tr_a - 1.0) > _TRACE_TOL:
            raise ValueError(
                f"tr A = ‖F‖_F² = {tr_a:.6g}, expected 1; normalise the factor (F / ‖F‖_F)"
            )
        object.__setattr__(self, "norm2", tr_a)
        object.__setattr__(self, "tr_a2", float(G.square().sum()) / tr_a**2)

    @property
    def d(self) -> int:
        """Ambient dimension (d_model)."""
        return int(self.factor.shape[0])

    @property
    def m(self) -> int:
        """Number of factor columns (samples, or weight columns)."""
        return int(self.factor.shape[1])

    @cached_property
    def spectrum(self) -> Tensor:
        """Eigenvalues of A, descending, float64 CPU, length min(d, m) (sums to 1)."""
        evals = torch.linalg.eigvalsh(_gram_small(self.factor)).flip(0).clamp_min(0.0)
        return evals.cpu() / self.norm2

    def energy(self, B: Tensor) -> float:
        """E(B) = tr(BᵀAB) = ‖BᵀF‖_F²/‖F‖_F² for an orthonormal B [d, k], accumulated in float64."""
        if B.shape[0] != self.d:
            raise ValueError(f"basis has {B.shape[0]} rows, target lives in d={self.d}")
        if B.device != self.factor.device:
            raise ValueError(
                f"basis is on {B.device} but the target is on {self.factor.device}; "
                "move one with .to()"
            )
        dtype = torch.promote_types(B.dtype, self.factor.dtype)
        return float(sum_sq64(B.to(dtype).T @ self.factor.to(dtype), dim=(0, 1))) / self.norm2


def activation_target(X: Tensor, kind: str = "act") -> Target:
    """A_act = mean_i x̂_i x̂_iᵀ from label samples X [n, d]: F = columns x̂_i/√n, x̂_i = x_i/‖x_i‖.

    A zero row has no direction: raises ValueError naming it (drop that prompt upstream).
    """
    X = _check_2d(X, "X", "[n, d] (one label sample per row)")
    n, d = X.shape
    if n == 0:
        raise ValueError("X has no rows; an activation target needs at least one label sample")
    Xw = X.to(_work_dtype(X))
    norms = torch.linalg.vector_norm(Xw, dim=1)
    zero = torch.nonzero(norms == 0).flatten().tolist()
    if zero:
        raise ValueError(
            f"label sample row(s) {zero[:10]} are all-zero and have no direction; "
            "drop those prompts"
        )
    F = (Xw / norms[:, None]).T / math.sqrt(n)
    return Target(F.contiguous(), kind=kind)


def _unit_frobenius(M: Tensor) -> Tensor | None:
    """M/‖M‖_F in the working dtype, or None for an all-zero tensor."""
    Mw = M.to(_work_dtype(M))
    norm = math.sqrt(float(sum_sq64(Mw, dim=(0, 1))))
    return None if norm == 0.0 else Mw / norm


def weight_target(M: Tensor | None, kind: str = "w") -> Target | None:
    """A = MMᵀ/‖M‖_F² for a residual-writing weight delta M = ΔW_T [d, m]: F = M/‖M‖_F.

    Untouched layers: ``M`` None or all-zero returns None (there is no target, not a zero
    one). ``recovery(B, None)`` then gives an all-NaN Score, so R_w is NaN and excluded from
    layer means, never 0.
    """
    if M is None:
        return None
    M = _check_2d(M, "M", "[d, m] (rows in d_model)")
    F = _unit_frobenius(M)
    return None if F is None else Target(F.contiguous(), kind=kind)


def combined_weight_target(Ms: Sequence[Tensor | None], kind: str = "w_combined") -> Target | None:
    """Balanced target of several write tensors (e.g. [ΔW_o, ΔW_down]), each [d, m_j].

    Each tensor is scaled to unit Frobenius norm, columns are concatenated, and the result
    is normalised (÷√#parts), so the 3×-wider down_proj does not dominate. Parts that are
    None or all-zero are untouched and skipped; if all are, returns None (NaN scores).
    """
    if isinstance(Ms, Tensor):
        raise TypeError("combined_weight_target takes a sequence of tensors, e.g. [dW_o, dW_down]")
    parts: list[Tensor] = []
    d: int | None = None
    for j, M in enumerate(Ms):
        if M is None:
            continue
        M = _check_2d(M, f"Ms[{j}]", "[d, m_j]")
        if d is None:
            d = M.shape[0]
        elif M.shape[0] != d:
            raise ValueError(
                f"Ms[{j}] has {M.shape[0]} rows, expected d={d}; all tensors must write to d_model"
            )
        F = _unit_frobenius(M)
        if F is not None:
            parts.append(F)
    if not parts:
        return None
    dtype = parts[0].dtype
    F = torch.cat([p.to(dtype) for p in parts], dim=1) / math.sqrt(len(parts))
    return Target(F.contiguous(), kind=kind)


def _mean_gram(targets: Sequence[Target | None]) -> Tensor:
    """Smaller Gram of Ā = mean_l A_l = F̄F̄ᵀ, F̄ = [F_1/‖F_1‖ … F_L/‖F_L‖]/√L, in float64.

    F̄ᵀF̄ when Σm_l ≤ d (e.g. 16 labels × 30 layers), else Σ_l F_lF_lᵀ/L (weights), built
    one float64 copy at a time. Each F_l/‖F_l‖ gives A_l trace exactly 1 (see Target).
    """
    used = [t for t in targets if t is not None]
    if not used:
        raise ValueError("no defined layer: every target is None (untouched)")
    d, L = used[0].d, len(used)
    if any(t.d != d for t in used):
        raise ValueError("targets live in different d; a layer mean needs one residual width")
    dev = "cpu" if used[0].factor.device.type == "mps" else used[0].factor.device

    def unit(t: Target) -> Tensor:
        return t.factor.to(dev, torch.float64) / math.sqrt(t.norm2)

    if sum(t.m for t in used) <= d:
        Fbar = torch.cat([unit(t) for t in used], dim=1)
        return Fbar.T @ Fbar / L
    G = torch.zeros((d, d), dtype=torch.float64, device=dev)
    for t in used:
        F = unit(t)
        G += F @ F.T
    return G / L


def _layer_mean_memo(targets: Sequence[Target | None], what: str,
                     compute: Callable[[], Tensor]) -> Tensor:
    """Ā's Gram or spectrum, computed once per set of layer targets: it depends on the diff
    only, and every global basis's summary needs it. Kept on the first target, so it lives
    exactly as long as that target does."""
    used = tuple(t for t in targets if t is not None)
    if not used:
        return compute()  # raises the "no defined layer" error
    key = (what, tuple(id(t) for t in targets))
    memo = used[0]._layer_means
    hit = memo.get(key)
    # Weak references: the memo must not keep the targets alive (nor a reference cycle), and
    # an id reused by a new target after an old one died is not a hit.
    if hit is None or any(t is not None and ref() is not t for t, ref in zip(targets, hit[0])):
        hit = memo[key] = (tuple(None if t is None else weakref.ref(t) for t in targets), compute())
    return hit[1]


def _mean_gram_of(targets: Sequence[Target | None]) -> Tensor:
    return _layer_mean_memo(targets, "gram", lambda: _mean_gram(targets))


def _mean_spectrum_of(targets: Sequence[Target | None]) -> Tensor:
    return _layer_mean_memo(targets, "spectrum", lambda: torch.linalg.eigvalsh(
        _mean_gram_of(targets)).flip(0).clamp_min(0.0).cpu())


def mean_tr_a2(targets: Sequence[Target | None]) -> float:
    """tr(Ā²) for Ā = mean_l A_l over the non-None targets (float64); NaN if there are none.

    Depends only on the diff: compute it once per diff and pass it to
    ``summarize_layers(tr_a2_mean=...)`` when summarising many global bases.
    """
    if all(t is None for t in targets):
        return math.nan
    return float(_mean_gram_of(targets).square().sum())


def mean_spectrum(targets: Sequence[Target | None]) -> Tensor:
    """Eigenvalues of Ā = mean_l A_l over the non-None targets: descending, float64 CPU.

    Used by the saddlepoint p-value of a global basis; Σλ² = ``mean_tr_a2(targets)``.
    """
    return _mean_spectrum_of(targets).clone()


@dataclass(frozen=True)
class Score:
    """Recovery of one basis against one target (SPEC §4).

    k: the basis's rank (columns); d: ambient dimension; e = tr(BᵀAB) ∈ [0, 1];
    r = E/(k/d); null_*: mean and sd of E and R under the random-subspace null
    (exact: null_mean_r = 1); z = (R − null_mean_r)/null_sd_r; p: one-sided P(null ≥ E).
    null: "exact", "monte_carlo" or "none" (undefined: all NaN); p_method: "beta",
    "saddlepoint", "mc" ((b+1)/(m+1)) or "none".
    """

    k: int
    d: int
    e: float
    r: float
    null_mean_e: float
    null_sd_e: float
    null_mean_r: float
    null_sd_r: float
    z: float
    p: float
    null: str
    p_method: str

    @property
    def defined(self) -> bool:
        """False for layers without a target (untouched) or bases with no directions left."""
        return not math.isnan(self.e)

    @classmethod
    def undefined(cls, k: int, d: int) -> Score:
        """All-NaN score: no target (untouched layer) or nothing left to score."""
        nan = math.nan
        return cls(
            k=k,
            d=d,
            e=nan,
            r=nan,
            null_mean_e=nan,
            null_sd_e=nan,
            null_mean_r=nan,
            null_sd_r=nan,
            z=nan,
            p=nan,
            null="none",
            p_method="none",
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _z(x: float, mean: float, sd: float) -> float:
    # A zero-variance null is a point mass (k = d, isotropic A): all bases score the mean; z := 0.
    return (x - mean) / sd if sd > 0 else 0.0


def _check_target(target: object) -> None:
    if target is not None and not isinstance(target, Target):
        raise TypeError(
            f"target must be a Target or None (untouched layer), got {type(target).__name__}"
        )


def recovery(
    B: Tensor,
    target: Target | None,
    *,
    null: NullKind = "exact",
    p_method: PMethod = "beta",
    n_null: int = DEFAULT_MC_SAMPLES,
    generator: torch.Generator | int = 0,
) -> Score:
    """Score basis B [d, k] against target A: E = tr(BᵀAB), R = E/(k/d), z and one-sided p.

    ``null="exact"`` uses the closed-form moments (null mean of R is 1); its p-value is the
    moment-matched Beta (``p_method="beta"``, SPEC §4) or the spectrum saddlepoint
    (``"saddlepoint"``, calibrated where the Beta is anti-conservative; see
    ``nulls.saddlepoint_p_value``). ``null="monte_carlo"`` draws ``n_null`` Haar subspaces
    from ``generator`` (an int seed) and uses their mean/sd and (b+1)/(m+1).
    ``target=None`` (untouched layer) returns ``Score.undefined`` after still validating B.
    """
    _check_target(target)
    if target is None:
        # No target to fix d: still reject a malformed basis (type, shape, NaN, orthonormality).
        validate_basis(B, int(B.shape[0]) if isinstance(B, Tensor) and B.ndim == 2 else -1)
        return Score.undefined(k=int(B.shape[1]), d=int(B.shape[0]))
    validate_basis(B, target.d)
    k, d = int(B.shape[1]), target.d
    e = target.energy(B)
    scale = d / k  # R = E · d/k
    if null == "exact":
        mean_e, var_e = null_moments(1.0, target.tr_a2, k, d)
        sd_e = math.sqrt(var_e)
        if p_method == "beta":
            p = beta_p_value(e, mean_e, var_e)
        elif p_method == "saddlepoint":
            p = saddlepoint_p_value(e, target.spectrum, k, d)
        else:
            raise ValueError(f"p_method must be 'beta' or 'saddlepoint', got {p_method!r}")
    elif null == "monte_carlo":
        samples = monte_carlo_null(target.factor, k, n_null, generator)
        mean_e = float(samples.mean())
        sd_e = float(samples.std(unbiased=True)) if samples.numel() > 1 else 0.0
        p, p_method = mc_p_value(samples, e), "mc"
    else:
        raise ValueError(f"null must be 'exact' or 'monte_carlo', got {null!r}")
    r, null_mean_r, null_sd_r = e * scale, mean_e * scale, sd_e * scale
    return Score(
        k=k,
        d=d,
        e=e,
        r=r,
        null_mean_e=mean_e,
        null_sd_e=sd_e,
        null_mean_r=null_mean_r,
        null_sd_r=null_sd_r,
        z=_z(r, null_mean_r, null_sd_r),
        p=p,
        null=null,
        p_method=p_method,
    )


@dataclass(frozen=True)
class StructuredScore:
    """E against the structured null orth(W·G) (see ``nulls.structured_null``).

    r_struct = E / mean_struct (1 = no better than random directions shaped like W);
    z = (E − mean)/sd; p = (b+1)/(m+1) over ``n_samples`` draws.
    """

    k: int
    d: int
    e: float
    r_struct: float
    null_mean_e: float
    null_sd_e: float
    z: float
    p: float
    n_samples: int


def structured_recovery(
    B: Tensor,
    target: Target | None,
    W: Tensor,
    *,
    n_samples: int = DEFAULT_STRUCTURED_SAMPLES,
    generator: torch.Generator | int = 0,
) -> StructuredScore:
    """Score B against random subspaces shaped like the base write matrix W = [W_o | W_down]."""
    _check_target(target)
    d = int(B.shape[0]) if isinstance(B, Tensor) and B.ndim == 2 else -1
    validate_basis(B, target.d if target is not None else d)
    k = int(B.shape[1])
    if target is None:
        nan = math.nan
        return StructuredScore(
            k=k, d=d, e=nan, r_struct=nan, null_mean_e=nan, null_sd_e=nan, z=nan, p=nan, n_samples=0
        )
    e = target.energy(B)
    samples = structured_null(W, target.factor, k, n_samples, generator)
    mean = float(samples.mean())
    sd = float(samples.std(unbiased=True)) if samples.numel() > 1 else 0.0
    return StructuredScore(
        k=k,
        d=target.d,
        e=e,
        r_struct=e / mean if mean > 0 else math.nan,
        null_mean_e=mean,
        null_sd_e=sd,
        z=_z(e, mean, sd),
        p=mc_p_value(samples, e),
        n_samples=int(samples.numel()),
    )


def structured_reference(
    target: Target | None,
    W: Tensor,
    k_max: int,
    *,
    n_samples: int = DEFAULT_STRUCTURED_P_SAMPLES,
    generator: torch.Generator | int = 0,
) -> StructuredDraws | None:
    """One layer's structured-null draws (``nulls.structured_null_draws``), for every rank ≤ k_max.

    Depends on the diff's target A_l and the base W_l = [W_o | W_down] only: build it once per
    (diff, layer) and pass it to ``structured_test`` / ``structured_layer_mean`` for every
    basis. Seeds: distinct per layer (e.g. ``generator=layer``) for per-layer bases, one seed
    for all layers (e.g. ``generator=0``) for a global basis — the shared draw is then the
    structured analogue of the §4 global null. None for an untouched layer (target None).
    """
    _check_target(target)
    if target is None:
        return None
    return structured_null_draws(W, target.factor, k_max, n_samples, generator)


def structured_test(
    B: Tensor, target: Target | None, draws: StructuredDraws | None
) -> tuple[float, float]:
    """(r_w_struct, p) of basis B [d, k] against one layer's structured null.

    With E = tr(BᵀAB) and the n structured draws E_j (rank k = B's rank):
    r_w_struct = E / μ̂, μ̂ = mean_j E_j (1 = no better than random subspaces shaped like W), and
    p = (1 + #{j: E_j ≥ E}) / (n + 1), the Monte Carlo one-sided p of "r_w_struct > 1"
    (valid at any n; its floor is 1/(n + 1)). (NaN, NaN) for an untouched layer.
    """
    _check_target(target)
    d = int(B.shape[0]) if isinstance(B, Tensor) and B.ndim == 2 else -1
    validate_basis(B, target.d if target is not None else d)
    if target is None or draws is None:
        return math.nan, math.nan
    if draws.d != target.d:
        raise ValueError(f"draws live in d={draws.d}, the target in d={target.d}")
    e = target.energy(B)
    samples = draws.energies(int(B.shape[1]))
    mean = float(samples.mean())
    return (e / mean if mean > 0 else math.nan), mc_p_value(samples, e)


def structured_layer_mean(
    bases: Sequence[Tensor | None],
    targets: Sequence[Target | None],
    draws: Sequence[StructuredDraws | None],
) -> tuple[float, float]:
    """(mean_l r_w_struct_l, p) over the layers with a basis, a target and draws.

    obs = mean_l E_l(B_l)/μ̂_l; the null draw j is T_j = mean_l E_lj/μ̂_l (draw j of every layer),
    and p = (1 + #{j: T_j ≥ obs})/(n + 1). Whether the layers are independent (per-layer
    basis) or share one random subspace (global basis) is set by how the draws were seeded
    (``structured_reference``). Every layer's draws must have the same n. (NaN, NaN) if no
    layer is defined.
    """
    if not (len(bases) == len(targets) == len(draws)):
        raise ValueError(
            f"need one basis, target and draws per layer, got {len(bases)}, {len(targets)}, "
            f"{len(draws)}"
        )
    obs, null = [], []
    for B, t, dr in zip(bases, targets, draws, strict=True):
        _check_target(t)
        if B is None or t is None or dr is None:
            continue
        validate_basis(B, t.d)
        samples = dr.energies(int(B.shape[1]))
        mean = float(samples.mean())
        obs.append(t.energy(B) / mean)
        null.append(samples / mean)
    if not obs:
        return math.nan, math.nan
    if len({int(x.numel()) for x in null}) != 1:
        raise ValueError("every layer's structured draws need the same n_samples")
    return float(np.mean(obs)), mc_p_value(torch.stack(null).mean(0), float(np.mean(obs)))


def _require_target(target: object, what: str) -> Target:
    _check_target(target)
    if target is None:
        raise ValueError(
            f"{what} needs a target; this layer is untouched by the diff (target None)"
        )
    return target  # type: ignore[return-value]


def oracle_basis(target: Target, k: int) -> Tensor:
    """Top-k eigenvectors of A (= top-k left singular vectors of F) → [d, r], r ≤ rank(A).

    By Ky Fan no rank-k basis has higher E; used for act_oracle and w_oracle_T.
    """
    target = _require_target(target, "oracle_basis")
    if k not in target._oracles:  # an SVD of F per call was half the cost of scoring a basis
        target._oracles[k] = left_basis(target.factor, k)
    return target._oracles[k].clone()


def oracle_energy(target: Target, k: int) -> float:
    """Ky Fan bound: max over rank-k bases of E = sum of the top-k eigenvalues of A (float64)."""
    target = _require_target(target, "oracle_energy")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float(target.spectrum[:k].sum())


def pct_oracle(B: Tensor, target: Target | None) -> float:
    """E(B) / E(oracle at B's rank) ∈ [0, 1]; NaN for an untouched layer (target None).

    Rounding can put E(B) a hair above the bound (e.g. B = the oracle): clipped to 1.
    An excess beyond 1e-3 is impossible for an orthonormal B and raises RuntimeError.
    """
    _check_target(target)
    if target is None:
        return math.nan
    validate_basis(B, target.d)
    bound = oracle_energy(target, int(B.shape[1]))
    ratio = target.energy(B) / bound
    if ratio > 1.0 + _KY_FAN_SLACK:
        raise RuntimeError(
            f"E(B)/E(oracle) = {ratio:.6g} > 1 violates Ky Fan; the basis or target is corrupt"
        )
    return min(ratio, 1.0)


def diff_overlap(B: Tensor, target: Target | None, k_w: int | None = None) -> float:
    """overlap(B, w_oracle) = ‖BᵀB_w‖_F²/min(k, k_w); B_w = oracle of rank k_w (default: B's)."""
    _check_target(target)
    if target is None:
        return math.nan
    validate_basis(B, target.d)
    B_w = oracle_basis(target, int(B.shape[1]) if k_w is None else k_w)
    return _overlap(B, B_w.to(B.dtype))


def _specific_parts(
    B: Tensor, X: Tensor, clean_pcs: Tensor, rtol: float
) -> tuple[Tensor, Target, Tensor | None]:
    """(B_s, A'_s, Q): basis and target in the complement's coordinates, and Q [d, d'] (None:
    no clean PCs, so no removal and d' = d)."""
    X = _check_2d(X, "X", "[n, d]")
    d = X.shape[1]
    validate_basis(B, d)
    C = _check_2d(clean_pcs, "clean_pcs", "[d, k_clean]")
    if C.shape[1] == 0:
        return B, activation_target(X), None
    validate_basis(C, d, name="clean_pcs")
    if C.shape[1] >= d:
        raise ValueError(
            f"clean_pcs has {C.shape[1]} columns, leaving nothing of d={d}; use k_clean < d"
        )
    dtype = _work_dtype(X)
    Q = complement(C.to(dtype))  # [d, d']
    Xs = X.to(dtype) @ Q
    inside = torch.nonzero(
        torch.linalg.vector_norm(Xs, dim=1) <= 1e-6 * torch.linalg.vector_norm(X.to(dtype), dim=1)
    )
    if inside.numel():
        raise ValueError(
            f"label sample row(s) {inside.flatten().tolist()[:10]} lie inside the clean PCs; "
            "they have no specific component to score (drop them or use fewer clean PCs)"
        )
    Bs = orthonormalize(Q.T @ B.to(dtype), rtol, atol=rtol)  # B orthonormal: its scale is 1
    return Bs, activation_target(Xs), Q


def specificity(
    B: Tensor,
    X: Tensor,
    clean_pcs: Tensor,
    *,
    rtol: float = DEFAULT_RTOL,
    p_method: PMethod = "beta",
) -> Score:
    """R_act of B after removing the top clean PCs C [d, k_clean] from both samples and basis.

    Everything is expressed in coordinates of the complement Q = complement(C) [d, d'],
    d' = d − k_clean: samples x_i → Qᵀx_i (then renormalised as usual), basis → orth(QᵀB)
    with rank detection (directions of B inside span(C) are dropped), and the null is the
    d'-dimensional one. A basis entirely inside span(C) scores undefined (NaN, k = 0).
    ``clean_pcs`` with zero columns means no removal (plain recovery).

    The claim "r_act_specific > 1" (SPEC §6, claim 4) per layer is ``.r`` with ``.p`` from
    ``p_method="saddlepoint"``: the exact null of a Haar k_s-dim subspace of R^{d'}
    (k_s = rank of orth(QᵀB)) against A'_s = mean_i x̂'_i x̂'_iᵀ, x'_i = Qᵀx_i — so
    p = P(tr(P A'_s) ≥ E_s) by ``nulls.saddlepoint_p_value`` on A'_s's spectrum. This is
    calibrated for the question asked: Qᵀ of a Haar subspace of R^d is Haar in R^{d'}.
    Layer means: ``specificity_summary``.
    """
    Bs, target, _ = _specific_parts(B, X, clean_pcs, rtol)
    if Bs.shape[1] == 0:
        return Score.undefined(k=0, d=target.d)
    return recovery(Bs, target, p_method=p_method)


def specificity_summary(
    bases: Sequence[Tensor | None],
    Xs: Sequence[Tensor],
    clean_pcs: Sequence[Tensor],
    basis_kind: BasisKind = "per_layer",
    *,
    rtol: float = DEFAULT_RTOL,
) -> LayerSummary:
    """Layer mean of r_act_specific with the p-value of "r_act_specific > 1" (SPEC §6, claim 4).

    Per layer l (bases[l] None: skipped): B_s,l, A'_l and R_l as in ``specificity``; undefined
    layers (basis inside the clean PCs) are excluded. mean_r = mean_l R_l.

    per_layer (an independent Haar subspace per layer, as for R_act): the summary null is
    ``summarize_layers(..., "per_layer", p_method="saddlepoint")`` on the complement targets,
    i.e. ``nulls.layer_mean_saddlepoint_p_value`` (needs one d' = d − k_clean at every layer).
    global (one Haar subspace span(G) ⊂ R^d shared by all layers, as the global R_act null):
    each layer sees orth(Q_lᵀG), Haar in its own complement but coupled across layers, and
    p = ``nulls.shared_complement_layer_mean_p_value`` (a chi-square linearisation exact in
    variance per layer, with the cross-layer coupling through one G); null_sd_r from
    Var ≈ 2k·Σ c_i². A global basis whose rank differs between layers' complements (a basis
    direction inside some layer's clean PCs) falls back to the per-layer null
    (p_method "saddlepoint_per_layer_fallback"). One layer: both reduce to
    ``nulls.saddlepoint_p_value`` in the complement.
    """
    if basis_kind not in ("per_layer", "global"):
        raise ValueError(f"basis_kind must be 'per_layer' or 'global', got {basis_kind!r}")
    if not (len(bases) == len(Xs) == len(clean_pcs)):
        raise ValueError(
            f"need one basis, X and clean_pcs per layer, got {len(bases)}, {len(Xs)}, "
            f"{len(clean_pcs)}"
        )
    scores_, targets_, comps = [], [], []
    for B, X, C in zip(bases, Xs, clean_pcs, strict=True):
        if B is None:
            continue
        Bs, t, Q = _specific_parts(B, X, C, rtol)
        if Bs.shape[1] == 0:
            continue
        scores_.append(recovery(Bs, t, p_method="saddlepoint"))
        targets_.append(t)
        comps.append(Q)
    if not scores_:
        nan = math.nan
        return LayerSummary(basis_kind, 0, nan, nan, nan, nan, nan, nan, "none")
    ks = {s.k for s in scores_}
    if basis_kind == "per_layer" or len(scores_) == 1 or len(ks) != 1:
        summ = summarize_layers(scores_, targets_, "per_layer", p_method="saddlepoint")
        if basis_kind == "global" and len(ks) != 1:
            return LayerSummary(basis_kind, summ.n_layers, summ.mean_r, summ.mean_e,
                                summ.null_mean_r, summ.null_sd_r, summ.z, summ.p,
                                "saddlepoint_per_layer_fallback")
        return LayerSummary(basis_kind, summ.n_layers, summ.mean_r, summ.mean_e,
                            summ.null_mean_r, summ.null_sd_r, summ.z, summ.p, summ.p_method)
    k = ks.pop()
    d = int(Xs[0].shape[1])
    eye = torch.eye(d, dtype=torch.float64)
    Qs = [eye if Q is None else Q for Q in comps]
    factors = [t.factor for t in targets_]
    mean_r = float(np.mean([s.r for s in scores_]))
    mean_e = float(np.mean([s.e for s in scores_]))
    w = shared_complement_weights(factors, Qs, k)
    sd_r = math.sqrt(2.0 * k * float(np.sum(w**2)))
    p = shared_complement_layer_mean_p_value(mean_r, factors, Qs, k)
    return LayerSummary(basis_kind, len(scores_), mean_r, mean_e, 1.0, sd_r,
                        _z(mean_r, 1.0, sd_r), p, "saddlepoint_shared")


def bootstrap_r_act_ci(
    B: Tensor, X: Tensor, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of R_act, resampling prompts (rows of X [n, d]) with replacement."""
    return bootstrap_mean_r_act_ci([B], [X], n_boot=n_boot, seed=seed, level=level)


def bootstrap_mean_r_act_ci(
    Bs: Sequence[Tensor],
    Xs: Sequence[Tensor],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the layer-mean R_act, resampling EVAL prompts.

    One basis B_l and label matrix X_l [n, d] per layer, the same n prompts at every layer:
    each replicate draws one set of prompt indices and applies it at every layer, so the CI
    reflects prompt sampling of the layer-averaged score. Vectorised: per-sample energies
    e_li = ‖B_lᵀx̂_li‖² are computed once; draws come from a ``torch.Generator`` seeded
    with ``seed``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if len(Bs) != len(Xs) or not Bs:
        raise ValueError(f"need one basis per label matrix, got {len(Bs)} bases and {len(Xs)} X")
    per_layer = []
    for B, X in zip(Bs, Xs, strict=True):
        target = activation_target(X)
        validate_basis(B, target.d)
        dtype = torch.promote_types(B.dtype, target.factor.dtype)
        e_i = sum_sq64(B.to(dtype).T @ target.factor.to(dtype), dim=0) * (target.m / target.norm2)
        per_layer.append(e_i * (target.d / int(B.shape[1])))  # per-prompt R contributions
    n_set = {int(r.shape[0]) for r in per_layer}
    if len(n_set) != 1:
        raise ValueError(f"every layer needs the same prompts; got sample counts {sorted(n_set)}")
    n = n_set.pop()
    r_i = torch.stack(per_layer).mean(0)  # [n]: layer-mean R per prompt (R is linear in samples)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    r_boot = r_i[idx].mean(dim=1)
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=torch.float64)
    lo, hi = torch.quantile(r_boot, q).tolist()
    return lo, hi


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (step-up FDR), same shape as the input, float64.

    adj_(i) = min_{j ≥ i} p_(j)·m/j, clipped to 1: monotone in the raw order, ≥ raw.
    NaN-aware: NaNs (undefined claims) stay NaN and are not counted in m; the finite ones
    (all entries of an N-d input, as one family) go to ``scipy.stats.false_discovery_control``.
    """
    from scipy.stats import false_discovery_control  # kept local: only this function needs scipy

    p = p_values.detach().cpu().numpy() if isinstance(p_values, Tensor) else np.asarray(p_values)
    flat = p.astype(np.float64).reshape(-1)
    finite = ~np.isnan(flat)
    bad = finite & ((flat < 0) | (flat > 1))
    if bad.any():
        raise ValueError(f"p-values must be in [0, 1] (or NaN); got {flat[bad][:5].tolist()}")
    out = np.full_like(flat, np.nan)
    if finite.any():
        out[finite] = false_discovery_control(flat[finite], method="bh")
    return out.reshape(p.shape)


@dataclass(frozen=True)
class LayerSummary:
    """Layer-averaged recovery: mean R over defined layers and its null (SPEC §4).

    null_mean_r/null_sd_r: moments of the mean R under the null for this basis kind;
    z = (mean_r − null_mean_r)/null_sd_r; p one-sided by ``p_method``. NaN everywhere
    (p_method "none") when no layer is defined.
    """

    basis_kind: str
    n_layers: int
    mean_r: float
    mean_e: float
    null_mean_r: float
    null_sd_r: float
    z: float
    p: float
    p_method: str


def summarize_layers(
    scores: Sequence[Score],
    targets: Sequence[Target | None] | None = None,
    basis_kind: BasisKind = "per_layer",
    *,
    tr_a2_mean: float | None = None,
    p_method: PMethod = "beta",
) -> LayerSummary:
    """Mean R over layers (undefined/NaN layers excluded) with its null z and p.

    per_layer: an independent random subspace per layer, so Var(mean R) = Σ_l Var(R_l)/L².
      Beta p: S = mean R / c with c = max_l d/k_l lies in [0, 1] (= mean E when all k are
      equal); a Beta is matched to S's null moments. Saddlepoint p:
      ``nulls.layer_mean_saddlepoint_p_value`` on the layers' spectra (needs ``targets``).
    global: one random subspace shared by all layers, so mean_l E_l = tr(BᵀĀB) with
      Ā = mean_l A_l, and the single-subspace null applies with tr(Ā²) (from ``targets``
      or ``tr_a2_mean``; the saddlepoint uses Ā's spectrum, so it needs ``targets``).
      Requires equal k and d across layers.
    """
    if basis_kind not in ("per_layer", "global"):
        raise ValueError(f"basis_kind must be 'per_layer' or 'global', got {basis_kind!r}")
    if p_method not in ("beta", "saddlepoint"):
        raise ValueError(f"p_method must be 'beta' or 'saddlepoint', got {p_method!r}")
    if p_method == "saddlepoint" and targets is None:
        raise ValueError("p_method='saddlepoint' needs the per-layer targets (their spectra)")
    scores = list(scores)
    if targets is not None:
        targets = list(targets)
        if len(targets) != len(scores):
            raise ValueError(
                f"got {len(scores)} scores but {len(targets)} targets; pass one target per layer"
            )
        for l, (s, t) in enumerate(zip(scores, targets, strict=True)):
            _check_target(t)
            if s.defined != (t is not None):
                raise ValueError(
                    f"layer {l}: score is {'defined' if s.defined else 'undefined'} but target is "
                    f"{'None' if t is None else 'present'}; pass the targets the scores came from"
                )
    defined = [l for l, s in enumerate(scores) if s.defined]
    L = len(defined)
    if L == 0:
        nan = math.nan
        return LayerSummary(basis_kind, 0, nan, nan, nan, nan, nan, nan, "none")
    used = [scores[l] for l in defined]
    mean_r = float(np.mean([s.r for s in used]))
    mean_e = float(np.mean([s.e for s in used]))

    if basis_kind == "per_layer":
        null_mean_r = float(np.mean([s.null_mean_r for s in used]))
        var_r = float(np.sum([s.null_sd_r**2 for s in used])) / L**2
        if p_method == "saddlepoint":
            d = used[0].d
            if any(s.d != d for s in used):
                raise ValueError("layers live in different d; a layer mean needs one width")
            spectra = [targets[l].spectrum for l in defined]
            p = layer_mean_saddlepoint_p_value(mean_r, spectra, [s.k for s in used], d)
        else:
            c = max(s.d / s.k for s in used)  # weights d/(k_l c) ≤ 1 keep S = mean R/c in [0, 1]
            p = beta_p_value(mean_r / c, null_mean_r / c, var_r / c**2)
    else:
        ks, ds = {s.k for s in used}, {s.d for s in used}
        if len(ks) != 1 or len(ds) != 1:
            raise ValueError(
                "a global basis has one rank and d at every layer; "
                f"got k={sorted(ks)}, d={sorted(ds)}"
            )
        k, d = ks.pop(), ds.pop()
        if tr_a2_mean is None:
            if targets is None:
                raise ValueError(
                    "basis_kind='global' needs the per-layer targets (or tr_a2_mean) to form Ā"
                )
            tr_a2_mean = mean_tr_a2([targets[l] for l in defined])
        mean_e0, var_e0 = null_moments(1.0, tr_a2_mean, k, d)
        null_mean_r, var_r = mean_e0 * d / k, var_e0 * (d / k) ** 2
        if p_method == "saddlepoint":
            p = saddlepoint_p_value(mean_e, mean_spectrum([targets[l] for l in defined]), k, d)
        else:
            p = beta_p_value(mean_e, mean_e0, var_e0)
    sd_r = math.sqrt(var_r)
    z = _z(mean_r, null_mean_r, sd_r)
    return LayerSummary(basis_kind, L, mean_r, mean_e, null_mean_r, sd_r, z, p, p_method)


def joint_score(r_act: float, r_w: float) -> float:
    """joint = geometric mean √(R_act · R_w_combined); NaN if either is NaN."""
    if math.isnan(r_act) or math.isnan(r_w):
        return math.nan
    if r_act < 0 or r_w < 0:
        raise ValueError(f"R values are non-negative; got r_act={r_act}, r_w={r_w}")
    return math.sqrt(r_act * r_w)


def act_w_gap_log2(r_act: float, r_w: float) -> float:
    """log2(R_act / R_w_combined); NaN if either is NaN or both are 0, ±inf if one is 0."""
    if math.isnan(r_act) or math.isnan(r_w) or (r_act == 0 and r_w == 0):
        return math.nan
    if r_w == 0:
        return math.inf
    if r_act == 0:
        return -math.inf
    return math.log2(r_act / r_w)
