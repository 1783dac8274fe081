"""Basis constructions that several hypotheses share (read/write grams, projectors, k-means, Procrustes).

Read side (SPEC §5): q, k, v, gate and up read γ ⊙ x/rms(x), lm_head reads through the final
norm, so every read matrix here is used in residual coordinates, W·diag(γ)
(``LayerWeights.read``, ``FitContext.unembedding_read``). The original research used the raw
W; the write side ([W_o | W_down]) has no norm in front of the residual and is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ws_harness.hypothesis import FitContext
from ws_harness.linalg import (
    chance_cosine,
    left_basis,
    numerical_rank,
    orthonormalize,
    pca_basis,
    project_out,
    right_basis,
    shared_directions,
)

__all__ = [
    "gram_basis",
    "read_matrix",
    "read_basis",
    "read_gram",
    "unembedding_gram",
    "lm_head_read",
    "logits_null",
    "global_read",
    "downstream_read",
    "all_layers_write_gram",
    "write_not",
    "input_super",
    "kv_super",
    "qk_circuit",
    "kmeans_centroids",
    "chars_clusters",
    "qk_chars_shared",
    "procrustes_skew_basis",
    "attention_weighted_diffs",
    "abs_changes",
]


def gram_basis(G: torch.Tensor, k: int, rtol: float = 1e-5) -> torch.Tensor:
    """Top-k eigenvectors of a symmetric PSD d×d matrix G (rank-detected), float32 [d, r]."""
    evals, evecs = torch.linalg.eigh(G.double())
    evals, evecs = evals.flip(0), evecs.flip(1)
    keep = int((evals > rtol * evals[0].clamp_min(1e-300)).sum()) if evals[0] > 0 else 0
    return evecs[:, : min(k, keep)].float().contiguous()


READ_ALL = ("q", "k", "v", "up", "gate")  # everything a layer reads


def read_matrix(fit: FitContext, layer: int, roles: Sequence[str]) -> Tensor:
    """[W_r·diag(γ_r)] stacked over `roles` (rows): the layer's reads in residual coordinates."""
    w = fit.weights(layer)
    return torch.cat([w.read(r) for r in roles], dim=0)


def read_basis(fit: FitContext, layer: int, roles: Sequence[str], k: int) -> Tensor:
    """Top-k right SVs of the γ-folded stacked read matrices of `roles` (e.g. ('q', 'k', 'v'))."""
    return right_basis(read_matrix(fit, layer, roles), k)


def read_gram(fit: FitContext, layer: int) -> Tensor:
    """Σ_r diag(γ_r) W_rᵀ W_r diag(γ_r) over r ∈ {q, k, v, up, gate}: one layer's reads, d×d float64."""
    w = fit.weights(layer)
    return sum((m := w.read(r).double()).T @ m for r in READ_ALL)


def unembedding_gram(fit: FitContext) -> Tensor:
    """diag(γ_f) W_Uᵀ W_U diag(γ_f) (γ_f: final norm), d×d float64."""

    def build() -> Tensor:
        W = fit.unembedding.double()
        g = fit.final_norm.double()
        return g[:, None] * (W.T @ W) * g[None, :]

    return fit.memo(("unembedding_gram",), build)


def lm_head_read(fit: FitContext, k: int) -> Tensor:
    """Top-k right SVs of W_U·diag(γ_final): the residual directions the logits read most."""
    return fit.memo(("lm_head_read", k), lambda: gram_basis(unembedding_gram(fit), k))


def logits_null(fit: FitContext, k: int) -> Tensor:
    """Bottom-k right SVs of W_U·diag(γ_final): the residual directions the logits read least."""
    if not 0 < k <= fit.d:
        raise ValueError(f"k={k} must be in 1..d={fit.d}")
    _, evecs = torch.linalg.eigh(unembedding_gram(fit))  # ascending; null space first
    return evecs[:, :k].float().contiguous()


