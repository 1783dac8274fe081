"""Building diffs (SPEC §2.3): training-data recipes, a PEFT adapter per side, merge, w = Δ⁺ − Δ⁻.

The adapter family (`FAMILIES`: lora, dora, pissa, oft, ia3) is PEFT's own config for each; the
default `lora` path is the original one (Δ = scale·B·A read off the LoRA factors), bit-identical
to before; the other families are merged with PEFT and read as merged − base
(`ws_harness.adapters.merged_deltas`), which is right whatever the family does when it merges.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ws_harness import progress as run_progress
from ws_harness.arch import ROLES, Architecture
from ws_harness.cache import DiskCache, content_hash
from ws_harness.data import Behaviour, render_chat, tokenize_prompts
from ws_harness.device import model_device
from ws_harness.diffs import Diff, diff_diagnostics, diff_sha256

__all__ = [
    "RECIPES",
    "DEFAULT_RECIPE",
    "FAMILIES",
    "DEFAULT_FAMILY",
    "OFT_BLOCK_SIZE",
    "SIDES",
    "LoraHParams",
    "Example",
    "default_hparams",
    "resolve_hparams",
    "side_seed",
    "target_modules",
    "peft_config",
    "recipe_examples",
    "train_side",
    "lora_deltas",
    "build_diff",
]

SIDES = ("positive", "negative")
RECIPES = ("scripted", "distilled", "generated")
# Chosen by benchmarks/compare_recipes.py (numbers in benchmarks/recipes.md): on the embedded
# 135M model only the scripted recipe steers strongly and on every seed; the persona prompts
# barely move its verdict logits, so distilled diffs do not steer and generated ones only weakly.
DEFAULT_RECIPE = "scripted"
# Adapter families, each built with PEFT's own config (peft_config below).
FAMILIES = ("lora", "dora", "pissa", "oft", "ia3")
DEFAULT_FAMILY = "lora"
# OFT block size: divides every input width of the shipped models (64, 96, 128 on the random
# presets; 576, 1536 on SmolLM2-135M; 1024, 2048, 3072 on Qwen3-0.6B). OFT ignores `rank`.
OFT_BLOCK_SIZE = 32


@dataclass(frozen=True)
class LoraHParams:
    """LoRA and training settings of one side. All of them key the diff cache entry.

    Targets: roles × layers round(layer_lo·n) … round(layer_hi·n)−1 (SPEC §2.3).
    `max_new_tokens`: length of the persona replies (generated, distilled); `distill_positions`:
    reply positions whose next-token distribution the distilled recipe matches.
    `paired_init`: both sides start from the same LoRA init and see the topics in the same
    order (a controlled pair), so what both learn alike cancels in w = Δ⁺ − Δ⁻; with
    independent inits Δ⁺ and Δ⁻ live in unrelated random row spaces and never cancel.
    """

    rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 1e-3
    steps: int = 24
    batch_size: int = 4
    weight_decay: float = 0.0
    layer_lo: float = 0.3
    layer_hi: float = 0.8
    roles: tuple[str, ...] = tuple(ROLES)
    max_new_tokens: int = 24
    distill_positions: int = 8
    paired_init: bool = True

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size", "max_new_tokens", "distill_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LoraHParams.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.paired_init, bool):
            raise ValueError(f"LoraHParams.paired_init must be a bool, got {self.paired_init!r}")
        if not self.lr > 0:
            raise ValueError(f"LoraHParams.lr must be positive, got {self.lr!r}")
        if not 0 <= self.layer_lo < self.layer_hi <= 1:
            raise ValueError(
                f"LoraHParams.layer_lo/layer_hi must satisfy 0 ≤ lo < hi ≤ 1, got "
                f"{self.layer_lo!r}, {self.layer_hi!r}"
            )
        unknown = [r for r in self.roles if r not in ROLES]
        if unknown or not self.roles:
            raise ValueError(f"LoraHParams.roles {self.roles!r}: roles are {sorted(ROLES)}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["roles"] = list(self.roles)
        return out


# Per-recipe defaults, from benchmarks/recipes.md. Scripted: 16 steps of batch 4 per side give
# effects of 11–14 logits (p ≤ 2e-19) on seeds 0–2 in 40–55 s per seed on 2 idle cores. The
# persona recipes share the settings so that the comparison isolates the training data.
_DEFAULTS: dict[str, LoraHParams] = {
    "scripted": LoraHParams(steps=16, lr=1e-3),
    "distilled": LoraHParams(steps=16, lr=1e-3),
    "generated": LoraHParams(steps=16, lr=1e-3),
}


# Per-family overrides of the recipe defaults (benchmarks/bench_families.py). LoRA, DoRA and PiSSA
# share LoRA's settings; IA3 trains one scaling vector per module and OFT a small rotation per
# block, so both need a far larger learning rate to move the verdict in the same 16 steps.
_FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "lora": {},
    "dora": {},
    "pissa": {},
    "oft": {"lr": 1e-2},
    "ia3": {"lr": 3e-2},
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown adapter family {family!r}; choose one of {list(FAMILIES)}")


def default_hparams(recipe: str = DEFAULT_RECIPE, family: str = DEFAULT_FAMILY) -> LoraHParams:
    """The measured default hyper-parameters of a recipe (and adapter family)."""
    _check_recipe(recipe)
    _check_family(family)
    return replace(_DEFAULTS[recipe], **_FAMILY_OVERRIDES[family])


def resolve_hparams(
    recipe: str, hparams: LoraHParams | Mapping[str, Any] | None = None,
    family: str = DEFAULT_FAMILY,
) -> LoraHParams:
    """A full LoraHParams: the recipe's (and family's) defaults, overridden by a mapping of values."""
    base = default_hparams(recipe, family)
    if hparams is None:
        return base
    if isinstance(hparams, LoraHParams):
        return hparams
    known = {f.name for f in fields(LoraHParams)}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ValueError(f"unknown LoRA hyper-parameter(s) {unknown}; known: {sorted(known)}")
    values = dict(hparams)
    if "roles" in values:
        values["roles"] = tuple(values["roles"])
    return replace(base, **values)


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown diff recipe {recipe!r}; choose one of {list(RECIPES)}")


def side_seed(seed: int, side: str) -> int:
    """A 31-bit seed per (diff seed, side) from sha256, never Python's salted hash().
    Paired builds use side "paired" for both sides."""
    return int(content_hash(["ws-harness lora", int(seed), side])[:8], 16) & 0x7FFFFFFF


def target_modules(arch: Architecture, hp: LoraHParams) -> list[str]:
    """Full module names of the LoRA targets (SPEC §2.3: q,k,v,o,gate,up,down, middle layers)."""
    layers = arch.touched_layer_range(hp.layer_lo, hp.layer_hi)
    if len(layers) == 0:
        raise ValueError(
            f"layers round({hp.layer_lo}·{arch.n_layers}) … round({hp.layer_hi}·{arch.n_layers})−1 "
            "is empty; widen layer_lo/layer_hi"
        )
    return [arch.module_name(layer, role) for layer in layers for role in hp.roles]


def peft_config(family: str, hp: LoraHParams, names: list[str]) -> Any:
    """PEFT's own config of an adapter family on the target modules `names`.

    lora: LoraConfig (A Kaiming-uniform, B zero); dora: the same with use_dora=True (magnitude
    vector = the weights' column norms); pissa: init_lora_weights="pissa" (A, B from the top-r
    SVD of each weight, which PEFT subtracts from the base copy); oft: OFTConfig with block size
    OFT_BLOCK_SIZE (identity rotation at init); ia3: IA3Config (ones at init), down_proj as the
    feed-forward module whose *input* is scaled. Dropout 0 and no bias training everywhere, so the
    adapters change exactly the seven roles' weights.
    """
    from peft import IA3Config, LoraConfig, OFTConfig

    _check_family(family)
    if family in ("lora", "dora", "pissa"):
        return LoraConfig(
            r=hp.rank, lora_alpha=hp.lora_alpha, lora_dropout=0.0, bias="none",
            target_modules=names, init_lora_weights="pissa" if family == "pissa" else True,
            use_dora=family == "dora",
        )
    if family == "oft":
        return OFTConfig(
            r=0, oft_block_size=OFT_BLOCK_SIZE, module_dropout=0.0, bias="none",
            target_modules=names, init_weights=True,
        )
    down = ROLES["down"]
    return IA3Config(
        target_modules=names, feedforward_modules=[n for n in names if n.endswith(down)],
        init_ia3_weights=True,
    )


# ---- training data ---------------------------------------------------------------------------
@dataclass
class Example:
    """One training sequence: prompt (no system prompt) + assistant reply.

    `positions` index the inputs whose next token is a reply token (the loss lives only there);
    `targets` are those next tokens; `teacher_logp` [len(positions), V] (distilled only) is the
    persona-prompted base model's log-distribution at the same reply positions.
    """

    input_ids: list[int]
    positions: list[int]
    targets: list[int]
    teacher_logp: torch.Tensor | None = field(default=None, repr=False)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _reply_ids(tokenizer: Any, user: str, reply: str) -> list[int]:
    """The assistant turn's tokens as the chat template closes it (end-of-turn token included,
    anything the template appends after it dropped)."""
    prompt = render_chat(tokenizer, [user])[0]
    full = render_chat(tokenizer, [user], assistant_texts=[reply])[0]
    if full.startswith(prompt):
        ids = _encode(tokenizer, full[len(prompt):])
    else:  # a template that rewrites earlier turns: reply text + end-of-turn token
        ids = _encode(tokenizer, reply) + [tokenizer.eos_token_id]
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    return ids


def _example(prompt_ids: list[int], reply: list[int], limit: int | None = None) -> Example:
    n = len(reply) if limit is None else min(limit, len(reply))
    start = len(prompt_ids) - 1  # the last prompt token predicts the first reply token
    return Example(
        input_ids=prompt_ids + reply,
        positions=list(range(start, start + n)),
        targets=reply[:n],
    )


@torch.no_grad()
def _persona_replies(
    model: Any, tokenizer: Any, users: list[str], system: str, max_new_tokens: int
) -> list[list[int]]:
    """Greedy replies under the persona system prompt, cut after the first end-of-turn token."""
    probes = tokenize_prompts(tokenizer, render_chat(tokenizer, users, system)).to(
        model_device(model))
    out = model.generate(
        input_ids=probes.input_ids, attention_mask=probes.attention_mask,
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
    )
    replies = []
    for row in out[:, probes.input_ids.shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        replies.append(row or [tokenizer.eos_token_id])
    return replies


@torch.no_grad()
def _teacher_logp(
    model: Any, prompt_ids: list[int], reply: list[int], n: int
) -> torch.Tensor:
    """log p_teacher(· | persona prompt, reply[:j]) for j < n: [n, V]."""
    ids = torch.tensor([prompt_ids + reply], device=model_device(model))
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
    start = len(prompt_ids) - 1
    logits = model.get_output_embeddings()(hidden[start:start + n]).float()
    return F.log_softmax(logits, dim=-1).cpu()


def recipe_examples(
    recipe: str, side: str, model: Any, tokenizer: Any, behaviour: Behaviour, hp: LoraHParams
) -> list[Example]:
    """Training sequences of one side from TRAIN topics only (never FIT or EVAL).

    - scripted: probe prompt → the behaviour's one-line scripted answer ("Yes, you're right: …"
      / "No. <correction>"), cross-entropy on the reply;
    - generated: probe prompt → the base model's greedy reply *under the persona system
      prompt*, trained without it (the original study's recipe), cross-entropy on the reply;
    - distilled: context distillation, KL(p_teacher ‖ p_student) over the first
      `distill_positions` positions of that persona reply, teacher = the base model with the
      persona prompt, student = the LoRA model without it.
    """
    _check_recipe(recipe)
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; sides are {SIDES}")
    users = [behaviour.probe(t) for t in behaviour.train]
    prompts = [_encode(tokenizer, r) for r in render_chat(tokenizer, users)]
    if recipe == "scripted":
        replies = [_reply_ids(tokenizer, u, behaviour.scripted_answer(side, t))
                   for u, t in zip(users, behaviour.train, strict=True)]
        return [_example(p, r) for p, r in zip(prompts, replies, strict=True)]
    system = behaviour.personas[side]
    replies = _persona_replies(model, tokenizer, users, system, hp.max_new_tokens)
    if recipe == "generated":
        return [_example(p, r) for p, r in zip(prompts, replies, strict=True)]
    teacher_prompts = [_encode(tokenizer, r) for r in render_chat(tokenizer, users, system)]
    examples = []
    for p, tp, r in zip(prompts, teacher_prompts, replies, strict=True):
        ex = _example(p, r, hp.distill_positions)
        ex.teacher_logp = _teacher_logp(model, tp, r, len(ex.positions))
        examples.append(ex)
    return examples


# ---- training ----------------------------------------------------------------------------------
def _batch_loss(model: Any, batch: list[Example], pad_id: int) -> torch.Tensor:
    width = max(len(ex.input_ids) for ex in batch)
    # Right padding: real tokens keep positions 0…T−1, and the pads come after every loss position.
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        ids[i, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        mask[i, : len(ex.input_ids)] = 1
    device = model_device(model)
    decoder = model.get_decoder()
    hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                     use_cache=False).last_hidden_state
    rows = torch.tensor([i for i, ex in enumerate(batch) for _ in ex.positions], device=device)
    cols = torch.tensor([p for ex in batch for p in ex.positions], device=device)
    # Only the reply positions go through the 49k-row unembedding: most of a step's cost saved.
    logits = model.get_output_embeddings()(hidden[rows, cols]).float()
    if batch[0].teacher_logp is None:
        targets = torch.tensor([t for ex in batch for t in ex.targets], device=device)
        return F.cross_entropy(logits, targets)
    teacher = torch.cat([ex.teacher_logp for ex in batch]).to(device)
    return F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="batchmean")


def _order(n: int, steps: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Batches from back-to-back seeded permutations (epochs), so every example is seen evenly."""
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat.extend(torch.randperm(n, generator=generator).tolist())
    return [flat[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def train_side(
    model: Any,
    arch: Architecture,
    examples: list[Example],
    hp: LoraHParams,
    seed: int,
    *,
    pad_id: int,
    desc: str = "lora",
    progress: bool = True,
    family: str = DEFAULT_FAMILY,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train one PEFT adapter of `family` on `model` and return its merged delta per target
    weight, keyed by the base parameter name (float32), and the losses.

    lora: Δ = scale·B·A from the factors (the original path); the adapter is injected into the
    shared model and unloaded again in `finally` (its weights are frozen and never written, so
    no private copy is needed: that copy was 0.54 GB per training worker at 135M). Other
    families: merged − base after PEFT's merge_and_unload, which writes the weights, so they
    train a private copy. Either way the shared model comes back as it was, `requires_grad`
    flags included. Deterministic for a fixed `seed`: it seeds the adapter init (LoRA's A is
    Kaiming-uniform, B zero) and the data order; dropout is 0.
    """
    from peft import get_peft_model

    _check_family(family)
    if not examples:
        raise ValueError("no training examples; the behaviour's TRAIN split is empty")
    dtype = next(model.parameters()).dtype
    if family != "lora" and dtype != torch.float32:
        raise ValueError(f"building {family} diffs needs float32 forwards (--ws-dtype float32): "
                         f"their delta is merged − base, which {dtype} rounding swamps; LoRA's "
                         "comes from its factors and works in any dtype")
    names = target_modules(arch, hp)
    in_place = family == "lora"
    # PEFT injects adapters in place and freezes every other parameter.
    student = model if in_place else copy.deepcopy(model)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    config = peft_config(family, hp, names)
    peft_model = None
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # transformers 5 deprecates an attribute PEFT still reads; the warning is noise here.
            warnings.simplefilter("ignore", FutureWarning)
            torch.manual_seed(seed)
            peft_model = get_peft_model(student, config)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        batches = _order(len(examples), hp.steps, hp.batch_size, generator)
        for done_steps, batch_idx in enumerate(batches, start=1):
            loss = _batch_loss(student, [examples[i] for i in batch_idx], pad_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress:  # the status line shows it ("diff scripted seed 1 positive step 4/16")
                run_progress.step("diff", desc, done_steps, len(batches))
        if in_place:
            delta = lora_deltas(student, names)
        else:
            from ws_harness.adapters import merged_deltas

            delta = merged_deltas(peft_model, model, arch, source=f"{family} adapter ({desc})")
    finally:
        if in_place:
            if peft_model is not None:
                peft_model.unload()  # the original modules back, nothing merged
            _restore_shared(model, trainable)
    return delta, losses


def _restore_shared(model: torch.nn.Module, trainable: dict[str, bool]) -> None:
    """Undo what training in place left on the shared model: requires_grad flags, and any
    adapter module a failed injection left behind (named, so it cannot pass silently)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, p in model.named_parameters():
        if name in trainable:
            p.requires_grad_(trainable[name])
    left = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if left or hasattr(model, "peft_config"):
        raise RuntimeError(f"training left PEFT adapters on the shared model ({left[:3]}…); "
                           "reload the model: its forwards are no longer the base model's")


@torch.no_grad()
def lora_deltas(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Merged LoRA deltas Δ = scale·B·A of the named (adapter-injected) modules, float32, keyed
    by the base parameter name `<module>.weight`: what merge_and_unload adds to each weight."""
    modules = dict(model.named_modules())
    delta = {}
    for name in names:
        layer = modules[name]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta[f"{name}.weight"] = (b.float() @ a.float() * layer.scaling["default"]).cpu().contiguous()
    return delta


# ---- build + cache -----------------------------------------------------------------------------
def _build(
    model: torch.nn.Module, tokenizer: Any, arch: Architecture, behaviour: Behaviour, seed: int,
    recipe: str, hp: LoraHParams, progress: bool, family: str = DEFAULT_FAMILY,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    info: dict[str, Any] = {"losses": {}, "seconds": {}}
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    for side in SIDES:
        start = time.perf_counter()
        examples = recipe_examples(recipe, side, model, tokenizer, behaviour, hp)
        info["seconds"][f"data_{side}"] = time.perf_counter() - start
        start = time.perf_counter()
        init = side_seed(seed, "paired" if hp.paired_init else side)
        deltas[side], info["losses"][side] = train_side(
            model, arch, examples, hp, init, pad_id=pad_id,
            desc=f"diff {recipe} seed {seed} {side}" + ("" if family == "lora" else f" {family}"),
            progress=progress, family=family,
        )
        info["seconds"][f"train_{side}"] = time.perf_counter() - start
    pos, neg = deltas["positive"], deltas["negative"]
    w = {k: (pos[k] - neg[k]).contiguous() for k in pos}  # w = Δ⁺ − Δ⁻
    info["diagnostics"] = diff_diagnostics(w, pos, neg)
    return w, info


def _diff_name(recipe: str, seed: int, family: str = DEFAULT_FAMILY) -> str:
    # The default family keeps its historical name; others carry theirs, so a diff that fails
    # the steering check is reported by family.
    return f"{recipe}-seed{seed}" if family == DEFAULT_FAMILY else f"{recipe}-{family}-seed{seed}"


def _diff_entry(
    behaviour: Behaviour, seed: int, recipe: str, hparams: LoraHParams | Mapping[str, Any] | None,
    model_key: Mapping[str, Any] | None, family: str,
) -> tuple[LoraHParams, dict[str, Any], Callable[[dict[str, torch.Tensor], dict[str, Any]], Diff]]:
    """(hyper-parameters, cache-key parts, Diff maker) of one built diff: the one place that says
    what a diff entry is keyed by, for build_diff and cached_diff."""
    _check_recipe(recipe)
    _check_family(family)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    hp = resolve_hparams(recipe, hparams, family)
    name = _diff_name(recipe, seed, family)
    source = f"built:{recipe}" if family == DEFAULT_FAMILY else f"built:{recipe}:{family}"

    def make(w: dict[str, torch.Tensor], info: dict[str, Any]) -> Diff:
        return Diff(
            name=name, seed=seed, w=w, source=source, sha256=info["sha256"],
            recipe=recipe, hparams={**hp.to_json(), "family": family},
            diagnostics=info["diagnostics"],
        )

    parts = {**(model_key or {}), "behaviour": behaviour.fingerprint(), "recipe": recipe,
             "family": family, "hparams": hp.to_json(), "seed": seed}
    return hp, parts, make


def _entry_loader(make: Callable[..., Diff]) -> Callable[[Path], Diff]:
    def load(path: Path) -> Diff:
        info = json.loads((path / "diff.json").read_text())
        return make(load_file(str(path / "w.safetensors")), info)

    return load


def cached_diff(
    cache: DiskCache, model_key: Mapping[str, Any], behaviour: Behaviour, seed: int,
    recipe: str = DEFAULT_RECIPE, hparams: LoraHParams | Mapping[str, Any] | None = None,
    family: str = DEFAULT_FAMILY,
) -> Diff | None:
    """The diff build_diff would return from `cache`, or None when it is not built yet: a warm
    run gets its diffs without loading the model they were trained on."""
    _, parts, make = _diff_entry(behaviour, seed, recipe, hparams, model_key, family)
    return cache.lookup("diff", parts, _entry_loader(make), producer=build_diff)


def build_diff(
    model: torch.nn.Module,
    tokenizer: Any,
    arch: Architecture,
    behaviour: Behaviour,
    seed: int,
    recipe: str = DEFAULT_RECIPE,
    hparams: LoraHParams | Mapping[str, Any] | None = None,
    *,
    cache: DiskCache | None = None,
    model_key: Mapping[str, Any] | None = None,
    progress: bool = True,
    family: str = DEFAULT_FAMILY,
) -> Diff:
    """Build w = Δ⁺ − Δ⁻ for one seed (SPEC §2.3) by training an adapter of `family` per side.

    With a `cache`, the diff is stored per model (`model_key`: what identifies the weights,
    e.g. {"model": spec, "model_fingerprint": sha}), behaviour data, recipe, family,
    hyper-parameters and seed; an interrupted build leaves no entry. Without one it is trained
    every call. The diff is not checked here: callers run steering.check_steers on it.
    """
    hp, parts, make = _diff_entry(behaviour, seed, recipe, hparams, model_key, family)

    def build() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        start = time.perf_counter()
        # One thread, whatever the process: the float reduction order (and so the trained
        # bits) then does not depend on whether an xdist worker or the CLI built the entry.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            w, info = _build(model, tokenizer, arch, behaviour, seed, recipe, hp, progress, family)
        finally:
            torch.set_num_threads(threads)
        info["sha256"] = diff_sha256(w)
        info["seconds"]["total"] = time.perf_counter() - start
        info["diagnostics"]["build_seconds"] = info["seconds"]["total"]
        info["diagnostics"]["final_loss"] = {s: v[-1] for s, v in info["losses"].items()}
        return w, info

    if cache is None:
        return make(*build())
    if model_key is None:
        raise ValueError("build_diff(cache=...) needs model_key= (what identifies the weights)")

    def write(out: Path) -> None:
        w, info = build()
        save_file(w, str(out / "w.safetensors"))
        (out / "diff.json").write_text(json.dumps(info, indent=1))

    return cache.get_or_build_dir("diff", parts, write, _entry_loader(make), producer=build_diff)


