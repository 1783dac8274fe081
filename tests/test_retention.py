"""Measured causal recovery on the tiny random model: hook-based steering effects of write variants."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from ws_harness.cache import one_thread as torch_one_thread
from ws_harness.diffs import weight_steer
from ws_harness.nulls import haar_bases
from ws_harness.retention import (
    added_writes,
    norm_matched,
    percentile,
    project_writes,
    random_reference,
    retention_ratio,
    steering_effects,
    write_part,
)
from ws_harness.session import HarnessSession
from ws_harness.steering import answer_logit_diff, answer_token_ids

MakeDiff = Callable[..., dict[str, torch.Tensor]]  # the `steering_diff` fixture


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def hook_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def assert_bitwise_equal(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.int32), before[name].view(torch.int32)), name


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model's ops are far too small to gain from intra-op threads, and on a shared,
    busy CPU every OpenMP barrier can wait a scheduler slice (≈ 50× slower); restored after."""
    with torch_one_thread():
        yield


@pytest.fixture(scope="module")
def answer_ids(tiny: HarnessSession) -> tuple[int, int]:
    return answer_token_ids(tiny.tokenizer, tiny.behaviour.answer_tokens)


@pytest.fixture(scope="module")
def full_diff(tiny: HarnessSession, steering_diff: MakeDiff) -> dict[str, torch.Tensor]:
    """The tiny steering diff (down_proj) plus small o_proj and q_proj deltas, by parameter name."""
    arch = tiny.arch
    w = dict(steering_diff(tiny, 0.5))
    g = torch.Generator().manual_seed(0)
    for layer in range(arch.n_layers):
        for role in ("o", "q"):
            shape = tuple(arch.weight(layer, role).shape)
            w[arch.param_name(layer, role)] = 0.02 * torch.randn(shape, generator=g)
    return w


@pytest.fixture(scope="module")
def w_write(tiny: HarnessSession, full_diff: dict[str, torch.Tensor]) -> dict:
    return write_part(full_diff, tiny.arch)


@pytest.fixture(scope="module")
def effect_w(tiny: HarnessSession, w_write: dict, answer_ids: tuple[int, int]) -> torch.Tensor:
    return steering_effects(tiny.model, tiny.arch, tiny.probes("eval"), answer_ids, {"w": w_write})["w"]


def identity_bases(tiny: HarnessSession) -> list[torch.Tensor]:
    d = tiny.arch.d_model
    return [torch.eye(d) for _ in range(tiny.arch.n_layers)]


# ---- variants --------------------------------------------------------------------------------
def test_write_part_keeps_only_o_and_down(tiny: HarnessSession, full_diff: dict) -> None:
    arch = tiny.arch
    w = write_part(full_diff, arch)
    assert sorted(w) == sorted((layer, role) for layer in range(arch.n_layers) for role in ("o", "down"))
    assert w[(1, "down")] is full_diff[arch.param_name(1, "down")]
    with pytest.raises(TypeError, match="arch="):
        write_part(full_diff)
    with pytest.raises(ValueError, match="unknown role 'mlp'"):
        write_part({(0, "mlp"): torch.zeros(2, 2)})


def test_keep_plus_drop_is_w_write(tiny: HarnessSession, w_write: dict) -> None:
    d = tiny.arch.d_model
    bases = [b for b in haar_bases(d, 5, tiny.arch.n_layers, 3)]
    bases[1] = None  # a layer without a basis: keep has no entry there, drop keeps ΔW
    keep = project_writes(w_write, bases, "keep")
    drop = project_writes(w_write, bases, "drop")
    assert (1, "o") not in keep and drop[(1, "o")] is w_write[(1, "o")]
    for key, delta in w_write.items():
        total = keep.get(key, torch.zeros_like(delta)) + drop[key]
        torch.testing.assert_close(total, delta, rtol=0, atol=1e-6)
    # keep lies inside B: (I − P) keep = 0
    for (layer, role), kept in keep.items():
        b = bases[layer].double()
        residual = kept.double() - b @ (b.T @ kept.double())
        assert float(residual.abs().max()) < 1e-6, (layer, role)


