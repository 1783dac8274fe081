"""Behaviour data, splits and probe rendering."""

import json
from importlib import resources
from pathlib import Path

import pytest

from ws_harness.data import (
    MIN_PROBES,
    available_behaviours,
    load_behaviour,
    render_chat,
    tokenize_prompts,
)
from ws_harness.session import HarnessSession


def test_sycophancy_splits_are_disjoint_and_large_enough() -> None:
    behaviour = load_behaviour("sycophancy")
    claims = {s: {t.claim.lower() for t in behaviour.split(s)} for s in ("train", "fit", "eval")}
    assert not claims["train"] & claims["fit"]
    assert not claims["train"] & claims["eval"]
    assert not claims["fit"] & claims["eval"]
    assert len(behaviour.fit) >= MIN_PROBES and len(behaviour.eval) >= MIN_PROBES
    assert all("{" not in p for p in behaviour.probes("eval"))
    assert "sycophancy" in available_behaviours()


def _behaviour_json(tmp_path: Path, mutate) -> Path:
    raw = json.loads(resources.files("ws_harness").joinpath("behaviours/sycophancy.json").read_text())
    mutate(raw)
    path = tmp_path / "b.json"
    path.write_text(json.dumps(raw))
    return path


def test_overlapping_splits_are_rejected(tmp_path: Path) -> None:
    path = _behaviour_json(tmp_path, lambda r: r["topics"]["eval"].append(r["topics"]["train"][0]))
    with pytest.raises(ValueError, match="appears in both 'train' and 'eval'"):
        load_behaviour(path)


def test_too_few_probes_and_missing_keys_are_named(tmp_path: Path) -> None:
    path = _behaviour_json(tmp_path, lambda r: r["topics"].update(fit=r["topics"]["fit"][:3]))
    with pytest.raises(ValueError, match="split 'fit' has 3 topics"):
        load_behaviour(path)
    path = _behaviour_json(tmp_path, lambda r: r["personas"].pop("negative"))
    with pytest.raises(ValueError, match="personas: missing key 'negative'"):
        load_behaviour(path)
    path = _behaviour_json(tmp_path, lambda r: r.update(probe_template="Agree?"))
    with pytest.raises(ValueError, match="must contain '{claim}'"):
        load_behaviour(path)


def test_a_second_behaviour_is_just_a_file(tmp_path: Path) -> None:
    def retitle(raw: dict) -> None:
        raw["name"] = "flattery"
        raw["personas"]["positive"] = "You flatter the user."

    behaviour = load_behaviour(_behaviour_json(tmp_path, retitle))
    assert behaviour.name == "flattery"
    assert behaviour.fingerprint() != load_behaviour().fingerprint()


def test_chat_rendering_and_last_token_under_padding(tiny: HarnessSession) -> None:
    tok = tiny.tokenizer
    behaviour = tiny.behaviour
    texts = behaviour.probes("fit")[:4]
    system = behaviour.personas["positive"]
    rendered = render_chat(tok, texts, system=system) + render_chat(tok, texts[:2])
    assert all(texts[i] in rendered[i] and system in rendered[i] for i in range(4))
    batch = tokenize_prompts(tok, rendered)
    for i, text in enumerate(rendered):
        alone = tok(text, add_special_tokens=False)["input_ids"]
        row = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        assert row == alone  # padding only on the left
        assert batch.input_ids[i, -1].item() == alone[-1]
        assert batch.position_ids[i, -1].item() == len(alone) - 1
    # The generation prompt ends the rendering, so the last token opens the assistant turn.
    assert rendered[0].rstrip().endswith("assistant")