def global_read(fit: FitContext, k: int) -> Tensor:
    """Top-k eigenvectors of Σ_l read_gram(l) + unembedding_gram (all γ-folded): what the model reads most."""

    def build() -> torch.Tensor:
        total = sum(read_gram(fit, l) for l in fit.layers) + unembedding_gram(fit)
        return gram_basis(total, k)

    return fit.memo(("global_read", k), build)


def downstream_read(fit: FitContext, layer: int, k: int) -> torch.Tensor:
    """Top-k eigenvectors of W_UᵀW_U + Σ_{l' > layer} read_gram(l'): what is read after `layer`."""

    def suffix_grams() -> list[torch.Tensor]:
        # suffix[l] = Σ_{l' > l} read_gram(l'), built back to front once.
        out = [torch.zeros(fit.d, fit.d, dtype=torch.float64)] * fit.n_layers
        running = torch.zeros(fit.d, fit.d, dtype=torch.float64)
        for l in reversed(fit.layers):
            out[l] = running.clone()
            running = running + read_gram(fit, l)
        return out

    suffix = fit.memo(("read_suffix",), suffix_grams)
    return fit.memo(("downstream_read", layer, k),
                 lambda: gram_basis(suffix[layer] + unembedding_gram(fit), k))


def all_layers_write_gram(fit: FitContext) -> torch.Tensor:
    """Σ_l [W_o|W_down][W_o|W_down]ᵀ: its eigenvectors are the left SVs of all layers side by side."""

    def build() -> torch.Tensor:
        return sum((w := fit.weights(l).write.double()) @ w.T for l in fit.layers)

    return fit.memo(("write_gram",), build)


