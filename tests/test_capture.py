"""Hooks against output_hidden_states, padding invariance, hook cleanup, token-level capture."""

import pytest
import torch

from ws_harness.capture import capture_last_token, capture_tokens, trace_modules
from ws_harness.data import render_chat, tokenize_prompts
from ws_harness.session import HarnessSession


def test_block_outputs_match_output_hidden_states(tiny: HarnessSession) -> None:
    batch = tiny.probes("fit", "positive").slice(0, 4)
    captured = capture_last_token(tiny.model, tiny.arch, batch)["resid"]
    with torch.no_grad():
        out = tiny.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, output_hidden_states=True)
    # hidden_states[l + 1] is the output of block l, except the last, which is after the final norm.
    for layer in range(tiny.arch.n_layers - 1):
        assert torch.allclose(captured[layer], out.hidden_states[layer + 1][:, -1], atol=1e-5)
    final = tiny.model.model.norm(captured[-1])
    assert torch.allclose(final, out.hidden_states[-1][:, -1], atol=1e-5)


def test_last_token_is_the_same_alone_or_batched_with_longer_prompts(tiny: HarnessSession) -> None:
    tok, behaviour = tiny.tokenizer, tiny.behaviour
    short = render_chat(tok, behaviour.probes("eval")[:1])
    longer = render_chat(tok, behaviour.probes("eval")[1:4], system=behaviour.personas["negative"])
    alone = capture_last_token(tiny.model, tiny.arch, tokenize_prompts(tok, short), mlp=True)
    mixed = capture_last_token(tiny.model, tiny.arch, tokenize_prompts(tok, longer + short), mlp=True)
    for key in ("resid", "up_in", "up_out"):
        assert torch.allclose(alone[key][:, 0], mixed[key][:, -1], atol=1e-4), key
    # Batches of 2 vs one batch of 4 also agree (batch boundaries must not matter).
    chunked = capture_last_token(tiny.model, tiny.arch, tokenize_prompts(tok, longer + short),
                                 batch_size=2)
    assert torch.allclose(chunked["resid"], mixed["resid"], atol=1e-4)


def test_mlp_capture_matches_the_modules(tiny: HarnessSession) -> None:
    batch = tiny.probes("fit").slice(0, 3)
    got = capture_last_token(tiny.model, tiny.arch, batch, mlp=True)
    up = tiny.arch.module(tiny.arch.module_name(1, "up"))
    assert got["up_in"].shape == (3, 3, 64) and got["up_out"].shape == (3, 3, 128)
    assert torch.allclose(up(got["up_in"][1]), got["up_out"][1], atol=1e-5)


def test_hooks_are_removed_even_when_the_forward_raises(tiny: HarnessSession) -> None:
    names = [tiny.arch.layer_name(i) for i in range(tiny.arch.n_layers)]
    before = {n: dict(tiny.arch.module(n)._forward_hooks) for n in names}
    with pytest.raises(RuntimeError, match="boom"):
        with trace_modules(tiny.model, names):
            assert all(len(tiny.arch.module(n)._forward_hooks) == len(before[n]) + 1 for n in names)
            raise RuntimeError("boom")
    assert {n: dict(tiny.arch.module(n)._forward_hooks) for n in names} == before
    with pytest.raises(ValueError, match="no such module"):
        with trace_modules(tiny.model, ["model.layers.99"]):
            pass


def test_token_capture_is_right_aligned_with_normalised_attention(tiny: HarnessSession) -> None:
    batch = tiny.probes("fit", "positive").slice(0, 5)
    got = capture_tokens(tiny.model, tiny.arch, batch, batch_size=2)
    n, width = batch.input_ids.shape
    assert got["resid_tokens"].shape == (3, n, width, 64)
    assert torch.equal(got["mask"], batch.attention_mask)
    sums = got["attn_last"].sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
    assert float(got["attn_last"][:, got["mask"] == 0].abs().max()) < 1e-6  # pads get no attention
    last = capture_last_token(tiny.model, tiny.arch, batch)["resid"]
    assert torch.allclose(got["resid_tokens"][:, :, -1], last, atol=1e-4)
