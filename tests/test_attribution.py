"""Linear (attribution) retention on the tiny model: path gradients, C_l, c_lin, oracle, restoration."""

from __future__ import annotations

import math

import pytest
import torch

from ws_harness import attribution as at
from ws_harness.arch import ROLES

N_LAYERS = 3  # random:tiny


def random_direction(tiny, keys, scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A diff along random directions, each of norm scale·‖W‖ (the weight it moves)."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for layer, role in keys:
        weight = tiny.arch.weight(layer, role).detach()
        v = torch.randn(weight.shape, generator=g)
        w[tiny.arch.param_name(layer, role)] = scale * weight.norm() * v / v.norm()
    return w


def snapshot(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool, torch.Tensor | None]]:
    return {
        name: (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
        for name, p in model.named_parameters()
    }


def assert_restored(model: torch.nn.Module, before) -> None:
    for name, p in model.named_parameters():
        value, flag, grad = before[name]
        assert torch.equal(p.detach(), value), name  # bit-for-bit
        assert p.requires_grad == flag, name
        assert (p.grad is None) == (grad is None) and (grad is None or torch.equal(p.grad, grad))


@pytest.fixture(scope="module")
def tiny_eval(tiny):
    return tiny.model, tiny.arch, tiny.probes("eval"), tiny.answer_ids


@pytest.fixture(scope="module")
def steered(tiny, tiny_eval, steering_diff):
    """The hand-made steering diff at scale 0.1 and its 4-node path gradients."""
    model, arch, probes, ids = tiny_eval
    w = steering_diff(tiny, 0.1)
    return w, at.path_gradients(model, arch, probes, ids, w, n_nodes=4)


def test_gradient_at_theta_matches_central_differences(tiny, tiny_eval):
    """n_nodes = 1 is the gradient at θ (independent of w): ⟨Ḡ, v⟩ vs (m(θ+v) − m(θ−v))/2."""
    model, arch, probes, ids = tiny_eval
    keys = [(0, "o"), (2, "down")]
    w = random_direction(tiny, keys, 1e-2)
    pg = at.path_gradients(model, arch, probes, ids, w, n_nodes=1)
    assert pg.n_nodes == 1 and pg.nodes == (0.0,) and pg.weights == (1.0,)
    assert set(pg.grads) == {(layer, role) for layer in (0, 2) for role in ROLES}
    assert all(g.dtype == torch.float32 for g in pg.grads.values())
    for key in keys:  # each tensor on its own: checks the gradient, not just the total
        name = arch.param_name(*key)
        fd = at.steering_effect(model, probes, ids, {name: w[name]})
        lin = 2.0 * float((pg.grads[key].double() * w[name].double()).sum())
        assert lin == pytest.approx(2.0 * pg.dots[name], rel=1e-12)
        assert abs(lin - fd) <= 1e-3 * abs(fd), (key, lin, fd)
    assert pg.rel_error < 1e-3, (pg.s_linear, pg.s_measured)


def test_path_average_predicts_s_for_a_small_diff(tiny, tiny_eval):
    model, arch, probes, ids = tiny_eval
    w = random_direction(tiny, [(0, "o"), (2, "down")], 0.1, seed=1)
    pg = at.path_gradients(model, arch, probes, ids, w, n_nodes=4)
    assert pg.s_measured is not None and abs(pg.s_measured) > 1e-4
    assert pg.rel_error < 1e-4, (pg.s_linear, pg.s_measured)
    assert pg.quadrature_error == abs(pg.s_linear - pg.s_measured)


def test_steering_diff_quadrature(tiny, tiny_eval, steered):
    """The steering diff saturates the tiny model's margin (a steep tanh in t), so 4 nodes
    leave a few % of S(w) (8.7 % here) and 16 nodes converge; S(w) = 2·Σ tr C_write exactly
    when w only touches down_proj."""
    model, arch, probes, ids = tiny_eval
    w, pg4 = steered
    assert pg4.rel_error < 0.15, (pg4.s_linear, pg4.s_measured)
    pg16 = at.path_gradients(model, arch, probes, ids, w, n_nodes=16, roles=("down",))
    assert pg16.rel_error < 1e-4, (pg16.s_linear, pg16.s_measured)
    assert set(pg16.grads) == {(layer, "down") for layer in range(N_LAYERS)}
    Cs = at.causal_matrices(at.role_deltas(arch, w), pg4.grads, arch.n_layers)
    assert math.fsum(float(torch.trace(c)) for c in Cs) == pytest.approx(pg4.s_linear / 2, rel=1e-9)


def test_weights_flags_and_grads_restored(tiny, tiny_eval):
    model, arch, probes, ids = tiny_eval
    w = random_direction(tiny, [(1, "o"), (1, "up")], 0.1)
    marker = arch.weight(1, "q")
    marker.grad = torch.ones_like(marker)  # a stale .grad must survive untouched
    try:
        before = snapshot(model)
        at.path_gradients(model, arch, probes, ids, w, n_nodes=2)
        assert_restored(model, before)
        with pytest.raises(IndexError):  # fails inside the backward loop, weights steered
            at.path_gradients(model, arch, probes, (10**9, 0), w, n_nodes=2, measure=False)
        assert_restored(model, before)
    finally:
        marker.grad = None


def test_c_lin_of_the_identity_is_one(tiny_eval, steered):
    _, arch, _, _ = tiny_eval
    w, pg = steered
    Cs = at.causal_matrices(at.role_deltas(arch, w), pg.grads, arch.n_layers)
    eye = torch.eye(arch.d_model)
    for scope in ("per_layer", "global"):
        res = at.linear_retention([eye] * N_LAYERS, Cs, scope)
        assert res.c_lin == 1.0 and res.r == 1.0, res
        # The oracle's c_lin sums C's eigenvalues, c_lin(I) its trace: equal up to rounding.
        assert res.pct_oracle == pytest.approx(1.0, abs=1e-12), res
        assert res.c_lin_layers == [1.0] * N_LAYERS
        assert res.null_sd == 0.0 and res.z == 0.0 and res.p == 1.0 and res.reason is None


def test_causal_oracle_beats_random_bases(tiny_eval, steered):
    _, arch, _, _ = tiny_eval
    w, pg = steered
    Cs = at.causal_matrices(at.role_deltas(arch, w), pg.grads, arch.n_layers)
    k, d = 4, arch.d_model
    oracle = at.linear_retention(at.causal_oracle(Cs, k), Cs)
    assert oracle.pct_oracle == pytest.approx(1.0, abs=1e-12)
    assert oracle.r > 1.0 and oracle.p < 1e-6
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        bases = [torch.linalg.qr(torch.randn(d, k, generator=g))[0] for _ in range(N_LAYERS)]
        res = at.linear_retention(bases, Cs)
        assert res.c_lin <= oracle.c_lin + 1e-12 and res.pct_oracle <= 1.0 + 1e-12
        for lo, lr in zip(oracle.c_lin_layers, res.c_lin_layers, strict=True):
            assert lr <= lo + 1e-12  # Ky Fan per layer too


def test_causal_matrices_sides(tiny, tiny_eval):
    model, arch, probes, ids = tiny_eval
    w = random_direction(tiny, [(0, "q"), (0, "up"), (2, "o")], 0.05, seed=3)
    pg = at.path_gradients(model, arch, probes, ids, w, n_nodes=1, measure=False)
    deltas = at.role_deltas(arch, w)
    write = at.causal_matrices(deltas, pg.grads, arch.n_layers, side="write")
    read = at.causal_matrices(deltas, pg.grads, arch.n_layers, side="read")
    assert [c is None for c in write] == [True, True, False]
    assert [c is None for c in read] == [False, True, True]
    for c in (write[2], read[0]):
        assert c.dtype == torch.float64 and c.shape == (arch.d_model, arch.d_model)
        assert torch.equal(c, c.T)
    tr_read = pg.dots[arch.param_name(0, "q")] + pg.dots[arch.param_name(0, "up")]
    assert float(torch.trace(read[0])) == pytest.approx(tr_read, rel=1e-9)
    assert float(torch.trace(write[2])) == pytest.approx(pg.dots[arch.param_name(2, "o")], rel=1e-9)
    # A read-side basis acts on the delta's input side: tr(P C) = Σ_T ⟨ΔW_T P, Ḡ_T⟩.
    B = torch.linalg.qr(torch.randn(arch.d_model, 5, generator=torch.Generator().manual_seed(4)))[0]
    P = (B @ B.T).double()
    direct = sum(
        float(((deltas[(0, r)].double() @ P) * pg.grads[(0, r)].double()).sum()) for r in ("q", "up")
    )
    assert float(torch.trace(P @ read[0])) == pytest.approx(direct, rel=1e-9)


def test_nonpositive_trace_gives_nan_with_a_reason():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    C = -(A @ A.T)  # tr C < 0
    res = at.linear_retention([torch.eye(8)[:, :2]], [C])
    assert math.isnan(res.c_lin) and math.isnan(res.r) and math.isnan(res.p)
    assert res.reason is not None and "first order" in res.reason
    res = at.linear_retention([torch.eye(8)[:, :2]], [torch.zeros(8, 8, dtype=torch.float64)])
    assert res.reason is not None and math.isnan(res.z)


def test_bad_arguments_are_named(tiny_eval):
    model, arch, probes, ids = tiny_eval
    w = {arch.param_name(0, "o"): torch.zeros_like(arch.weight(0, "o"))}
    with pytest.raises(ValueError, match="roles"):
        at.path_gradients(model, arch, probes, ids, w, roles=("o", "mlp"))
    with pytest.raises(ValueError, match="n_nodes"):
        at.path_gradients(model, arch, probes, ids, w, n_nodes=0)
    with pytest.raises(ValueError, match="side"):
        at.causal_matrices({}, {}, 3, side="both")
    with pytest.raises(ValueError, match="no gradient"):
        at.causal_matrices({(0, "o"): torch.zeros(4, 4)}, {}, 3)
    C = torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="orthonormal"):
        at.linear_retention([2 * torch.eye(6)[:, :2]], [C])
    with pytest.raises(ValueError, match="scope"):
        at.linear_retention([torch.eye(6)[:, :2]], [C], "local")
    with pytest.raises(ValueError, match="one basis at every layer"):
        at.linear_retention([torch.eye(6)[:, :2], torch.eye(6)[:, 2:4]], [C, C], "global")
    with pytest.raises(ValueError, match="no layer"):
        at.linear_retention([None, torch.eye(6)[:, :2]], [C, None])


