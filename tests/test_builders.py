"""ws_harness.builders against brute force, on synthetic weights with non-trivial RMSNorm gains.

The gains are drawn far from 1, so a builder that forgot to fold γ (SPEC §5, "read matrices
read the normed residual") gives a different subspace and fails. Subspaces are compared by
their projectors (eigenvector signs and orders within ties are arbitrary).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ws_harness import builders as bd
from ws_harness.arch import Architecture, LayerWeights
from ws_harness.hypothesis import Acts, BaseWeights, CeilingContext, FitContext, Hypothesis
from ws_harness.linalg import orthonormalize

L, D, H, H_KV, HD, D_FF, VOCAB, N = 3, 24, 4, 2, 6, 40, 60, 10
HYPOTHESES = Path(__file__).resolve().parents[1] / "hypotheses"


def gains(g: torch.Generator) -> torch.Tensor:
    return torch.rand(D, generator=g) * 3.0 + 0.1  # far from 1: folding must matter


def synthetic_fit(seed: int = 0, k: int = 3, broad_rank: int = 6) -> FitContext:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    layers = [
        LayerWeights(q=rnd(H * HD, D), k=rnd(H_KV * HD, D), v=rnd(H_KV * HD, D), o=rnd(D, H * HD),
                     gate=rnd(D_FF, D), up=rnd(D_FF, D), down=rnd(D, D_FF),
                     attn_norm=gains(g), mlp_norm=gains(g))
        for _ in range(L)
    ]
    weights = BaseWeights.from_tensors(layers, rnd(VOCAB, D), gains(g), H, H_KV)
    acts = {c: Acts(rnd(L, N, D), rnd(L, N, D), rnd(L, N, D_FF))
            for c in ("clean", "positive", "negative")}
    return FitContext(weights, acts, k, broad_rank=broad_rank)


def projector(B: torch.Tensor) -> torch.Tensor:
    B = B.double()
    return B @ B.T


def top_right(M: torch.Tensor, k: int) -> torch.Tensor:
    """Brute force: full SVD, top-k right singular vectors."""
    return torch.linalg.svd(M.double(), full_matrices=False)[2][:k].T


def top_eig(G: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigh(G.double())[1].flip(1)[:, :k]


def same_span(B1: torch.Tensor, B2: torch.Tensor, tol: float = 1e-5) -> bool:
    return B1.shape == B2.shape and float((projector(B1) - projector(B2)).abs().max()) < tol


def folded(fit: FitContext, layer: int) -> dict[str, torch.Tensor]:
    """W·diag(γ) per read role, written out by hand from the raw fields."""
    w = fit.weights(layer)
    a, m = w.attn_norm.double(), w.mlp_norm.double()
    return {"q": w.q.double() * a, "k": w.k.double() * a, "v": w.v.double() * a,
            "up": w.up.double() * m, "gate": w.gate.double() * m}


def read_gram_brute(fit: FitContext, layer: int) -> torch.Tensor:
    return sum(M.T @ M for M in folded(fit, layer).values())


def unembed_brute(fit: FitContext) -> torch.Tensor:
    return fit.unembedding.double() * fit.final_norm.double()


@pytest.fixture(scope="module")
def fit() -> FitContext:
    return synthetic_fit()


def test_input_super_and_kv_super_are_right_svs_of_the_folded_stack(fit: FitContext) -> None:
    for layer in fit.layers:
        f = folded(fit, layer)
        stack = torch.cat([f[r] for r in ("q", "k", "v", "up", "gate")])
        assert same_span(bd.input_super(fit, layer, fit.k), top_right(stack, fit.k))
        assert same_span(bd.kv_super(fit, layer, fit.k),
                         top_right(torch.cat([f["k"], f["v"]]), fit.k))
        w = fit.weights(layer)
        raw = torch.cat([w.q, w.k, w.v, w.up, w.gate])
        assert not same_span(bd.input_super(fit, layer, fit.k), top_right(raw, fit.k), tol=1e-2)


def test_global_read_is_the_top_eigenvectors_of_the_summed_folded_gram(fit: FitContext) -> None:
    U = unembed_brute(fit)
    total = sum(read_gram_brute(fit, layer) for layer in fit.layers) + U.T @ U
    assert same_span(bd.global_read(fit, fit.K), top_eig(total, fit.K))
    assert same_span(bd.lm_head_read(fit, fit.k), top_right(U, fit.k))
    bottom = torch.linalg.svd(U, full_matrices=True)[2][-fit.k:].T
    assert same_span(bd.logits_null(fit, fit.k), bottom)


def test_downstream_read_and_write_not_against_brute_force(fit: FitContext) -> None:
    U = unembed_brute(fit)
    for layer in fit.layers:
        after = sum((read_gram_brute(fit, l) for l in fit.layers if l > layer),
                    torch.zeros(D, D, dtype=torch.float64))
        removed = bd.downstream_read(fit, layer, fit.K)
        assert same_span(removed, top_eig(after + U.T @ U, fit.K))
        for remove in (removed, bd.global_read(fit, fit.K), bd.lm_head_read(fit, fit.K)):
            B = bd.write_not(fit, layer, remove, fit.k)
            # Orthogonal to what it removes, and the top left SVs of what is left.
            assert float((remove.double().T @ B.double()).abs().max()) < 1e-5
            P = projector(remove)
            left = (torch.eye(D, dtype=torch.float64) - P) @ fit.weights(layer).write.double()
            U_left = torch.linalg.svd(left, full_matrices=False)[0][:, : fit.k]
            assert same_span(B, U_left)


def test_qk_circuit_folds_the_attention_gain_on_both_sides(fit: FitContext) -> None:
    for layer in fit.layers:
        f = folded(fit, layer)
        M = sum(f["q"][h * HD:(h + 1) * HD].T @ f["k"][(h // (H // H_KV)) * HD:][:HD]
                for h in range(H))
        U = torch.linalg.svd(M, full_matrices=False)[0][:, : fit.k]
        assert same_span(bd.qk_circuit(fit, layer, fit.k), U)


def load_hypothesis(name: str) -> Hypothesis:
    """A hypothesis file's Hypothesis object, imported by path (hypotheses/ is no package)."""
    module_name = f"_ws_test_hyp_{name}"
    spec = importlib.util.spec_from_file_location(module_name, HYPOTHESES / f"test_{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # the decorator reads the docstring through sys.modules
    spec.loader.exec_module(module)
    return module.basis


def test_causally_isolated_removes_k_k_and_broad_lm_head_read(fit: FitContext) -> None:
    """The original removes input_super (k) ∪ kv_super (k) ∪ P_K(lm_head_read), not K/K/K."""
    for name, rank in (("causally_isolated", fit.k), ("causally_isolated_KKK", fit.K)):
        hyp = load_hypothesis(name)
        for layer in fit.layers:
            f = folded(fit, layer)
            removed = orthonormalize(torch.cat([
                top_right(torch.cat([f[r] for r in ("q", "k", "v", "up", "gate")]), rank),
                top_right(torch.cat([f["k"], f["v"]]), rank),
                top_right(unembed_brute(fit), fit.K)], dim=1))
            left = (torch.eye(D, dtype=torch.float64) - projector(removed)) @ \
                fit.weights(layer).write.double()
            U_left = torch.linalg.svd(left, full_matrices=False)[0][:, : fit.k]
            assert same_span(hyp.build(fit, layer), U_left), (name, layer)


def test_attn_min_x_diffnorm_weights_rows_by_the_root_of_the_product() -> None:
    """Row weight √(min(a⁺, a⁻)·‖Δh‖/mean nonzero ‖Δh‖) (the original), not √min·‖Δh‖/scale."""
    g = torch.Generator().manual_seed(3)
    n, T = 3, 5
    tokens = {c: {"resid_tokens": torch.randn(L, n, T, D, generator=g),
                  "attn_last": torch.rand(L, n, T, generator=g),
                  "mask": torch.ones(n, T)} for c in ("positive", "negative")}
    base = synthetic_fit()
    fit = FitContext(base._weights, {"clean": base.clean, "positive": base.positive,
                                     "negative": base.negative}, base.k, tokens)
    rows = bd.attention_weighted_diffs(fit, 1, "min", times_diffnorm=True)
    diff = (tokens["positive"]["resid_tokens"][1] - tokens["negative"]["resid_tokens"][1]).reshape(-1, D)
    a = torch.minimum(tokens["positive"]["attn_last"][1], tokens["negative"]["attn_last"][1]).reshape(-1)
    norms = diff.norm(dim=1)
    expected = diff * (a * norms / norms.mean()).sqrt()[:, None]
    torch.testing.assert_close(rows, expected)


def test_mean_signal_hypotheses_keep_the_mean() -> None:
    """A taskdiff (and a label_fit) that is a mean shift plus small noise: the diff-in-means
    direction is what TaskDiff_mean returns and what the uncentered bases lead with; the
    centered PCA the ceiling used before removes it."""
    base = synthetic_fit()
    g = torch.Generator().manual_seed(5)
    mu = torch.randn(D, generator=g)
    neg = base.negative.resid
    pos = neg + mu + 0.01 * torch.randn(L, N, D, generator=g)
    acts = {"clean": base.clean, "positive": Acts(pos, pos, base.positive.up_out),
            "negative": base.negative}
    fit = FitContext(base._weights, acts, base.k)
    unit = (mu / mu.norm()).double()
    for layer in fit.layers:
        B_mean = load_hypothesis("TaskDiff_mean").build(fit, layer)
        assert B_mean.shape == (D, 1) and abs(float(B_mean[:, 0].double() @ unit)) > 0.999
        B_unc = load_hypothesis("TaskDiff_uncentered").build(fit, layer)
        assert B_unc.shape[1] == fit.k and abs(float(B_unc[:, 0].double() @ unit)) > 0.999
    label_fit = mu + 0.01 * torch.randn(L, N, D, generator=g)
    ctx = CeilingContext(fit, label_fit, label_fit, {})
    B = load_hypothesis("TaskDiff_lora_fit").build(ctx, 1)
    assert abs(float(B[:, 0].double() @ unit)) > 0.999


def test_qk_chars_shared_returns_the_cosines_above_chance(fit: FitContext) -> None:
    for layer in fit.layers:
        B, cos = bd.qk_chars_shared(fit, layer, fit.k)
        assert B.shape[1] == cos.shape[0]
        assert bool((cos[:-1] >= cos[1:]).all()) if len(cos) > 1 else True
        qk, cc = bd.qk_circuit(fit, layer, fit.k), bd.chars_clusters(fit, layer, fit.k)
        all_cos = torch.linalg.svdvals(qk.double().T @ cc.double())
        from ws_harness.linalg import chance_cosine
        expect = all_cos[all_cos >= chance_cosine(D, qk.shape[1], cc.shape[1])]
        torch.testing.assert_close(cos, expect)


# ---- the gains come from the model's own norms ------------------------------------------------

def _tiny_model(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=50, hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
        num_key_value_heads=H_KV, head_dim=HD, intermediate_size=D_FF,
        tie_word_embeddings=True, max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand_like(p) * 2.0 - 0.5)  # not the identity gain
    return model


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_folded_read_matrices_equal_the_model_through_its_norms(model_type: str) -> None:
    """W·diag(γ) applied to x/rms(x) equals the projection of the norm's output, per role."""
    model = _tiny_model(model_type)
    arch = Architecture(model)
    weights = BaseWeights(arch)
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(1)) * 3.0
    layer = model.model.layers[1]
    eps = layer.input_layernorm.eps if hasattr(layer.input_layernorm, "eps") else 1e-6
    xhat = x / (x.square().mean(-1, keepdim=True) + eps).sqrt()
    mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
    w = weights.layer(1)
    with torch.no_grad():
        torch.testing.assert_close(layer.self_attn.q_proj(layer.input_layernorm(x)),
                                   xhat @ w.read("q").T, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.self_attn.v_proj(layer.input_layernorm(x)),
                                   xhat @ w.read("v").T, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.mlp.up_proj(mlp_norm(x)),
                                   xhat @ w.read("up").T, rtol=1e-4, atol=1e-4)
        logits = model.lm_head(model.model.norm(x))
        torch.testing.assert_close(logits, xhat @ (weights.unembedding * weights.final_norm).T,
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not read"):
        w.read("o")