def test_identity_basis_keeps_everything_and_drops_nothing(
    tiny: HarnessSession, w_write: dict, effect_w: torch.Tensor, answer_ids: tuple[int, int]
) -> None:
    eye = identity_bases(tiny)
    keep = project_writes(w_write, eye, "keep")
    drop = project_writes(w_write, eye, "drop")
    for key, delta in w_write.items():
        assert torch.equal(keep[key], delta), key
    effects = steering_effects(tiny.model, tiny.arch, tiny.probes("eval"), answer_ids,
                               {"keep": keep, "drop": drop})
    assert torch.equal(effects["keep"], effect_w)  # c_keep(I) = 1 exactly
    assert float(effect_w.mean()) > 0.5  # the diff steers the tiny model
    assert float(effects["drop"].abs().max()) < 1e-5


def test_norm_matched(w_write: dict) -> None:
    half = {key: 0.5 * delta for key, delta in w_write.items() if key[1] == "down"}
    matched = norm_matched(half, w_write)

    def norm(ds: dict) -> float:
        return float(sum(t.double().square().sum() for t in ds.values()).sqrt())

    assert abs(norm(matched) - norm(w_write)) < 1e-5 * norm(w_write)
    cos = torch.nn.functional.cosine_similarity(matched[(0, "down")].flatten(), half[(0, "down")].flatten(),
                                                dim=0)
    assert float(cos) > 1 - 1e-6
    with pytest.raises(ValueError, match="all-zero"):
        norm_matched({}, w_write)


# ---- hooks vs weights ------------------------------------------------------------------------
def test_hook_effect_matches_weight_steer(
    tiny: HarnessSession, w_write: dict, effect_w: torch.Tensor, answer_ids: tuple[int, int]
) -> None:
    arch, probes = tiny.arch, tiny.probes("eval")
    by_name = {arch.param_name(layer, role): delta for (layer, role), delta in w_write.items()}
    margins = {}
    for alpha in (1.0, -1.0):
        with weight_steer(tiny.model, by_name, alpha):
            margins[alpha] = answer_logit_diff(tiny.model, probes, answer_ids).double()
    expected = margins[1.0] - margins[-1.0]
    scale = float(expected.abs().max())
    assert float((effect_w - expected).abs().max()) <= 1e-4 * scale
    assert effect_w.dtype == torch.float64 and effect_w.shape == (len(probes),)


def test_batched_variants_match_one_at_a_time(
    tiny: HarnessSession, w_write: dict, answer_ids: tuple[int, int]
) -> None:
    arch, probes = tiny.arch, tiny.probes("eval")
    bases = list(haar_bases(arch.d_model, 8, arch.n_layers, 1))
    variants = {
        "w": w_write,
        "keep": project_writes(w_write, bases, "keep"),
        "drop": project_writes(w_write, bases, "drop"),
        "half": {k: 0.5 * v for k, v in w_write.items()},
    }
    n = len(probes)
    together = steering_effects(tiny.model, arch, probes, answer_ids, variants, max_batch=8 * n)
    for name, variant in variants.items():
        alone = steering_effects(tiny.model, arch, probes, answer_ids, {name: variant}, max_batch=8 * n)[name]
        torch.testing.assert_close(together[name], alone, rtol=1e-5, atol=1e-5)
    # prompt blocks smaller than the probe set give the same effects too
    small = steering_effects(tiny.model, arch, probes, answer_ids, {"w": w_write}, max_batch=6)["w"]
    torch.testing.assert_close(small, together["w"], rtol=1e-5, atol=1e-5)


def test_hooks_removed_when_body_raises_and_weights_untouched(
    tiny: HarnessSession, w_write: dict, answer_ids: tuple[int, int]
) -> None:
    model, arch = tiny.model, tiny.arch
    before = snapshot(model)
    # transformers keeps its own output-recording hooks once installed: compare, do not expect none
    hooks_before = hook_counts(model)
    modules = [arch.module(arch.module_name(layer, role)) for layer, role in w_write]
    with pytest.raises(RuntimeError, match="boom"):
        with added_writes(model, arch, [(1.0, w_write), (-1.0, w_write)]):
            assert all("forward" in m.__dict__ for m in modules)  # the edited forwards
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in modules)
    steering_effects(model, arch, tiny.probes("eval"), answer_ids, {"w": w_write})
    assert not any("forward" in m.__dict__ for m in modules)
    assert hook_counts(model) == hooks_before
    assert_bitwise_equal(model, before)


def test_batch_not_divisible_by_chunks(tiny: HarnessSession, w_write: dict) -> None:
    model, arch = tiny.model, tiny.arch
    batch = tiny.probes("eval").slice(0, 3)
    with pytest.raises(ValueError, match=r"batch of 3 rows .* not divisible by len\(chunks\)=2"):
        with torch.no_grad(), added_writes(model, arch, [(1.0, w_write), (-1.0, w_write)]):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
    modules = [arch.module(arch.module_name(layer, role)) for layer, role in w_write]
    assert not any("forward" in m.__dict__ for m in modules)


