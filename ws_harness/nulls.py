"""Random-subspace nulls for E = tr(BᵀAB) (SPEC §4): exact moments, p-values, sampled nulls."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import optimize, stats
from torch import Tensor

from .linalg import numerical_rank

__all__ = [
    "null_moments",
    "beta_p_value",
    "saddlepoint_p_value",
    "layer_mean_saddlepoint_p_value",
    "haar_bases",
    "monte_carlo_null",
    "mc_p_value",
    "structured_null",
    "sum_sq64",
    "DEFAULT_MC_SAMPLES",
    "DEFAULT_STRUCTURED_SAMPLES",
]

DEFAULT_MC_SAMPLES = 120  # what the original research drew per (layer, rank, tensor)
DEFAULT_STRUCTURED_SAMPLES = 256

# Cap on floats per batched random draw, so Monte Carlo memory stays bounded for large d, k, n.
_CHUNK_FLOATS = 1 << 24

# Below this, a null variance is a point mass up to float64 rounding of tr(A²) − tr(A)²/d.
_VAR_EPS = 1e-15
# ‖A − tr(A)·I/d‖_F² = tr(A²) − tr(A)²/d below this (× tr(A)²) is float32 rounding of an
# isotropic A (~1e-14): the null is then a point mass, and z, p must not read noise.
_ISOTROPIC_SPREAD = 1e-12


def _check_k_d(k: int, d: int) -> None:
    for name, v in (("k", k), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    if not 0 <= k <= d:
        raise ValueError(
            f"k must be in [0, d={d}], got k={k}; a k-dim subspace of R^d needs k <= d"
        )


def null_moments(tr_a: float, tr_a2: float, k: int, d: int) -> tuple[float, float]:
    """Exact (mean, var) of E = tr(PA), P projecting onto a Haar-uniform k-dim subspace of R^d.

    E[tr(PA)] = k·tr(A)/d and
    Var[tr(PA)] = 2k(d−k) / (d(d−1)(d+2)) · (tr(A²) − tr(A)²/d), in float64.
    k = 0, k = d (and d = 1) give var = 0: every subspace scores the same; so does an
    isotropic A (tr(A²) − tr(A)²/d ≤ 1e-12·tr(A)², i.e. float rounding of A = I/d).
    """
    _check_k_d(k, d)
    tr_a, tr_a2 = float(tr_a), float(tr_a2)
    if not (math.isfinite(tr_a) and math.isfinite(tr_a2)):
        raise ValueError(f"tr_a={tr_a}, tr_a2={tr_a2} must be finite")
    mean = k * tr_a / d
    if k == 0 or k == d:
        return mean, 0.0
    spread = tr_a2 - tr_a * tr_a / d  # = ‖A − tr(A)·I/d‖_F² ≥ 0
    if spread <= _ISOTROPIC_SPREAD * tr_a * tr_a:
        return mean, 0.0
    var = 2.0 * k * (d - k) / (d * (d - 1.0) * (d + 2.0)) * spread
    return mean, var


def beta_p_value(e_obs: float, mean: float, var: float) -> float:
    """One-sided p = P(E ≥ e_obs) from a Beta on [0, 1] moment-matched to (mean, var).

    Beta(a, b) with a = μν, b = (1−μ)ν, ν = μ(1−μ)/var − 1. For a rank-1 target the null
    is exactly Beta(k/2, (d−k)/2), so the match is exact there.

    Degenerate nulls (var ≈ 0: k = d, k = 0, or isotropic A = I/d) are point masses at
    ``mean``: every subspace scores the same, so there is no evidence either way and
    p = 1 when e_obs ≤ mean (+1e-5 for float32 rounding); an e_obs above a point-mass null
    is impossible for a valid basis and gets p = 0. NaN e_obs gives NaN.
    """
    e_obs, mean, var = float(e_obs), float(mean), float(var)
    if math.isnan(e_obs):
        return math.nan
    if not (0.0 <= mean <= 1.0) or not math.isfinite(var) or var < 0.0:
        raise ValueError(f"null mean={mean} must be in [0, 1] and var={var} finite and >= 0")
    max_var = mean * (1.0 - mean)  # the largest variance any distribution on [0, 1] can have
    if var <= _VAR_EPS or max_var <= _VAR_EPS:
        return 1.0 if e_obs <= mean + 1e-5 else 0.0
    # A valid null always has var < μ(1−μ); clamp so rounding cannot make ν ≤ 0.
    nu = max_var / min(var, max_var * (1.0 - 1e-12)) - 1.0
    return float(stats.beta.sf(e_obs, mean * nu, (1.0 - mean) * nu))


def _quadform_tail(w: np.ndarray, nu: np.ndarray, upper: bool, x: float = 0.0) -> float:
    """P(Q ≥ x) (``upper``) or P(Q ≤ x) for Q = Σ_i w_i χ²_{ν_i}, by the Lugannani–Rice saddlepoint.

    CGF K(t) = −½ Σ ν_i log(1 − 2 w_i t) on (1/(2 w_min), 1/(2 w_max)); the saddle t̂ solves
    K'(t̂) = x, ŵ = sign(t̂)√(2(t̂x − K(t̂))), û = t̂√K''(t̂), and
    P(Q ≥ x) ≈ Φ̄(ŵ) + φ(ŵ)(1/û − 1/ŵ). Weights of one sign are only handled at x = 0.
    """
    # Q of one sign has a trivial tail at 0 (Q ≡ 0 lies in both tails).
    if w.min() >= 0.0 or w.max() <= 0.0:
        if x != 0.0:
            raise ValueError("_quadform_tail needs weights of both signs when x != 0")
        if w.min() >= 0.0:
            return 1.0 if upper else float(w.max() <= 0.0)
        return 0.0 if upper else 1.0

    def k0(t: float) -> float:
        return -0.5 * float(np.sum(nu * np.log1p(-2.0 * w * t)))

    def k1(t: float) -> float:
        return float(np.sum(nu * w / (1.0 - 2.0 * w * t)))

    def k2(t: float) -> float:
        return float(np.sum(2.0 * nu * w * w / (1.0 - 2.0 * w * t) ** 2))

    def limit_at_mean() -> float:
        # LR is 0/0 when the saddle is at t = 0; its limit is ½ − κ₃/(6√(2π)κ₂^{3/2}).
        k3 = float(np.sum(8.0 * nu * w**3))
        p_up = 0.5 - k3 / (6.0 * math.sqrt(2.0 * math.pi) * k2(0.0) ** 1.5)
        return p_up if upper else 1.0 - p_up

    if abs(k1(0.0) - x) < 1e-9 * math.sqrt(k2(0.0)):
        return limit_at_mean()
    lo, hi = 1.0 / (2.0 * float(w.min())), 1.0 / (2.0 * float(w.max()))
    for eps in (1e-10, 1e-13, 1e-15):  # K' runs from −∞ to +∞ between the poles
        a, b = lo * (1.0 - eps), hi * (1.0 - eps)
        if k1(a) < x < k1(b):
            t = optimize.brentq(lambda t: k1(t) - x, a, b, xtol=1e-300, rtol=1e-13, maxiter=500)
            break
    else:  # saddle pressed against a pole (extreme tail): evaluate at the nearest end
        t = b if k1(b) <= x else a
    w_hat = math.copysign(math.sqrt(max(2.0 * (t * x - k0(t)), 0.0)), t)
    u_hat = t * math.sqrt(k2(t))
    if abs(w_hat) < 1e-5:  # 1/û − 1/ŵ cancels catastrophically this close to the mean
        return limit_at_mean()
    corr = stats.norm.pdf(w_hat) * (1.0 / u_hat - 1.0 / w_hat)
    p = stats.norm.sf(w_hat) + corr if upper else stats.norm.cdf(w_hat) - corr
    return float(min(max(p, 0.0), 1.0))


def saddlepoint_p_value(e_obs: float, spectrum: np.ndarray | Tensor, k: int, d: int) -> float:
    """One-sided p = P(E ≥ e_obs) from A's eigenvalues (tr A = 1) by a quadratic-form saddlepoint.

    Why: the moment-matched Beta has the right mean and variance but too light a right tail
    when A has one dominant eigenvalue (steering labels share a direction): at α = 0.01,
    Haar-random bases are rejected 1.4–3 % of the time (d = 576, k = 8: 1.4 %; at
    α = 0.001: 0.24 %). This method takes the tail's shape from the whole spectrum.

    Method: with span(G) uniform for Gaussian G [d, k], E ≈ Ẽ = k·tr(GᵀAG)/tr(GᵀG) (equal
    in law at k = 1), and Ẽ ≥ e ⟺ Σ_i (λ_i − e/k)·χ²_k,i ≥ 0 — a weighted chi-square tail
    at 0 (zero eigenvalues included), evaluated by Lugannani–Rice. e_obs is first
    standardised from Var E (exact) to Var Ẽ = 2k²(tr A² − 1/d)/(d(dk + 2)). For k > d/2
    the complement is used (E = 1 − E⊥, E⊥ of rank d − k, lower tail), and rank-1 A uses
    the Beta, which is exact there (Beta(k/2, (d − k)/2)). Degenerate nulls as in
    ``beta_p_value``. Validated in the regime k ≤ d/4; it is conservative for k ≈ d/2.
    """
    _check_k_d(k, d)
    e_obs = float(e_obs)
    if math.isnan(e_obs):
        return math.nan
    lam = np.asarray(spectrum.detach().cpu() if isinstance(spectrum, Tensor) else spectrum, float)
    lam = np.sort(np.clip(lam.reshape(-1), 0.0, None))[::-1]
    if lam.size > d:
        raise ValueError(f"spectrum has {lam.size} eigenvalues but d={d}; pass A's eigenvalues")
    if abs(lam.sum() - 1.0) > 1e-4:
        raise ValueError(f"eigenvalues sum to {lam.sum():.6g}, expected tr A = 1; normalise A")
    tr_a2 = float(np.sum(lam**2))
    mean, var = null_moments(1.0, tr_a2, k, d)
    if var <= _VAR_EPS or lam.size < 2 or lam[1] <= 1e-12 * lam[0]:
        return beta_p_value(e_obs, mean, var)  # point mass, or rank-1 A where the Beta is exact
    upper = 2 * k <= d
    kk, x = (k, e_obs) if upper else (d - k, 1.0 - e_obs)  # P(E ≥ e) = P(E⊥ ≤ 1 − e)
    mean_kk = kk / d
    var_t = 2.0 * kk * kk * (tr_a2 - 1.0 / d) / (d * (d * kk + 2.0))
    c = (mean_kk + (x - mean_kk) * math.sqrt(var_t / var)) / kk
    pos = lam[lam > 0.0]
    w, nu = pos - c, np.full(pos.size, float(kk))
    n_zero = d - pos.size
    if n_zero:  # A's null space: one weight −c carrying k·(d − rank) degrees of freedom
        w, nu = np.append(w, -c), np.append(nu, float(kk * n_zero))
    return _quadform_tail(w, nu, upper)


def layer_mean_saddlepoint_p_value(
    r_mean_obs: float, spectra: Sequence[np.ndarray | Tensor], ks: Sequence[int], d: int
) -> float:
    """P(mean_l R_l ≥ r_mean_obs) for an independent uniform subspace per layer (per-layer bases).

    Each layer is linearised (P ≈ GGᵀ/d for Gaussian G [d, k_l]):
    E_l − k_l/d ≈ (s_l/d)·Σ_i (λ_li − 1/d)·χ²_{k_l}, where s_l² = d(d−k_l)/((d−1)(d+2))
    makes the variance exact. The layer mean of R_l = (d/k_l)·E_l is then one weighted
    chi-square sum whose tail above r_mean_obs − 1 comes from the Lugannani–Rice
    saddlepoint. One layer reduces to ``saddlepoint_p_value``. Mildly conservative where
    k/d is not small; never anti-conservative in the invariants' checks.
    """
    if len(spectra) != len(ks) or not ks:
        raise ValueError(f"need one spectrum per layer rank, got {len(spectra)} and {len(ks)}")
    r_mean_obs = float(r_mean_obs)
    if math.isnan(r_mean_obs):
        return math.nan
    L = len(ks)
    if L == 1:
        return saddlepoint_p_value(r_mean_obs * ks[0] / d, spectra[0], ks[0], d)
    ws, nus = [], []
    for spectrum, k in zip(spectra, ks, strict=True):
        _check_k_d(k, d)
        lam = np.asarray(
            spectrum.detach().cpu() if isinstance(spectrum, Tensor) else spectrum, float
        )
        lam = np.clip(lam.reshape(-1), 0.0, None)
        if lam.size > d or abs(lam.sum() - 1.0) > 1e-4:
            raise ValueError(f"each spectrum needs <= d={d} eigenvalues summing to 1 (tr A = 1)")
        if null_moments(1.0, float(np.sum(lam**2)), k, d)[1] == 0.0:
            continue  # point-mass layer (k = d or isotropic A): adds no randomness
        s = math.sqrt(d * (d - k) / ((d - 1.0) * (d + 2.0)))
        pos = lam[lam > 0.0]
        beta = np.append(pos - 1.0 / d, -1.0 / d)  # last entry: A's null space
        nu = np.append(np.full(pos.size, float(k)), float(k * (d - pos.size)))
        ws.append(s * beta / (L * k))
        nus.append(nu)
    if not ws:  # every layer's null is a point mass: no evidence either way
        return 1.0 if r_mean_obs <= 1.0 + 1e-5 else 0.0
    w, nu = np.concatenate(ws), np.concatenate(nus)
    keep = nu > 0  # a full-rank A has no null-space block
    return _quadform_tail(w[keep], nu[keep], upper=True, x=r_mean_obs - 1.0)


def _generator(generator: torch.Generator | int) -> torch.Generator:
    """An explicit generator; an int seeds a fresh CPU generator (reproducible, unlike hash())."""
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, (int, np.integer)):
        raise TypeError(
            f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}"
        )
    return torch.Generator().manual_seed(int(generator))


def _check_factor(factor: Tensor) -> Tensor:
    if not isinstance(factor, Tensor):
        raise TypeError(f"factor must be a torch.Tensor [d, m], got {type(factor).__name__}")
    if factor.ndim != 2:
        raise ValueError(f"factor must be 2-D [d, m] (A = F Fᵀ), got shape {tuple(factor.shape)}")
    if not factor.is_floating_point():
        raise TypeError(f"factor must be floating, got {factor.dtype}")
    return factor


def _chunks(n: int, per_item: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_FLOATS // max(per_item, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def haar_bases(
    d: int,
    k: int,
    n: int,
    generator: torch.Generator | int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """n Haar-uniform orthonormal bases [n, d, k]: batched QR of Gaussian matrices.

    The column span of a Gaussian d×k matrix is uniform on the Grassmannian, whatever the
    sign convention of the QR, so Q's span is a uniform random k-dim subspace.
    """
    _check_k_d(k, d)
    g = _generator(generator)
    G = torch.randn((n, d, k), generator=g, dtype=dtype, device=g.device)
    Q, _ = torch.linalg.qr(G.to(device) if device is not None else G)
    return Q


def sum_sq64(t: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """Σ t² over ``dim``, accumulated in float64 (float32 on MPS, which lacks it); float64 CPU."""
    if t.device.type == "mps":
        return t.square().sum(dim=dim).to("cpu", torch.float64)
    return t.square().sum(dim=dim, dtype=torch.float64).cpu()


def _energies(factor: Tensor, draw, n: int, per_item: int) -> Tensor:
    """E = ‖QᵀF‖_F²/‖F‖_F² for n bases Q from ``draw(n_chunk)`` → float64 CPU [n].

    Dividing by ‖F‖_F² (float64) makes tr A exactly 1 even for a float32 factor.
    """
    norm2 = float(sum_sq64(factor, dim=(0, 1)))
    if norm2 == 0.0:
        raise ValueError("factor is all-zero: there is no target A to score against")
    out = [torch.zeros(0, dtype=torch.float64)]
    for lo, hi in _chunks(n, per_item):
        Q = draw(hi - lo).to(device=factor.device, dtype=factor.dtype)
        out.append(sum_sq64(Q.transpose(1, 2) @ factor, dim=(1, 2)))  # [n, k, m] → [n]
    return torch.cat(out) / norm2


def monte_carlo_null(
    factor: Tensor,
    k: int,
    n_samples: int = DEFAULT_MC_SAMPLES,
    generator: torch.Generator | int = 0,
) -> Tensor:
    """Samples of E = tr(QᵀAQ) over Haar-uniform k-dim subspaces Q; A = FFᵀ/‖F‖_F², F [d, m].

    Returns a float64 CPU tensor [n_samples] so callers can take mean/sd or a
    (b+1)/(m+1) p-value (``mc_p_value``). Draws come from ``generator`` (an int is a seed),
    in chunks to bound memory; the factor's device and dtype are used for the products.
    """
    factor = _check_factor(factor)
    d, m = factor.shape
    _check_k_d(k, d)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    g = _generator(generator)

    def draw(n: int) -> Tensor:
        return haar_bases(d, k, n, g, dtype=factor.dtype, device=factor.device)

    return _energies(factor, draw, n_samples, per_item=d * k + k * m)


def mc_p_value(samples: Tensor, e_obs: float) -> float:
    """MC one-sided p = (b + 1)/(m + 1), b = #{samples ≥ e_obs}; never 0, valid at any m."""
    if not isinstance(samples, Tensor):
        samples = torch.as_tensor(samples)
    samples = samples.reshape(-1)
    if samples.numel() == 0:
        raise ValueError("mc_p_value needs at least one null sample")
    if math.isnan(float(e_obs)):
        return math.nan
    b = int((samples.to(torch.float64) >= float(e_obs)).sum())
    return (b + 1) / (samples.numel() + 1)