def write_not(fit: FitContext, layer: int, removed: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k left SVs of (I − P)[W_o | W_down], P the projector onto `removed` (orthonormal)."""
    return left_basis(project_out(fit.weights(layer).write, removed), k)


def input_super(fit: FitContext, layer: int, k: int) -> Tensor:
    """Top-k right SVs of [W_q; W_k; W_v; W_up; W_gate] (γ-folded): everything the layer reads."""
    return read_basis(fit, layer, ("q", "k", "v", "up", "gate"), k)


def kv_super(fit: FitContext, layer: int, k: int) -> Tensor:
    """Top-k right SVs of [W_k; W_v] (γ-folded): what attention reads into keys and values."""
    return read_basis(fit, layer, ("k", "v"), k)


def qk_circuit(fit: FitContext, layer: int, k: int) -> Tensor:
    """Top-k left SVs of diag(γ)W_qᵀ·expand(W_k)diag(γ) = Σ_h (W_q^h D)ᵀ W_k^{g(h)} D, D = diag(γ_attn).

    Query and key both read the attention-normed residual, so the bilinear score form in
    residual coordinates carries γ on both sides; each query head pairs with its own KV head.
    """
    w = fit.weights(layer)
    return left_basis(w.read("q").T @ fit.expand_kv(w.read("k")), k)


def kmeans_centroids(X: torch.Tensor, n_clusters: int, iters: int = 50) -> torch.Tensor:
    """Lloyd's k-means with deterministic farthest-point initialisation → centroids [c, d].

    Init: the point farthest from the mean, then repeatedly the point farthest from the chosen
    centroids (no randomness, so no seed). Empty clusters keep their previous centroid.
    """
    X = X.double()
    n_clusters = min(n_clusters, X.shape[0])
    chosen = [int(torch.linalg.vector_norm(X - X.mean(0), dim=1).argmax())]
    while len(chosen) < n_clusters:
        dist = torch.cdist(X, X[chosen]).min(dim=1).values
        chosen.append(int(dist.argmax()))
    centroids = X[chosen].clone()
    for _ in range(iters):
        assign = torch.cdist(X, centroids).argmin(dim=1)
        new = centroids.clone()
        for c in range(n_clusters):
            members = X[assign == c]
            if len(members):
                new[c] = members.mean(0)
        if torch.allclose(new, centroids):
            break
        centroids = new
    return centroids.float()


def chars_clusters(fit: FitContext, layer: int, k: int) -> torch.Tensor:
    """PCA of the k k-means centroids of clean ∪ positive ∪ negative residuals (rank ≤ k − 1)."""
    X = torch.cat([fit.clean.resid[layer], fit.positive.resid[layer], fit.negative.resid[layer]])
    return pca_basis(kmeans_centroids(X, k), k)


def qk_chars_shared(fit: FitContext, layer: int, k: int) -> tuple[Tensor, Tensor]:
    """Directions qk_circuit and chars_clusters share beyond chance, and their cosines.

    Principal-vector bisectors of the two rank-≤k bases, ordered by cosine (all pairs, as the
    original), keeping those whose cosine exceeds ``chance_cosine`` (the 99th percentile of the
    largest principal cosine between two Haar-random subspaces of the same ranks in R^d), so
    nearly orthogonal pairs are not called "shared". Returns (basis [d, s], cosines [s]).
    """
    qk, cc = qk_circuit(fit, layer, k), chars_clusters(fit, layer, k)
    return shared_directions(qk, cc, min_cos=chance_cosine(fit.d, qk.shape[1], cc.shape[1]))


def _polar(M: Tensor) -> Tensor:
    """Orthogonal polar factor UVᵀ of M = UΣVᵀ: argmax_{RᵀR=I} tr(RᵀM) (orthogonal Procrustes)."""
    U, _, Vh = torch.linalg.svd(M)
    return U @ Vh


def _skew_pairs(R: Tensor) -> tuple[Tensor, Tensor]:
    """Singular vectors and values (descending) of R − Rᵀ; for a rotation they come in equal
    pairs 2·sin θ_j, each pair spanning rotation plane j."""
    U, s, _ = torch.linalg.svd(R - R.T)
    return U, s


# Rotations smaller than this (radians) are rounding, not rotation, whatever the noise model.
MIN_ROTATION_ANGLE = 1e-3
ROTATION_NULL_DRAWS = 64  # parametric null draws; the threshold is their maximum (≈ 98.5%)


def procrustes_skew_basis(
    neg: Tensor, pos: Tensor, k: int, inner: int = 32, null_draws: int = ROTATION_NULL_DRAWS,
) -> Tensor:
    """Planes of the rotation that best maps neg onto pos, inside their joint top PCA [d, 2p].

    1. Center each set on its *own* mean (as the original; a shared mean would leak the
       persona mean shift into the rotation).
    2. Joint PCA of the two centered sets, m = min(inner, n − 1) directions, shrunk until the
       m×m cross-covariance M = X_negᵀX_pos has full rank: beyond its rank R = UVᵀ is an
       arbitrary completion from LAPACK, not something the data says.
    3. R = polar(M) (orthogonal Procrustes). Its skew part R − Rᵀ has singular values
       2 sin θ_j in equal pairs, one pair per rotation plane; whole pairs are kept, largest first.
    4. Noise level: with the residual σ² of X_neg R ≈ X_pos (dof-corrected), the same fit on
       `null_draws` simulated pairs X_pos* = X_neg + noise (no rotation; fixed seed) gives the
       largest skew singular value noise alone produces; only pairs above it (and above
       2 sin MIN_ROTATION_ANGLE) are returned. No rotation in the data → (almost) nothing.
    Rank ≤ min(k rounded down to even, 2 · #real planes); shape [d, 0] when none is real.
    """
    if neg.ndim != 2 or neg.shape != pos.shape:
        raise ValueError(
            f"neg and pos must be paired [n, d] matrices of one shape, got {tuple(neg.shape)} "
            f"and {tuple(pos.shape)}"
        )
    n, d = neg.shape
    empty = torch.zeros(d, 0)
    if n < 3 or k < 2:
        return empty
    Xn = neg.double() - neg.double().mean(0)
    Xp = pos.double() - pos.double().mean(0)
    P = right_basis(torch.cat([Xn, Xp]), min(inner, n - 1)).double()  # [d, m]
    while True:  # restrict to what the cross-covariance determines
        A, Bp = Xn @ P, Xp @ P
        M = A.T @ Bp
        r = numerical_rank(M)
        if r >= P.shape[1]:
            break
        P = P[:, :r]
    m = P.shape[1]
    if m < 2:
        return empty
    R = _polar(M)
    Us, s = _skew_pairs(R)
    # Noise level of the fit: residual variance per coordinate, minus the rotation's dof.
    dof = (n - 1) * m - m * (m - 1) // 2
    sigma = float(torch.linalg.matrix_norm(A @ R - Bp)) / dof**0.5
    gen = torch.Generator().manual_seed(0)
    null_top = 0.0
    for _ in range(null_draws):
        E = torch.randn(n, m, generator=gen, dtype=torch.float64) * sigma
        E = E - E.mean(0)
        null_top = max(null_top, float(_skew_pairs(_polar(A.T @ (A + E)))[1][0]))
    floor = max(null_top, 2.0 * torch.sin(torch.tensor(MIN_ROTATION_ANGLE)).item())
    pair_values = s[0 : 2 * (m // 2) : 2]
    n_pairs = min(k // 2, int((pair_values > floor).sum()))
    if n_pairs == 0:
        return empty
    return orthonormalize((P @ Us[:, : 2 * n_pairs]).float(), atol=0.5)


def attention_weighted_diffs(
    fit: FitContext, layer: int, mode: str, times_diffnorm: bool = False
) -> torch.Tensor:
    """Token-level persona differences, rows weighted by the two personas' last-token attention.

    Sequences are right-aligned (left padding), so position t is "t tokens before the end" in
    both personas; only positions real under both personas are used. Row weight:
    √min(a⁺, a⁻), √max(a⁺, a⁻) or √|a⁺ − a⁻| for mode 'min' / 'max' / 'diff' (a = attention of
    the last token to that position, mean over heads); with `times_diffnorm` the square root
    is taken of the product, √(a · ‖row‖ / mean nonzero ‖row‖), as in the original.
    Returns the weighted rows [N, d] (zero-weight rows dropped).
    """
    pos, neg = fit.tokens("positive"), fit.tokens("negative")
    width = min(pos["mask"].shape[1], neg["mask"].shape[1])
    p_res = pos["resid_tokens"][layer][:, -width:]
    n_res = neg["resid_tokens"][layer][:, -width:]
    both = (pos["mask"][:, -width:] * neg["mask"][:, -width:]).bool()
    a_pos, a_neg = pos["attn_last"][layer][:, -width:], neg["attn_last"][layer][:, -width:]
    if mode not in ("min", "max", "diff"):
        raise ValueError(f"mode must be 'min', 'max' or 'diff', got {mode!r}")
    attn = {
        "min": torch.minimum(a_pos, a_neg),
        "max": torch.maximum(a_pos, a_neg),
        "diff": (a_pos - a_neg).abs(),
    }[mode][both]
    rows = (p_res - n_res)[both]
    if times_diffnorm:
        norms = torch.linalg.vector_norm(rows, dim=1)
        # The original: √(a · ‖Δh‖/scale), so the covariance weight is a·‖Δh‖/scale.
        attn = attn * norms / norms[norms > 0].mean()
    weight = attn.sqrt()
    rows = rows * weight[:, None]
    return rows[weight > 0]


def abs_changes(fit: FitContext) -> torch.Tensor:
    """Δ|h| between consecutive layers of the clean residual, per prompt and dimension: [L−1, n, d]."""
    mag = fit.clean.resid.abs()
    return mag[1:] - mag[:-1]
