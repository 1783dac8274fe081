"""The shared upstream prefix on the tiny model: the replayed residual is the real one, and the
retention and attribution forwards that skip the untouched layers give the same numbers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from ws_harness.attribution import path_gradients
from ws_harness.cache import one_thread as torch_one_thread
from ws_harness.diffs import weight_steer
from ws_harness.prefix import (
    first_touched_layer,
    hidden_entering,
    replayed_prefix,
    split_shared_prefix,
)
from ws_harness.retention import added_writes, steering_effects, write_part
from ws_harness.session import HarnessSession
from ws_harness.steering import answer_logit_diff, answer_token_ids


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with torch_one_thread():
        yield


@pytest.fixture(scope="module")
def answer_ids(tiny: HarnessSession) -> tuple[int, int]:
    return answer_token_ids(tiny.tokenizer, tiny.behaviour.answer_tokens)


@pytest.fixture(scope="module")
def late_diff(tiny: HarnessSession) -> dict[str, torch.Tensor]:
    """Deltas on layers 1 and 2 only (o, down, q, up): layer 0 is upstream of everything."""
    arch = tiny.arch
    g = torch.Generator().manual_seed(3)
    return {arch.param_name(layer, role): 0.05 * torch.randn(tuple(arch.weight(layer, role).shape),
                                                             generator=g)
            for layer in (1, 2) for role in ("o", "down", "q", "up")}


def _inputs(batch) -> dict[str, torch.Tensor]:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids}


def test_first_touched_layer(tiny: HarnessSession, late_diff: dict) -> None:
    arch = tiny.arch
    assert first_touched_layer(arch, late_diff) == 1
    assert first_touched_layer(arch, [(2, "o"), (1, "down")]) == 1
    # an embedding delta changes layer 0's input: nothing can be shared
    assert first_touched_layer(arch, [*late_diff, "model.embed_tokens.weight"]) == 0
    assert first_touched_layer(arch, []) == 0


@pytest.mark.parametrize("layer", [1, 2])
def test_hidden_entering_is_the_hidden_state_of_a_full_forward(tiny: HarnessSession, layer: int) -> None:
    batch = tiny.probes("eval")
    with torch.no_grad():
        full = tiny.model(**_inputs(batch), output_hidden_states=True, use_cache=False)
    pre_hooks = sum(len(m._forward_pre_hooks) for m in tiny.model.modules())
    got = hidden_entering(tiny.model, tiny.arch, _inputs(batch), layer)
    torch.testing.assert_close(got, full.hidden_states[layer], rtol=0, atol=0)
    assert sum(len(m._forward_pre_hooks) for m in tiny.model.modules()) == pre_hooks


def test_replayed_prefix_reproduces_the_logits_and_restores_the_layers(tiny: HarnessSession) -> None:
    model, arch, batch = tiny.model, tiny.arch, tiny.probes("eval")
    with torch.no_grad():
        expected = model(**_inputs(batch), use_cache=False).logits
        hidden = hidden_entering(model, arch, _inputs(batch), 2)
        # garbage in the embeddings cannot matter: layers 0 and 1 are skipped, layer 2 gets `hidden`
        garbage = {**_inputs(batch), "input_ids": torch.zeros_like(batch.input_ids)}
        with replayed_prefix(arch, 2, hidden):
            got = model(**garbage, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    layers = [arch.module(arch.layer_name(l)) for l in range(arch.n_layers)]
    with pytest.raises(RuntimeError, match="boom"):
        with replayed_prefix(arch, 2, hidden):
            assert "forward" in layers[0].__dict__
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in layers)


def test_replayed_prefix_refuses_other_prompts_and_bad_layers(tiny: HarnessSession) -> None:
    model, arch, batch = tiny.model, tiny.arch, tiny.probes("eval")
    hidden = hidden_entering(model, arch, _inputs(batch.slice(0, 2)), 1)
    with pytest.raises(ValueError, match=r"layer 1 got input of shape .* replayed residual has shape"):
        with torch.no_grad(), replayed_prefix(arch, 1, hidden, times=2):
            model(**_inputs(batch), use_cache=False)
    for bad in (0, arch.n_layers):
        with pytest.raises(ValueError, match=f"layer {bad} must be in 1..{arch.n_layers - 1}"):
            with replayed_prefix(arch, bad, hidden):
                pass
        with pytest.raises(ValueError, match=f"layer {bad} must be in 1..{arch.n_layers - 1}"):
            hidden_entering(model, arch, _inputs(batch), bad)


def test_retention_with_the_shared_prefix_matches_full_forwards(
    tiny: HarnessSession, late_diff: dict, answer_ids: tuple[int, int]
) -> None:
    arch, probes = tiny.arch, tiny.probes("eval")
    w_write = write_part(late_diff, arch)
    variants = {"w": w_write, "half": {k: 0.5 * v for k, v in w_write.items()},
                "layer2": {k: v for k, v in w_write.items() if k[0] == 2}}
    shared = steering_effects(tiny.model, arch, probes, answer_ids, variants, max_batch=8)
    full = steering_effects(tiny.model, arch, probes, answer_ids, variants, max_batch=8,
                            share_upstream=False)
    for name in variants:
        torch.testing.assert_close(shared[name], full[name], rtol=1e-6, atol=1e-6)
    # and both are what editing the weights gives
    by_name = {arch.param_name(l, r): t for (l, r), t in w_write.items()}
    margins = {}
    for alpha in (1.0, -1.0):
        with weight_steer(tiny.model, by_name, alpha):
            margins[alpha] = answer_logit_diff(tiny.model, probes, answer_ids).double()
    torch.testing.assert_close(shared["w"], margins[1.0] - margins[-1.0], rtol=1e-5, atol=1e-5)


def test_edited_forward_is_the_weight_edit_bit_for_bit(
    tiny: HarnessSession, late_diff: dict
) -> None:
    """added_writes computes W + αΔW as weight_steer does, so a one-chunk forward is the edit."""
    model, arch, batch = tiny.model, tiny.arch, tiny.probes("eval")
    w_write = write_part(late_diff, arch)
    by_name = {arch.param_name(l, r): t for (l, r), t in w_write.items()}
    with torch.no_grad():
        with weight_steer(model, by_name, 0.7):
            expected = model(**_inputs(batch), use_cache=False).logits
        with added_writes(model, arch, [(0.7, w_write)]):
            got = model(**_inputs(batch), use_cache=False).logits
    assert torch.equal(got, expected)


def test_path_gradients_with_the_shared_prefix_match_full_forwards(
    tiny: HarnessSession, late_diff: dict, answer_ids: tuple[int, int]
) -> None:
    probes = tiny.probes("eval")
    full = path_gradients(tiny.model, tiny.arch, probes, answer_ids, late_diff, n_nodes=2,
                          batch_size=3, measure=False, share_upstream=False, share_prefix=False)
    for upstream, prefix in ((True, False), (False, True), (True, True)):
        shared = path_gradients(tiny.model, tiny.arch, probes, answer_ids, late_diff, n_nodes=2,
                                batch_size=3, measure=False, share_upstream=upstream,
                                share_prefix=prefix)
        assert shared.grads.keys() == full.grads.keys()
        for key in full.grads:
            scale = float(full.grads[key].abs().max())
            assert float((shared.grads[key] - full.grads[key]).abs().max()) <= 1e-5 * scale, \
                (key, upstream, prefix)
        assert shared.s_linear == pytest.approx(full.s_linear, rel=1e-5)
    assert not any("forward" in m.__dict__ for m in tiny.model.modules())


def test_split_shared_prefix_rebuilds_every_prompt(tiny: HarnessSession) -> None:
    probes = tiny.probes("eval")
    split = split_shared_prefix(probes.input_ids, probes.attention_mask)
    assert split is not None and len(split) == len(probes)
    p = split.prefix_ids.shape[0]
    assert p >= 4  # the chat template's system turn
    for i in range(len(probes)):
        whole = probes.input_ids[i][probes.attention_mask[i].bool()]
        rest = split.input_ids[i][split.attention_mask[i, p:].bool()]
        assert torch.equal(torch.cat([split.prefix_ids, rest]), whole)
        assert len(rest) >= 1  # the last token is always computed with the rest
        # positions continue where the prefix ends, as in the whole prompt
        real = split.attention_mask[i, p:].bool()
        assert split.position_ids[i][real].tolist() == list(range(p, len(whole)))
    assert bool(split.attention_mask[:, :p].all())
    # nothing shared: no split
    ids = probes.input_ids.clone()
    first_real = probes.attention_mask.float().argmax(1)
    ids[0, first_real[0]] = ids[0, first_real[0]] + 1
    assert split_shared_prefix(ids, probes.attention_mask) is None


@pytest.mark.parametrize("touch", ["late", "all"])
def test_the_shared_token_prefix_gives_the_same_effects(
    tiny: HarnessSession, late_diff: dict, steering_diff, answer_ids: tuple[int, int], touch: str
) -> None:
    arch, probes = tiny.arch, tiny.probes("eval")
    w = late_diff if touch == "late" else dict(steering_diff(tiny, 0.5))
    w_write = write_part(w, arch)
    variants = {"w": w_write, "half": {k: 0.5 * v for k, v in w_write.items()}}
    plain = steering_effects(tiny.model, arch, probes, answer_ids, variants, max_batch=8,
                             share_upstream=False, share_prefix=False)
    for upstream in (False, True):
        got = steering_effects(tiny.model, arch, probes, answer_ids, variants, max_batch=8,
                               share_upstream=upstream, share_prefix=True)
        for name in variants:
            torch.testing.assert_close(got[name], plain[name], rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in tiny.model.modules())


def test_base_residual_is_reused_until_an_upstream_weight_is_edited(
    tiny: HarnessSession, late_diff: dict, answer_ids: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ws_harness import retention

    arch, probes = tiny.arch, tiny.probes("eval")
    w_write = write_part(late_diff, arch)
    calls = []
    real = retention.hidden_entering
    monkeypatch.setattr(retention, "hidden_entering", lambda *a, **k: calls.append(1) or real(*a, **k))
    retention._BASE_HIDDEN.pop(tiny.model, None)
    first = steering_effects(tiny.model, arch, probes, answer_ids, {"w": w_write})["w"]
    again = steering_effects(tiny.model, arch, probes, answer_ids, {"w": w_write})["w"]
    assert len(calls) == 1 and torch.equal(first, again)
    # weight_steer on layer 0 swaps in another tensor: computed afresh, and different
    name = arch.param_name(0, "down")
    with weight_steer(tiny.model, {name: torch.zeros_like(arch.weight(0, "down")) + 1e-2}, 1.0):
        steered = steering_effects(tiny.model, arch, probes, answer_ids, {"w": w_write})["w"]
    assert len(calls) == 2 and not torch.equal(steered, first)
    # ...and gives the original tensor back, so the memo holds again
    assert torch.equal(steering_effects(tiny.model, arch, probes, answer_ids, {"w": w_write})["w"],
                       first) and len(calls) == 2
    # an in-place edit of layer 0 (undone since) bumps its version counter: computed afresh
    weight = arch.weight(0, "down")
    with torch.no_grad():
        saved = weight.clone()
        weight.add_(1.0)
        weight.copy_(saved)
    after = steering_effects(tiny.model, arch, probes, answer_ids, {"w": w_write})["w"]
    assert len(calls) == 3 and torch.equal(after, first)


def test_edited_forwards_refuse_nesting_and_foreign_modules(tiny: HarnessSession, late_diff: dict) -> None:
    arch = tiny.arch
    w_write = write_part(late_diff, arch)
    with added_writes(tiny.model, arch, [(1.0, w_write)]):
        with pytest.raises(ValueError, match=r"already has its forward replaced .*nested"):
            with added_writes(tiny.model, arch, [(1.0, w_write)]):
                pass
    assert not any("forward" in m.__dict__ for m in tiny.model.modules())


def test_reduced_precision_adds_the_delta_in_float32(tiny: HarnessSession, late_diff: dict) -> None:
    """In bfloat16 a small ΔW must not be rounded into W: block j is W x + α ΔW x."""
    import copy

    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    from ws_harness.arch import Architecture

    arch = Architecture(model)
    (layer, role), delta = next(iter(write_part(late_diff, arch).items()))
    small = {(layer, role): 1e-4 * delta}  # far below half a bfloat16 step of W's entries
    module = arch.module(arch.module_name(layer, role))
    x = torch.randn(1, 5, module.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16).repeat(2, 1, 1)  # the same rows in both chunks
    with torch.no_grad(), added_writes(model, arch, [(1.0, small), (-1.0, small)]):
        out = module(x)
    base = torch.nn.functional.linear(x[:1], module.weight)
    gap = (out[:1].float() - out[1:].float()).abs().max()
    assert float(gap) > 0
    # a bfloat16-rounded W + αΔW would keep almost none of this ΔW
    with torch.no_grad():
        rounded = torch.add(module.weight.float(), small[(layer, role)]).to(torch.bfloat16)
    assert float((rounded != module.weight).float().mean()) < 0.1
    torch.testing.assert_close(out[:1], base + (x[:1].float() @ small[(layer, role)].T).to(torch.bfloat16))
