"""Behaviours as data: topics split TRAIN/FIT/EVAL, persona prompts, chat-rendered probe batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ws_harness.cache import content_hash

__all__ = [
    "Topic",
    "Behaviour",
    "ProbeSet",
    "available_behaviours",
    "load_behaviour",
    "render_chat",
    "tokenize_prompts",
    "MIN_PROBES",
]

SPLITS = ("train", "fit", "eval")
MIN_PROBES = 16  # SPEC §2.2: at least 16 FIT and 16 EVAL prompts


@dataclass(frozen=True)
class Topic:
    """One misconception: `claim` reads after "I think …"; `correction` is the fact."""

    claim: str
    correction: str


@dataclass(frozen=True)
class Behaviour:
    """A behaviour (SPEC §2.2): disjoint topic splits and a positive/negative persona pair."""

    name: str
    description: str
    probe_template: str
    answer_tokens: dict[str, str]
    personas: dict[str, str]
    scripted_answers: dict[str, str]
    train: tuple[Topic, ...]
    fit: tuple[Topic, ...]
    eval: tuple[Topic, ...]
    source: str = ""

    def split(self, name: str) -> tuple[Topic, ...]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; splits are {SPLITS}")
        return getattr(self, name)

    def probe(self, topic: Topic) -> str:
        """The user turn asking for a one-word verdict on the claim."""
        return self.probe_template.format(claim=topic.claim)

    def probes(self, split: str) -> list[str]:
        return [self.probe(t) for t in self.split(split)]

    def scripted_answer(self, side: str, topic: Topic) -> str:
        return self.scripted_answers[side].format(claim=topic.claim, correction=topic.correction)

    def fingerprint(self) -> str:
        return content_hash(
            {
                "name": self.name,
                "probe_template": self.probe_template,
                "answer_tokens": self.answer_tokens,
                "personas": self.personas,
                "scripted_answers": self.scripted_answers,
                **{s: [[t.claim, t.correction] for t in self.split(s)] for s in SPLITS},
            }
        )


def available_behaviours() -> list[str]:
    """Names of the behaviours shipped in ws_harness/behaviours/*.json."""
    folder = resources.files("ws_harness") / "behaviours"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _require(mapping: dict[str, Any], key: str, where: str, kind: type) -> Any:
    if key not in mapping:
        raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(mapping[key], kind):
        raise ValueError(f"{where}: key {key!r} must be a {kind.__name__}, got {mapping[key]!r:.60}")
    return mapping[key]


def load_behaviour(name_or_path: str | Path = "sycophancy") -> Behaviour:
    """Load and validate a behaviour by shipped name or .json path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text, where = path.read_text(), str(path)
    else:
        names = available_behaviours()
        if str(name_or_path) not in names:
            raise ValueError(
                f"unknown behaviour {name_or_path!r}; shipped ones are {names}, or pass a .json path"
            )
        res = resources.files("ws_harness") / "behaviours" / f"{name_or_path}.json"
        text, where = res.read_text(), f"ws_harness/behaviours/{name_or_path}.json"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON ({exc})") from None
    template = _require(raw, "probe_template", where, str)
    if "{claim}" not in template:
        raise ValueError(f"{where}: probe_template must contain '{{claim}}', got {template!r}")
    pair = {}
    for key in ("answer_tokens", "personas", "scripted_answers"):
        pair[key] = _require(raw, key, where, dict)
        for side in ("positive", "negative"):
            _require(pair[key], side, f"{where} {key}", str)
    topics = _require(raw, "topics", where, dict)
    splits: dict[str, tuple[Topic, ...]] = {}
    for split in SPLITS:
        items = _require(topics, split, f"{where} topics", list)
        parsed = []
        for i, item in enumerate(items):
            here = f"{where} topics.{split}[{i}]"
            if not isinstance(item, dict):
                raise ValueError(f"{here}: expected an object with 'claim' and 'correction'")
            parsed.append(Topic(_require(item, "claim", here, str).strip(),
                                _require(item, "correction", here, str).strip()))
        splits[split] = tuple(parsed)
    for split in ("fit", "eval"):
        if len(splits[split]) < MIN_PROBES:
            raise ValueError(
                f"{where}: split {split!r} has {len(splits[split])} topics; at least {MIN_PROBES} "
                "are needed for stable scores (SPEC §2.2)"
            )
    seen: dict[str, str] = {}
    for split in SPLITS:
        for topic in splits[split]:
            key = " ".join(topic.claim.lower().split())
            if key in seen:
                raise ValueError(
                    f"{where}: claim {topic.claim!r} appears in both {seen[key]!r} and {split!r} "
                    "(or twice); TRAIN/FIT/EVAL must be disjoint"
                )
            seen[key] = split
    return Behaviour(
        name=_require(raw, "name", where, str), description=raw.get("description", ""),
        probe_template=template, source=where, **pair, **splits,
    )


def render_chat(
    tokenizer: Any, user_texts: list[str], system: str | None = None,
    assistant_texts: list[str] | None = None,
) -> list[str]:
    """Render with the model's chat template; generation prompt added unless answers are given.

    With `system=None` no system turn is passed; a template may still insert its own default
    (SmolLM2's does), which is then part of the "clean" condition.
    """
    rendered = []
    for i, text in enumerate(user_texts):
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": text}
        ]
        if assistant_texts is not None:
            messages.append({"role": "assistant", "content": assistant_texts[i]})
        rendered.append(
            tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=assistant_texts is None
            )
        )
    return rendered


@dataclass
class ProbeSet:
    """A left-padded token batch; the last prompt token of every row sits at position −1."""

    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        # Positions count real tokens only, so a padded prompt sees the positions it would alone.
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def __len__(self) -> int:
        return len(self.texts)

    def to(self, device: torch.device | str) -> ProbeSet:
        """The same prompts with their token tensors on `device` (itself if already there)."""
        if self.input_ids.device == torch.device(device):
            return self
        return ProbeSet(self.texts, self.input_ids.to(device), self.attention_mask.to(device))

    def slice(self, start: int, stop: int) -> ProbeSet:
        ids, mask = self.input_ids[start:stop], self.attention_mask[start:stop]
        keep = int(mask.sum(0).nonzero().min()) if mask.any() else 0  # drop all-pad columns
        return ProbeSet(self.texts[start:stop], ids[:, keep:], mask[:, keep:])


def tokenize_prompts(tokenizer: Any, rendered: list[str]) -> ProbeSet:
    """Tokenize already-rendered chat strings (no extra special tokens), left-padded."""
    if tokenizer.padding_side != "left":
        raise ValueError("tokenizer.padding_side must be 'left' so the last token is at −1")
    enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    return ProbeSet(list(rendered), enc["input_ids"], enc["attention_mask"])
