"""Basis constructions that several hypotheses share (read/write grams, projectors, k-means, Procrustes)."""

from __future__ import annotations

import torch

from ws_harness.hypothesis import FitContext
from ws_harness.linalg import (
    left_basis,
    orthonormalize,
    pca_basis,
    project_out,
    right_basis,
)

__all__ = [
    "gram_basis",
    "read_gram",
    "unembedding_gram",
    "lm_head_read",
    "global_read",
    "downstream_read",
    "all_layers_write_gram",
    "write_not",
    "input_super",
    "kv_super",
    "qk_circuit",
    "kmeans_centroids",
    "chars_clusters",
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


def read_gram(fit: FitContext, layer: int) -> torch.Tensor:
    """W_qᵀW_q + W_kᵀW_k + W_vᵀW_v + W_upᵀW_up + W_gateᵀW_gate of one layer, d×d float64."""
    w = fit.weights(layer)
    return sum(m.double().T @ m.double() for m in (w.q, w.k, w.v, w.up, w.gate))


def unembedding_gram(fit: FitContext) -> torch.Tensor:
    """W_Uᵀ W_U, d×d float64."""
    return fit.memo(("unembedding_gram",), lambda: fit.unembedding.double().T @ fit.unembedding.double())


def lm_head_read(fit: FitContext, k: int) -> torch.Tensor:
    """Top-k right singular vectors of the unembedding: what the logits read most."""
    return fit.memo(("lm_head_read", k), lambda: gram_basis(unembedding_gram(fit), k))


def global_read(fit: FitContext, k: int) -> torch.Tensor:
    """Top-k eigenvectors of Σ_l read_gram(l) + W_UᵀW_U: what the whole model reads most."""

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


def input_super(fit: FitContext, layer: int, k: int) -> torch.Tensor:
    """Top-k right SVs of [W_q; W_k; W_v; W_up; W_gate]: everything the layer reads."""
    w = fit.weights(layer)
    return right_basis(torch.cat([w.q, w.k, w.v, w.up, w.gate], dim=0), k)


def kv_super(fit: FitContext, layer: int, k: int) -> torch.Tensor:
    """Top-k right SVs of [W_k; W_v]: what attention reads into keys and values."""
    w = fit.weights(layer)
    return right_basis(torch.cat([w.k, w.v], dim=0), k)


def qk_circuit(fit: FitContext, layer: int, k: int) -> torch.Tensor:
    """Top-k left SVs of W_qᵀ·expand(W_k) = Σ_h W_q^hᵀ W_k^{g(h)} (each query head with its KV head)."""
    w = fit.weights(layer)
    return left_basis(w.q.T @ fit.expand_kv(w.k), k)


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


def procrustes_skew_basis(
    neg: torch.Tensor, pos: torch.Tensor, k: int, inner: int = 32
) -> torch.Tensor:
    """Plane pairs of the rotation that best maps neg onto pos, inside their joint top-`inner` PCA.

    R = argmin_{RᵀR=I} ‖X_neg R − X_pos‖ (orthogonal Procrustes: R = UVᵀ from X_negᵀX_pos = UΣVᵀ).
    Its skew part S = R − Rᵀ has singular values in equal pairs, one pair per rotation plane; we
    keep whole pairs (an even number of directions ≤ k), largest rotation first.
    """
    P = pca_basis(torch.cat([neg, pos]), inner).double()  # [d, m]
    mean = torch.cat([neg, pos]).double().mean(0)
    Xn, Xp = (neg.double() - mean) @ P, (pos.double() - mean) @ P
    U, _, Vh = torch.linalg.svd(Xn.T @ Xp)
    R = U @ Vh
    Us, s, _ = torch.linalg.svd(R - R.T)
    n_pairs = min(k // 2, int((s > 1e-6 * max(float(s[0]), 1e-300)).sum()) // 2)
    return orthonormalize((P @ Us[:, : 2 * n_pairs]).float())


def attention_weighted_diffs(
    fit: FitContext, layer: int, mode: str, times_diffnorm: bool = False
) -> torch.Tensor:
    """Token-level persona differences, rows weighted by the two personas' last-token attention.

    Sequences are right-aligned (left padding), so position t is "t tokens before the end" in
    both personas; only positions real under both personas are used. Row weight:
    √min(a⁺, a⁻), √max(a⁺, a⁻) or √|a⁺ − a⁻| for mode 'min' / 'max' / 'diff' (a = attention of
    the last token to that position, mean over heads), optionally × ‖row‖ / mean nonzero ‖row‖.
    Returns the weighted rows [N, d] (zero-weight rows dropped).
    """
    pos, neg = fit.tokens("positive"), fit.tokens("negative")
    width = min(pos["mask"].shape[1], neg["mask"].shape[1])
    p_res = pos["resid_tokens"][layer][:, -width:]
    n_res = neg["resid_tokens"][layer][:, -width:]
    both = (pos["mask"][:, -width:] * neg["mask"][:, -width:]).bool()
    a_pos, a_neg = pos["attn_last"][layer][:, -width:], neg["attn_last"][layer][:, -width:]
    weight = {
        "min": torch.minimum(a_pos, a_neg),
        "max": torch.maximum(a_pos, a_neg),
        "diff": (a_pos - a_neg).abs(),
    }[mode].sqrt()
    rows = (p_res - n_res)[both]
    weight = weight[both]
    if times_diffnorm:
        norms = torch.linalg.vector_norm(rows, dim=1)
        weight = weight * norms / norms[norms > 0].mean()
    rows = rows * weight[:, None]
    return rows[weight > 0]


def abs_changes(fit: FitContext) -> torch.Tensor:
    """Δ|h| between consecutive layers of the clean residual, per prompt and dimension: [L−1, n, d]."""
    mag = fit.clean.resid.abs()
    return mag[1:] - mag[:-1]
