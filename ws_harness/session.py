"""The harness inputs of one process: config, cache, and lazily loaded model, captures, diffs, labels."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import torch

from ws_harness import capture
from ws_harness.arch import Architecture
from ws_harness.cache import DiskCache, worker_order
from ws_harness.config import HarnessConfig
from ws_harness.data import Behaviour, ProbeSet, load_behaviour, render_chat, tokenize_prompts
from ws_harness.device import Placement, resolve_placement
from ws_harness.models import (
    LoadedModel,
    ModelIdentity,
    load_model,
    load_model_tokenizer,
    model_identity,
)
from ws_harness.shape import ModelShape

if TYPE_CHECKING:
    from ws_harness.diffs import Diff
    from ws_harness.steering import SteeringCurve

__all__ = [
    "HarnessSession", "InputError", "Condition", "CaptureKind", "ATTRIBUTION_NODES",
    "check_rank", "max_rank",
]

# Gauss–Legendre nodes of the path average θ + t·w, t ∈ [−1, 1]. Measured on the default
# model's seed-0 diff: 4 nodes miss S(w) by 28 %, 8 by 3.5 %, 16 by 0.1 % (at ~4 s per node);
# the error is reported per diff (inputs.json, conclusion.md).
ATTRIBUTION_NODES = 8

Condition = Literal["clean", "positive", "negative"]
CaptureKind = Literal["last", "mlp", "tokens"]


class InputError(ValueError):
    """An input of the run (model, behaviour, rank, diff) is unusable; reported once per run."""


def check_family_dtype(family: str, placement: Placement) -> None:
    """Only LoRA diffs build in reduced precision (theirs come from the factors, in float32)."""
    if family != "lora" and placement.dtype != "float32":
        raise InputError(f"building {family} diffs needs float32 forwards: their delta is merged − "
                         f"base, which {placement.dtype} rounding swamps; pass --ws-dtype float32 "
                         "(or build LoRA diffs)")


def max_rank(d_model: int) -> int:
    """The largest k a run may use: d/4, so a random k-subspace leaves R room (R ≤ d/k = 4 at the
    bound) and a union of three rank-k bases still fits in d."""
    return max(1, d_model // 4)


def check_rank(config: HarnessConfig, d_model: int) -> None:
    """Refuse a rank that leaves no room for a null (every basis would be the whole space)."""
    bound = max_rank(d_model)
    if config.rank > bound:
        source = config.sources.get("rank", "the default rank")
        raise InputError(
            f"{source}: rank {config.rank} is too large for model {config.model!r} "
            f"(d_model = {d_model}): k must be at most d/4 = {bound} to leave room for a "
            f"random-subspace null; pass --ws-rank {bound} or less"
        )


class HarnessSession:
    """Everything a run shares; one per pytest process, kept in `config.stash`.

    Expensive artifacts go through the on-disk cache, so under xdist each is computed by one
    worker and read by the others. `timings` records seconds per phase for the benchmark.
    """

    def __init__(self, config: HarnessConfig) -> None:
        self.config = config
        self.cache = DiskCache(config.cache_dir)
        self.timings: dict[str, float] = {}
        self._timer_stack: list[list[float]] = []
        self._diffs: list[Diff] | None = None  # the run's diffs, once loaded/built and checked
        self._labels: dict[str, dict[str, torch.Tensor]] = {}  # diff sha256 → labels
        self._attribution: dict[str, dict[str, torch.Tensor]] = {}  # diff sha256 → C matrices
        self._probes: dict[tuple[str, str], ProbeSet] = {}

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the block's wall seconds to timings[phase] and its CPU seconds (this process,
        every thread) to timings[phase + '.cpu']: waiting on a lock costs wall, not CPU.

        Exclusive: a timed block inside another (scores building the labels it needs) counts
        for its own phase only, so the phases add up to the time spent instead of counting
        nested work twice.
        """
        start, cpu = time.perf_counter(), time.process_time()
        nested = [0.0, 0.0]  # wall, CPU of the timed blocks inside this one
        self._timer_stack.append(nested)
        try:
            yield
        finally:
            self._timer_stack.pop()
            wall, used = time.perf_counter() - start, time.process_time() - cpu
            self.timings[phase] = self.timings.get(phase, 0.0) + wall - nested[0]
            key = f"{phase}.cpu"
            self.timings[key] = self.timings.get(key, 0.0) + used - nested[1]
            if self._timer_stack:
                self._timer_stack[-1][0] += wall
                self._timer_stack[-1][1] += used

    # ---- inputs ------------------------------------------------------------------------
    # A warm run (every result cached) needs the model's identity, shape, prompts and answer
    # ids, each a small cache entry, and never its weights: `loaded`, `model` and `arch` load
    # them only when something must be computed.
    @cached_property
    def identity(self) -> ModelIdentity:
        """Spec, fingerprint and source of the model, found without loading its weights."""
        return model_identity(self.config.model, self.cache)

    @cached_property
    def loaded(self) -> LoadedModel:
        with self.timed("model"):
            loaded = load_model(self.config.model, self.cache)
        if loaded.fingerprint != self.identity.fingerprint:
            raise InputError(f"model {self.config.model!r}: its weights' fingerprint "
                             f"{loaded.fingerprint[:12]} is not the {self.identity.fingerprint[:12]} "
                             "its files announced; did they change during the run?")
        return loaded

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        if "loaded" in self.__dict__:
            return self.loaded.tokenizer
        return self._tokenizer

    @cached_property
    def _tokenizer(self) -> Any:
        with self.timed("model"):
            return load_model_tokenizer(self.config.model, self.cache)

    @cached_property
    def shape(self) -> ModelShape:
        """Layers, widths and parameter shapes (cached per model: no weights on a warm run)."""
        from ws_harness.diffs import model_param_shapes

        def build() -> dict[str, Any]:
            model = self.model
            return {"config": json.loads(model.config.to_json_string()),
                    "param_shapes": model_param_shapes(model)}

        meta = self.cache.get_or_build_json("model_shape", self.model_key(), build,
                                            producer=(model_param_shapes, ModelShape.from_config))
        return ModelShape.from_config(meta["config"], meta["param_shapes"])

    @cached_property
    def arch(self) -> Architecture:
        arch = Architecture(self.model)
        if arch.param_shapes() != self.shape.param_shapes():
            raise InputError(f"model {self.config.model!r}: its loaded parameter shapes differ "
                             "from those recorded in the cache (model_shape); clear that entry")
        return arch

    @cached_property
    def placement(self) -> Placement:
        """Device and dtype of model forwards (--ws-device, --ws-dtype), resolved on this machine."""
        try:
            return resolve_placement(self.config.device, self.config.dtype)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    @cached_property
    def _forward(self) -> tuple[torch.nn.Module, Architecture]:
        if self.placement.is_default:
            return self.model, self.arch
        # A copy: bases and targets keep reading the float32 CPU weights, whatever runs forwards.
        with self.timed("model"):
            model = copy.deepcopy(self.model).to(device=self.placement.torch_device,
                                                   dtype=self.placement.torch_dtype).eval()
        return model, Architecture(model)

    @property
    def forward_model(self) -> torch.nn.Module:
        """The model that runs forwards (captures, steering, training, attribution, retention):
        the loaded model itself on float32 CPU, else a copy on the configured device and dtype."""
        return self._forward[0]

    @property
    def forward_arch(self) -> Architecture:
        return self._forward[1]

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
        """Chat-rendered probe prompts of a split under a condition (no system / a persona),
        tokenized once per model and behaviour and cached (a warm run loads no tokenizer)."""
        memo = (split, condition)
        if memo not in self._probes:
            system = self.system_prompt(condition)

            def build() -> dict[str, Any]:
                rendered = render_chat(self.tokenizer, self.behaviour.probes(split), system)
                probes = tokenize_prompts(self.tokenizer, rendered)
                return {"texts": probes.texts, "input_ids": probes.input_ids.tolist(),
                        "attention_mask": probes.attention_mask.tolist()}

            got = self.cache.get_or_build_json(
                "prompts", self.cache_parts(split=split, condition=condition), build,
                producer=(render_chat, tokenize_prompts, load_model_tokenizer))
            self._probes[memo] = ProbeSet(
                list(got["texts"]), torch.tensor(got["input_ids"], dtype=torch.long),
                torch.tensor(got["attention_mask"], dtype=torch.long))
        return self._probes[memo]

    def preflight(self) -> None:
        """Check every input a run needs before any item runs; raises InputError naming it.

        Model (loads, has a chat template), behaviour data, the rank against the model's width,
        and diff files (read and validated; built diffs are checked when they are built).
        """
        cfg = self.config
        steps: list[tuple[str, Callable[[], Any]]] = [
            (f"--ws-device {cfg.device} --ws-dtype {cfg.dtype}", lambda: self.placement),
            (f"--ws-adapter {cfg.adapter}", lambda: cfg.builds_diffs and check_family_dtype(
                cfg.adapter, self.placement)),
            (f"model {cfg.model!r}", lambda: self.shape),
            # Loading the model to record its shape (a cold run) costs nothing more to check
            # its architecture (GQA layout, norms, lm_head) here, once, instead of per item.
            (f"model {cfg.model!r}", lambda: self.arch if "loaded" in self.__dict__ else None),
            (f"behaviour {cfg.behaviour!r}", lambda: self.behaviour.probes("fit")),
            (f"model {cfg.model!r}", lambda: self.probes("fit")),  # the chat template renders
            (f"rank {cfg.rank}", lambda: check_rank(cfg, self.shape.d_model)),
        ]
        if cfg.adapter_diffs:
            from ws_harness.adapters import read_adapter_config

            steps += [(f"adapter folder {folder}", lambda folder=folder: read_adapter_config(folder))
                      for pair in cfg.diff  # type: ignore[union-attr]
                      for _, folder in pair.sides()]
        elif not cfg.builds_diffs:
            from ws_harness.diffs import load_diff

            steps += [(f"diff file {path}", lambda path=path: load_diff(path, self.shape.shapes))
                      for path in cfg.diff]  # type: ignore[union-attr]
        for what, check in steps:
            try:
                check()
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure here is that input's
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise InputError(f"{what}: {type(exc).__name__}: {detail}") from exc

    # ---- captures ----------------------------------------------------------------------
    def model_key(self) -> dict[str, Any]:
        """What identifies the model's weights in cache keys."""
        return {"model": self.config.model, "model_fingerprint": self.identity.fingerprint,
                **self.placement.key()}

    def cache_parts(self, **extra: Any) -> dict[str, Any]:
        """Key parts shared by every model-dependent artifact."""
        return {**self.model_key(), "behaviour": self.behaviour.fingerprint(), **extra}

    def capture(
        self, split: str, condition: Condition, kind: CaptureKind = "last"
    ) -> dict[str, torch.Tensor]:
        """Cached captures of the base model (SPEC §3); see ws_harness.capture for the keys."""
        producers: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
            "last": lambda: capture.capture_last_token(self.forward_model, self.forward_arch, probes),
            "mlp": lambda: capture.capture_last_token(self.forward_model, self.forward_arch, probes,
                                                      mlp=True),
            "tokens": lambda: capture.capture_tokens(self.forward_model, self.forward_arch, probes),
        }
        if kind not in producers:
            raise ValueError(f"unknown capture kind {kind!r}; use one of {sorted(producers)}")
        probes = self.probes(split, condition)
        with self.timed("captures"):
            return self.cache.get_or_build_tensors(
                "capture", self._capture_parts(split, condition, kind), producers[kind],
                producer=capture.capture_last_token,
            )

    def _capture_parts(self, split: str, condition: Condition, kind: CaptureKind) -> dict[str, Any]:
        return self.cache_parts(split=split, condition=condition, kind=kind,
                                batch_size=capture.BATCH_SIZE)

    def capture_key(self, split: str, condition: Condition, kind: CaptureKind) -> str:
        """The cache key of a capture: a fingerprint of the data it holds, without loading it."""
        return self.cache.key("capture", self._capture_parts(split, condition, kind),
                              capture.capture_last_token)

    # ---- diffs and labels (SPEC §2.3, §3) ----------------------------------------------
    @cached_property
    def answer_ids(self) -> tuple[int, int]:
        """First-token ids of the verdict words, positive then negative (SmolLM2: 10539, 5230)."""
        from ws_harness.steering import answer_token_ids

        answers = self.behaviour.answer_tokens
        got = self.cache.get_or_build_json(
            "answer_ids", self.cache_parts(answer_tokens=dict(answers)),
            lambda: list(answer_token_ids(self.tokenizer, answers)),
            producer=(answer_token_ids, load_model_tokenizer))
        return int(got[0]), int(got[1])

    def build_diff(
        self, seed: int, recipe: str | None = None, hparams: Any = None, *,
        progress: bool = True, use_cache: bool = True, family: str | None = None,
    ) -> Diff:
        """`lora.build_diff` on this session's model and behaviour, cached in its cache;
        `family` (default: the configured adapter family) picks PEFT's config."""
        from ws_harness.lora import DEFAULT_RECIPE, build_diff, cached_diff

        if use_cache:
            found = cached_diff(self.cache, self.model_key(), self.behaviour, seed,
                                recipe or DEFAULT_RECIPE, hparams, family or self.config.adapter)
            if found is not None:
                return found
        return build_diff(
            self.forward_model, self.tokenizer, self.forward_arch, self.behaviour, seed,
            recipe or DEFAULT_RECIPE, hparams, cache=self.cache if use_cache else None,
            model_key=self.model_key(), progress=progress, family=family or self.config.adapter,
        )

    def diffs(self) -> list[Diff]:
        """The run's diffs in `config.diff_plan()` order, each named as there: built per seed
        (default recipe, cached) when config.diff == "build", else loaded and validated from the
        files. Every one must steer (SPEC §2.3), else DiffDoesNotSteerError names it."""
        from dataclasses import replace as _replace

        from ws_harness.diffs import load_diff
        from ws_harness.steering import check_steers

        if self._diffs is not None:
            return list(self._diffs)
        with self.timed("diffs"):
            if self.config.builds_diffs:
                seeds = list(self.config.seeds)
                built = {seed: self.build_diff(seed) for seed in worker_order(seeds)}
                diffs = [built[seed] for seed in seeds]
            elif self.config.adapter_diffs:
                from ws_harness.adapters import load_adapter_diffs

                diffs = load_adapter_diffs(self.config.diff, self.model, self.arch,
                                           cache=self.cache, model_key=self.model_key(),
                                           expected_base=self.config.model)
            else:
                diffs = [load_diff(path, self.shape.shapes) for path in self.config.diff]
            names = [name for name, _ in self.config.diff_plan()]
            diffs = [_replace(d, name=n) for d, n in zip(diffs, names, strict=True)]
            for diff in diffs:
                check_steers(self.steering(diff), diff.name)
        self._diffs = diffs
        return list(diffs)

    def steering(self, diff: Diff) -> SteeringCurve:
        """SteeringCurve of a diff on EVAL prompts (no system prompt), cached as JSON by sha256."""
        from ws_harness.steering import ALPHAS, SteeringCurve, steering_curve  # noqa: F811

        with self.timed("diffs"):
            data = self.cache.get_or_build_json(
                "steering",
                self.cache_parts(diff=diff.sha256, alphas=list(ALPHAS),
                                 answer_ids=list(self.answer_ids)),
                lambda: steering_curve(self.forward_model, self.probes("eval"), diff.w,
                                       self.answer_ids).to_json(),
                producer=steering_curve,
            )
        return SteeringCurve.from_json(data)

    def attribution(self, diff: Diff) -> dict[str, torch.Tensor]:
        """Linear attribution of a diff (SPEC §4.1), cached by its sha256.

        {"write{l}": C_l of the residual writes, "read{l}": C_l of the read deltas (d×d, float64,
        for the layers the diff touches), "s_linear": 2·Σ⟨Ḡ, Δ⟩, "s_measured": S(w),
        "n_nodes": quadrature nodes}, from path-averaged gradients on EVAL prompts.
        """
        from ws_harness import attribution

        if diff.sha256 in self._attribution:
            return self._attribution[diff.sha256]
        deltas = {parsed: t.float() for name, t in diff.w.items()
                  if (parsed := self.shape.parse_param_name(name)) is not None}

        def build() -> dict[str, torch.Tensor]:
            # Runs on one thread (the cache builds every entry so): the gradients' reduction
            # order then does not depend on which process built the entry.
            # S(w) itself is the steering check's ±1 contrast: no second measurement.
            grads = attribution.path_gradients(
                self.forward_model, self.forward_arch, self.probes("eval"), self.answer_ids, diff.w,
                n_nodes=ATTRIBUTION_NODES, measure=False)
            out: dict[str, torch.Tensor] = {}
            for side in ("write", "read"):
                Cs = attribution.causal_matrices(deltas, grads.grads, self.arch.n_layers, side,
                                                 read_gains=self._read_gains(deltas))
                out.update({f"{side}{l}": C.double() for l, C in enumerate(Cs) if C is not None})
            out["s_linear"] = torch.tensor(float(grads.s_linear), dtype=torch.float64)
            out["s_measured"] = torch.tensor(self.steering(diff).effect, dtype=torch.float64)
            out["n_nodes"] = torch.tensor(int(grads.n_nodes))
            return out

        with self.timed("attribution"):
            self._attribution[diff.sha256] = self.cache.get_or_build_tensors(
                "attribution",
                self.cache_parts(diff=diff.sha256, n_nodes=ATTRIBUTION_NODES,
                                 answer_ids=list(self.answer_ids)),
                build, producer=attribution.path_gradients,
            )
        return self._attribution[diff.sha256]

    def _read_gains(self, deltas: Any) -> dict[tuple[int, str], torch.Tensor]:
        """γ of the RMSNorm each touched read role reads through (attn for q/k/v, mlp else)."""
        from ws_harness.arch import NORM_OF_ROLE

        return {(l, r): self.arch.norm_gain(l, NORM_OF_ROLE[r]).detach().clone()
                for (l, r) in deltas if r in NORM_OF_ROLE}

    def forget_loaded(self) -> None:
        """Drop the in-memory diffs and labels (reloaded from the cache on next use)."""
        self._diffs = None
        self._labels.clear()

    def labels(self, diff: Diff) -> dict[str, torch.Tensor]:
        """B-side labels (SPEC §3): label[l] = h(α=+1) − h(α=−1), the residual after block l at
        the last prompt token, no system prompt: {"eval": [L, n_eval, d], "fit": [L, n_fit, d]}."""
        from ws_harness.diffs import weight_steer

        memo = self._labels
        if diff.sha256 in memo:
            return memo[diff.sha256]

        def build() -> dict[str, torch.Tensor]:
            out = {}
            for split in ("eval", "fit"):
                probes = self.probes(split)
                resid = {}
                for alpha in (1.0, -1.0):
                    with weight_steer(self.forward_model, diff.w, alpha):
                        got = capture.capture_last_token(self.forward_model, self.forward_arch,
                                                         probes)
                    resid[alpha] = got["resid"]
                out[split] = (resid[1.0] - resid[-1.0]).contiguous()
            return out

        with self.timed("labels"):
            memo[diff.sha256] = self.cache.get_or_build_tensors(
                "labels",
                self.cache_parts(diff=diff.sha256, alphas=[1.0, -1.0],
                                 batch_size=capture.BATCH_SIZE),
                build,
                # what computes them (weight_steer applies the diff; the diff is in the key)
                producer=(capture.capture_last_token, weight_steer),
            )
        return memo[diff.sha256]
