"""The run's session object: config, cache, and lazily loaded, cached model, probes and captures."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any, Literal

import torch

from ws_harness import capture
from ws_harness.arch import Architecture
from ws_harness.cache import DiskCache
from ws_harness.config import HarnessConfig
from ws_harness.data import Behaviour, ProbeSet, load_behaviour, render_chat, tokenize_prompts
from ws_harness.models import LoadedModel, load_model

__all__ = ["HarnessSession", "Condition", "CaptureKind"]

Condition = Literal["clean", "positive", "negative"]
CaptureKind = Literal["last", "mlp", "tokens"]


class HarnessSession:
    """Everything a run shares; one per pytest process, kept in `config.stash`.

    Expensive artifacts go through the on-disk cache, so under xdist each is computed by one
    worker and read by the others. `timings` records seconds per phase for the benchmark.
    """

    def __init__(self, config: HarnessConfig) -> None:
        self.config = config
        self.cache = DiskCache(config.cache_dir)
        self.timings: dict[str, float] = {}

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start

    # ---- inputs ------------------------------------------------------------------------
    @cached_property
    def loaded(self) -> LoadedModel:
        with self.timed("model"):
            return load_model(self.config.model, self.cache)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @cached_property
    def arch(self) -> Architecture:
        return Architecture(self.model)

    @cached_property
    def behaviour(self) -> Behaviour:
        return load_behaviour(self.config.behaviour)

    def system_prompt(self, condition: Condition) -> str | None:
        if condition == "clean":
            return None
        if condition not in ("positive", "negative"):
            raise ValueError(f"unknown condition {condition!r}; use clean, positive or negative")
        return self.behaviour.personas[condition]

    def probes(self, split: str, condition: Condition = "clean") -> ProbeSet:
        """Chat-rendered probe prompts of a split under a condition (no system / a persona)."""
        rendered = render_chat(
            self.tokenizer, self.behaviour.probes(split), self.system_prompt(condition)
        )
        return tokenize_prompts(self.tokenizer, rendered)

    # ---- captures ----------------------------------------------------------------------
    def cache_parts(self, **extra: Any) -> dict[str, Any]:
        """Key parts shared by every model-dependent artifact."""
        return {
            "model": self.config.model,
            "model_fingerprint": self.loaded.fingerprint,
            "behaviour": self.behaviour.fingerprint(),
            **extra,
        }

    def capture(
        self, split: str, condition: Condition, kind: CaptureKind = "last"
    ) -> dict[str, torch.Tensor]:
        """Cached captures of the base model (SPEC §3); see ws_harness.capture for the keys."""
        producers: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
            "last": lambda: capture.capture_last_token(self.model, self.arch, probes),
            "mlp": lambda: capture.capture_last_token(self.model, self.arch, probes, mlp=True),
            "tokens": lambda: capture.capture_tokens(self.model, self.arch, probes),
        }
        if kind not in producers:
            raise ValueError(f"unknown capture kind {kind!r}; use one of {sorted(producers)}")
        probes = self.probes(split, condition)
        with self.timed("captures"):
            return self.cache.get_or_build_tensors(
                "capture",
                self.cache_parts(split=split, condition=condition, kind=kind,
                                 batch_size=capture.BATCH_SIZE),
                producers[kind],
                producer=capture.capture_last_token,
            )