def structured_null(
    W: Tensor,
    factor: Tensor,
    k: int,
    n_samples: int = DEFAULT_STRUCTURED_SAMPLES,
    generator: torch.Generator | int = 0,
) -> Tensor:
    """Samples of E over random subspaces orth(W·G), G Gaussian [m, k]: a null shaped like W.

    The critique it answers: "R_w < 1 for write-side bases may just mean the diff lives in
    the span of the weights". For these models the base write matrix W = [W_o | W_down]
    (d × (d + d_ff)) has full row rank, so a *uniformly* random subspace of its column
    space is just a uniform subspace of R^d: the ordinary null. Instead the columns of W·G
    are N(0, WWᵀ): random directions distributed like W's own spectrum, so a basis that
    merely follows where the layer writes strongly scores ≈ 1 against this null
    (R_struct = E / mean_struct). When W has rank r < d the draws stay inside col(W).

    Returns float64 CPU samples [n_samples] (default 256) from the explicit ``generator``.
    Raises ValueError if rank(W) < k (orth(WG) would not be k-dimensional).
    """
    factor = _check_factor(factor)
    if not isinstance(W, Tensor):
        raise TypeError(f"W must be a torch.Tensor [d, m], got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D [d, m] = [W_o | W_down], got shape {tuple(W.shape)}")
    d, m = factor.shape
    if W.shape[0] != d:
        raise ValueError(
            f"W has {W.shape[0]} rows, expected d={d} "
            "(its columns must live in the residual stream)"
        )
    _check_k_d(k, d)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rank = numerical_rank(W)
    if rank < k:
        raise ValueError(f"W has rank {rank} < k={k}; a structured null needs k <= rank(W)")
    g = _generator(generator)
    Wf = W.to(device=factor.device, dtype=factor.dtype)
    # Normalise W's scale: orth(WG) ignores it, but it keeps float32 products well-ranged.
    Wf = Wf / Wf.norm()
    mw = W.shape[1]

    def draw(n: int) -> Tensor:
        G = torch.randn((n, mw, k), generator=g, dtype=factor.dtype, device=g.device).to(
            factor.device
        )
        return torch.linalg.qr(Wf @ G)[0]

    return _energies(factor, draw, n_samples, per_item=mw * k + d * k + k * m)