def test_precomputed_eigenvalues_give_the_same_scores(tiny_eval, steered):
    _, arch, _, _ = tiny_eval
    w, pg = steered
    Cs = at.causal_matrices(at.role_deltas(arch, w), pg.grads, arch.n_layers)
    eig = [torch.linalg.eigvalsh(c) for c in Cs]
    B = torch.linalg.qr(torch.randn(arch.d_model, 3, generator=torch.Generator().manual_seed(5)))[0]
    for scope in ("per_layer", "global"):
        plain = at.linear_retention(B, Cs, scope)
        given = at.linear_retention(B, Cs, scope, eigenvalues=eig)
        assert given.p == pytest.approx(plain.p, rel=1e-9) and given.r == plain.r
        assert given.pct_oracle == pytest.approx(plain.pct_oracle, rel=1e-12)
    with pytest.raises(ValueError, match="do not sum to tr"):
        at.linear_retention(B, Cs, eigenvalues=[eig[1], eig[0], eig[2]])


def test_read_side_c_folds_the_norm_gain_into_residual_coordinates() -> None:
    """tr(Pᵀ C′ P) with gains = Σ_T ⟨ΔW_T·D·P·D⁻¹, Ḡ_T⟩: keeping what T reads from a residual
    subspace B (D = diag γ); without gains it is the normed-coordinate form ⟨ΔW_T·P, Ḡ_T⟩."""
    from ws_harness.attribution import causal_matrices

    g = torch.Generator().manual_seed(3)
    d, out = 12, 7
    deltas = {(0, r): torch.randn(out, d, generator=g, dtype=torch.float64) for r in ("q", "up")}
    grads = {key: torch.randn(out, d, generator=g, dtype=torch.float64) for key in deltas}
    gains = {key: torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.05 for key in deltas}
    B = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=torch.float64))[0]
    P = B @ B.T
    folded = causal_matrices(deltas, grads, 1, "read", read_gains=gains)[0]
    plain = causal_matrices(deltas, grads, 1, "read")[0]
    expect = sum(float((deltas[key] @ torch.diag(gains[key]) @ P @ torch.diag(1 / gains[key])
                        * grads[key]).sum()) for key in deltas)
    assert float(torch.trace(B.T @ folded @ B)) == pytest.approx(expect, rel=1e-10)
    assert float(torch.trace(B.T @ plain @ B)) == pytest.approx(
        sum(float((deltas[key] @ P * grads[key]).sum()) for key in deltas), rel=1e-10)
    assert float(torch.trace(folded)) == pytest.approx(float(torch.trace(plain)), rel=1e-10)
    assert not torch.allclose(folded, plain)