def test_bad_shapes_name_the_thing(tiny: HarnessSession, w_write: dict) -> None:
    arch = tiny.arch
    bad = {(2, "down"): torch.zeros(arch.d_model, 7)}
    with pytest.raises(ValueError, match=r"layer 2, role 'down' has shape \(64, 7\), expected \(64, 128\)"):
        with added_writes(tiny.model, arch, [(1.0, bad)]):
            pass
    with pytest.raises(ValueError, match=r"basis at layer 0 has shape \(32, 4\).*d=64"):
        project_writes(w_write, [torch.eye(32)[:, :4]] * arch.n_layers, "keep")
    with pytest.raises(ValueError, match="basis at layer 1 .* not orthonormal"):
        project_writes(w_write, [torch.eye(64)[:, :4], 2 * torch.eye(64)[:, :4], None], "keep")
    with pytest.raises(ValueError, match="bases has 2 entries .* layer 2"):
        project_writes(w_write, [None, None], "drop")
    with pytest.raises(ValueError, match="mode 'both'"):
        project_writes(w_write, identity_bases(tiny), "both")
    with pytest.raises(ValueError, match="role 'q' is not a residual write"):
        project_writes({(0, "q"): torch.zeros(64, 64)}, identity_bases(tiny), "keep")
    with pytest.raises(ValueError, match="max_batch"):
        steering_effects(tiny.model, arch, tiny.probes("eval"), (0, 1), {"w": w_write}, max_batch=1)


# ---- statistics ------------------------------------------------------------------------------
def test_retention_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    reference = 2.0 + torch.rand(30, generator=g, dtype=torch.float64)
    effect = 0.6 * reference + 0.3 * torch.randn(30, generator=g, dtype=torch.float64)
    first = retention_ratio(effect, reference, n_boot=500, seed=3)
    assert first == retention_ratio(effect, reference, n_boot=500, seed=3)
    point, lo, hi = first
    assert point == pytest.approx(float(effect.mean() / reference.mean()))
    assert lo < point < hi
    assert retention_ratio(effect, reference, n_boot=500, seed=4) != first
    # identical per-prompt ratios: every replicate gives the same ratio
    point, lo, hi = retention_ratio(0.4 * reference, reference, n_boot=200)
    assert point == pytest.approx(0.4) and lo == pytest.approx(0.4, abs=1e-12)
    assert hi == pytest.approx(0.4, abs=1e-12)
    with pytest.raises(ValueError, match="paired"):
        retention_ratio(effect, reference[:-1])
    with pytest.raises(ValueError, match="mean 0"):
        retention_ratio(effect, torch.zeros(30))


def test_random_reference_and_percentile(tiny: HarnessSession, w_write: dict) -> None:
    ranks = [4, 0, None]
    draws = random_reference(w_write, ranks, n_draws=3, seed=7)
    again = random_reference(w_write, ranks, n_draws=3, seed=7)
    assert len(draws) == 3
    for a, b in zip(draws, again):
        assert sorted(a) == [(0, "down"), (0, "o")]
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(draws[0][(0, "down")], draws[1][(0, "down")])
    other = random_reference(w_write, ranks, n_draws=1, seed=8)[0]
    assert not torch.equal(other[(0, "down")], draws[0][(0, "down")])
    # layer 0's draw does not depend on which other layers the deltas touch
    only0 = random_reference({k: v for k, v in w_write.items() if k[0] == 0}, ranks, 1, seed=7)[0]
    assert torch.equal(only0[(0, "o")], draws[0][(0, "o")])
    with pytest.raises(ValueError, match="ranks has 2 entries"):
        random_reference(w_write, [4, 4], 1, 0)
    with pytest.raises(ValueError, match="rank 65 at layer 0 exceeds d=64"):
        random_reference(w_write, [65, 0, 0], 1, 0)

    assert percentile(2.0, [1.0, 2.0, 3.0, 4.0]) == 0.5  # ties count as ≤
    assert percentile(5.0, torch.tensor([1.0, 2.0])) == 1.0
    assert percentile(0.0, [1.0, 2.0]) == 0.0
    with pytest.raises(ValueError, match="reference_values"):
        percentile(1.0, [])
