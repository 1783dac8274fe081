"""PEFT adapter folders as diff input (SPEC §2.3): parse pos/neg pairs, merge each with PEFT, w = Δ⁺ − Δ⁻.

A researcher's adapters arrive as PEFT folders (`adapter_config.json` + `adapter_model.safetensors`
or `.bin`), trained elsewhere, of any family PEFT can merge (LoRA, DoRA, PiSSA, OFT, IA3, LoHa,
LoKr, VeRA, …). Each adapter is loaded with `PeftModel.from_pretrained` on a private copy of the
base model and merged with `merge_and_unload`; its delta is merged − base per parameter, so
whatever the family does when it merges (an additive B·A, DoRA's column renormalisation, OFT's
rotation W·R, IA3's per-channel scaling) is what the diff holds. The base model is never touched.

Spec grammar (`--ws-diff` value, or a list of such values, one per seed):

- `pos=DIR,neg=DIR` — one pair = one seed; optional `name=NAME` and `seed=INT` items;
  `positive=` / `negative=` are accepted for `pos=` / `neg=`;
- several pairs separated by `;` (or several list values) — several seeds;
- `pos=DIR` alone — a one-sided diff w = Δ⁺ (`neg=DIR` alone: w = −Δ⁻, the same convention);
- a bare `ROOT` directory — the folder layout below.

Folder layout (`discover_adapter_pairs`): either ROOT is one pair folder, `ROOT/pos/` and
`ROOT/neg/` (or `positive/` / `negative/`), each a PEFT adapter folder, named after ROOT; or ROOT
holds one such pair folder per seed, `ROOT/<name>/{pos,neg}/`, taken in natural name order
(seed2 before seed10). Hidden folders and folders with neither side are skipped; a folder with
only one side is an error. A bare single adapter folder is refused (pass `pos=DIR` to mean a
one-sided diff), so a half-copied pair never silently becomes a one-sided diff.

Paths are split on `,` and `;`, so they may not contain those characters.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ws_harness.arch import ROLES, Architecture
from ws_harness.cache import DiskCache
from ws_harness.diffs import Diff, diff_diagnostics, diff_sha256, validate_diff

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "SIDE_DIRS",
    "AdapterError",
    "AdapterConfigMissingError",
    "AdapterSpecError",
    "AdapterMergeError",
    "AdapterScopeError",
    "AdapterBaseMismatchError",
    "AdapterBaseWarning",
    "AdapterPair",
    "MergedAdapter",
    "is_adapter_spec",
    "parse_adapter_spec",
    "discover_adapter_pairs",
    "read_adapter_config",
    "adapter_family",
    "adapter_fingerprint",
    "merged_deltas",
    "adapter_delta",
    "adapter_pair_diff",
    "load_adapter_diffs",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Accepted names of the two side folders in the layout, canonical name first.
SIDE_DIRS: dict[str, tuple[str, ...]] = {"pos": ("pos", "positive"), "neg": ("neg", "negative")}
_SIDE_KEYS = {"pos": "pos", "positive": "pos", "neg": "neg", "negative": "neg"}
_SPEC_KEYS = (*_SIDE_KEYS, "name", "seed")
_PEFT_PREFIX = "base_model.model."


# ---- errors ------------------------------------------------------------------------------------
class AdapterError(ValueError):
    """An adapter (or an adapter spec) cannot serve as a diff; the message names the folder."""


class AdapterSpecError(AdapterError):
    """The `pos=…,neg=…` spec or the folder layout is malformed."""


class AdapterConfigMissingError(AdapterError):
    """The folder is not a PEFT adapter folder: it lacks adapter_config.json (or its weights)."""


class AdapterMergeError(AdapterError):
    """PEFT cannot merge this adapter into the weights (prompt learning, unsupported layer, …)."""


class AdapterScopeError(AdapterError):
    """The adapter touches a parameter outside q,k,v,o,gate,up,down of decoder layers."""


class AdapterBaseMismatchError(AdapterError):
    """The adapter was trained on another base model (shapes, modules or declared name differ)."""


class AdapterBaseWarning(UserWarning):
    """The adapter's declared base_model_name_or_path differs from the expected model name."""


# ---- spec and layout ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterPair:
    """One diff's adapters: `pos` (trained towards the behaviour) and `neg` (away from it).

    Either side may be None for a one-sided diff (w = Δ⁺, or w = −Δ⁻), never both. Frozen and
    hashable so it can sit in a frozen HarnessConfig; `seed` is informational (None if unknown).
    """

    name: str
    pos: Path | None
    neg: Path | None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.pos is None and self.neg is None:
            raise AdapterSpecError(f"adapter pair {self.name!r} names neither a pos= nor a neg= folder")

    @property
    def one_sided(self) -> bool:
        return self.pos is None or self.neg is None

    def sides(self) -> list[tuple[str, Path]]:
        """[("pos", dir), ("neg", dir)] for the sides present."""
        return [(s, p) for s, p in (("pos", self.pos), ("neg", self.neg)) if p is not None]

    def spec(self) -> str:
        """The pair as a spec string, parseable by parse_adapter_spec."""
        items = [f"name={self.name}"] + [f"{s}={p}" for s, p in self.sides()]
        if self.seed is not None:
            items.append(f"seed={self.seed}")
        return ",".join(items)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "pos": None if self.pos is None else str(self.pos),
                "neg": None if self.neg is None else str(self.neg), "seed": self.seed}


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _resolve(raw: str | Path, base: Path | None) -> Path:
    path = Path(raw).expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


def _check_adapter_dir(path: Path, what: str = "adapter folder") -> Path:
    if not path.is_dir():
        raise AdapterConfigMissingError(f"{what} {path} does not exist or is not a directory")
    if not (path / ADAPTER_CONFIG).is_file():
        raise AdapterConfigMissingError(
            f"{what} {path} has no {ADAPTER_CONFIG}; a PEFT adapter folder is what "
            "PeftModel.save_pretrained writes (adapter_config.json + adapter_model.safetensors)"
        )
    return path


def _side_dir(folder: Path, side: str) -> Path | None:
    for name in SIDE_DIRS[side]:
        if (folder / name).is_dir():
            return folder / name
    return None


def _pair_in(folder: Path) -> AdapterPair | None:
    """The pair held by `folder` (its pos/neg sub-folders), None if it holds neither side."""
    pos, neg = _side_dir(folder, "pos"), _side_dir(folder, "neg")
    if pos is None and neg is None:
        return None
    if pos is None or neg is None:
        have, lack = ("pos", "neg") if neg is None else ("neg", "pos")
        raise AdapterSpecError(
            f"adapter pair folder {folder} has a {have}/ adapter but no {lack}/ "
            f"({' or '.join(SIDE_DIRS[lack])}); a pair needs both sides, or pass "
            f"{have}={folder / have} alone for a one-sided diff"
        )
    return AdapterPair(folder.name, _check_adapter_dir(pos), _check_adapter_dir(neg))


def discover_adapter_pairs(root: str | Path) -> tuple[AdapterPair, ...]:
    """The pairs of a folder layout (module docstring): ROOT/{pos,neg}/ or ROOT/<name>/{pos,neg}/."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise AdapterSpecError(f"adapter folder {root} does not exist or is not a directory")
    if (root / ADAPTER_CONFIG).is_file():
        raise AdapterSpecError(
            f"{root} is a single PEFT adapter, not a pair; pass pos={root},neg=OTHER for a "
            f"diff w = Δ⁺ − Δ⁻, or pos={root} alone for a one-sided diff w = Δ⁺"
        )
    pair = _pair_in(root)
    if pair is not None:
        return (pair,)
    pairs = []
    for sub in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: _natural_key(p.name)):
        found = _pair_in(sub)
        if found is not None:
            pairs.append(found)
    if not pairs:
        raise AdapterSpecError(
            f"adapter folder {root} holds no adapter pairs; expected {root}/pos/ and {root}/neg/, "
            f"or {root}/<name>/pos/ and {root}/<name>/neg/ (each with {ADAPTER_CONFIG})"
        )
    return tuple(pairs)


def _tokens(value: str) -> list[str]:
    return [t.strip() for t in re.split(r"[;,]", value) if t.strip()]


def _is_keyed(token: str) -> bool:
    return "=" in token and token.split("=", 1)[0].strip().lower() in _SPEC_KEYS


def is_adapter_spec(value: Any, base: Path | None = None) -> bool:
    """Whether a `--ws-diff` value means adapters (not diff files): it has a `pos=`/`neg=` item,
    or names a directory laid out as adapter pairs (or a single adapter, to get its error).
    Cheap: reads no weights and imports no PEFT."""
    if isinstance(value, (list, tuple)):
        return any(is_adapter_spec(v, base) for v in value)
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        return False
    for token in _tokens(value):
        if _is_keyed(token):
            return True
        path = _resolve(token, base)
        if path.is_dir() and (
            (path / ADAPTER_CONFIG).is_file()
            or any(_side_dir(path, s) for s in SIDE_DIRS)
            or any(_side_dir(sub, s) for sub in path.iterdir() if sub.is_dir() for s in SIDE_DIRS)
        ):
            return True
    return False


def _parse_pair(chunk: str, base: Path | None) -> AdapterPair:
    items: dict[str, str] = {}
    for token in (t.strip() for t in chunk.split(",") if t.strip()):
        if "=" not in token:
            raise AdapterSpecError(
                f"adapter spec item {token!r} in {chunk!r} is not key=value; write "
                "pos=DIR,neg=DIR (optionally name=NAME, seed=INT)"
            )
        key, val = (s.strip() for s in token.split("=", 1))
        key = _SIDE_KEYS.get(key.lower(), key.lower())
        if key not in ("pos", "neg", "name", "seed"):
            raise AdapterSpecError(
                f"adapter spec {chunk!r}: unknown key {key!r}; keys are pos, neg, name, seed"
            )
        if key in items:
            raise AdapterSpecError(f"adapter spec {chunk!r} gives {key}= twice")
        if not val:
            raise AdapterSpecError(f"adapter spec {chunk!r}: {key}= is empty")
        items[key] = val
    if "pos" not in items and "neg" not in items:
        raise AdapterSpecError(f"adapter spec {chunk!r} names no pos= or neg= adapter folder")
    sides = {s: _check_adapter_dir(_resolve(items[s], base), f"{s}= adapter folder")
             for s in ("pos", "neg") if s in items}
    seed = None
    if "seed" in items:
        try:
            seed = int(items["seed"])
        except ValueError:
            raise AdapterSpecError(
                f"adapter spec {chunk!r}: seed={items['seed']!r} is not an integer"
            ) from None
        if seed < 0:
            raise AdapterSpecError(f"adapter spec {chunk!r}: seed must be non-negative, got {seed}")
    name = items.get("name")
    if name is None:
        pos, neg = sides.get("pos"), sides.get("neg")
        if pos is not None and neg is not None:
            # runs/seed0/pos + runs/seed0/neg → "seed0"; unrelated folders → "a~b".
            name = pos.parent.name if pos.parent == neg.parent else f"{pos.name}~{neg.name}"
        else:
            only = pos if pos is not None else neg
            assert only is not None
            name = only.name if only.name not in ("pos", "neg", "positive", "negative") \
                else f"{only.parent.name}-{only.name}"
    return AdapterPair(name, sides.get("pos"), sides.get("neg"), seed)


def parse_adapter_spec(
    value: str | Path | Sequence[str | Path], base: str | Path | None = None
) -> tuple[AdapterPair, ...]:
    """`pos=DIR,neg=DIR[;…]`, a folder layout, or a list of either → one AdapterPair per seed.

    Relative paths are taken under `base` (the run's rootdir). Every side folder must exist and
    hold adapter_config.json (AdapterConfigMissingError otherwise); names must be distinct (a
    repeated name gets `-2`, `-3`, … appended, so two layouts with the same pair names still
    yield distinct diffs). Raises AdapterSpecError naming the bad item.
    """
    base_path = None if base is None else Path(base)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    pairs: list[AdapterPair] = []
    for v in values:
        text = str(v)
        for chunk in (c.strip() for c in text.split(";") if c.strip()):
            tokens = [t.strip() for t in chunk.split(",") if t.strip()]
            if any(_is_keyed(t) for t in tokens):
                pairs.append(_parse_pair(chunk, base_path))
            else:
                for token in tokens:  # bare folders: layouts
                    pairs.extend(discover_adapter_pairs(_resolve(token, base_path)))
    if not pairs:
        raise AdapterSpecError(f"adapter spec {value!r} names no adapter pairs")
    seen: dict[str, int] = {}
    out = []
    for pair in pairs:
        seen[pair.name] = seen.get(pair.name, 0) + 1
        if seen[pair.name] > 1:
            pair = AdapterPair(f"{pair.name}-{seen[pair.name]}", pair.pos, pair.neg, pair.seed)
        out.append(pair)
    return tuple(out)


# ---- reading and fingerprinting ------------------------------------------------------------------
def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT adapter folder as a dict (AdapterConfigMissingError if absent
    or unreadable, or if the folder has no adapter_model.safetensors/.bin)."""
    path = _check_adapter_dir(Path(path))
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterConfigMissingError(
            f"adapter folder {path}: cannot read {ADAPTER_CONFIG} ({exc})"
        ) from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterConfigMissingError(
            f"adapter folder {path}: {ADAPTER_CONFIG} has no peft_type; is it a PEFT adapter config?"
        )
    if not any((path / w).is_file() for w in ADAPTER_WEIGHTS):
        raise AdapterConfigMissingError(
            f"adapter folder {path} has {ADAPTER_CONFIG} but no weights ({' or '.join(ADAPTER_WEIGHTS)})"
        )
    return config


def adapter_family(config: Mapping[str, Any]) -> str:
    """A family label from an adapter config: dora / pissa / olora / … for LoRA variants, else the
    lower-cased peft_type (oft, ia3, loha, …). For reports; the merge does not depend on it."""
    peft_type = str(config.get("peft_type", "unknown")).lower()
    if peft_type == "lora":
        if config.get("use_dora"):
            return "dora"
        init = config.get("init_lora_weights")
        if isinstance(init, str):
            return init.split("_", 1)[0].lower()  # "pissa_niter_4" → "pissa"
    return peft_type


def adapter_fingerprint(path: str | Path) -> str:
    """sha256 over the adapter's config and weight files (names + bytes): what keys its cache entry,
    so a copied folder hits the same entry and an edited one misses it."""
    path = _check_adapter_dir(Path(path))
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):
        file = path / name
        if file.is_file():
            digest.update(f"{name}|".encode())
            with file.open("rb") as fh:
                while block := fh.read(1 << 22):
                    digest.update(block)
    return digest.hexdigest()


def _saved_keys(path: Path) -> set[str]:
    """Tensor names in the adapter's weight file, without loading the tensors where possible."""
    st = path / ADAPTER_WEIGHTS[0]
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as fh:
            return set(fh.keys())
    return set(torch.load(str(path / ADAPTER_WEIGHTS[1]), map_location="cpu", weights_only=True))


# ---- merging -------------------------------------------------------------------------------------
def _strip(name: str) -> str:
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def _scope_check(peft_model: Any, arch: Architecture, source: str) -> list[str]:
    """Parameter names (harness naming) of the modules PEFT wrapped; AdapterScopeError for any
    outside the seven roles (embeddings, lm_head, norms, modules_to_save, trainable tokens)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:  # AuxiliaryTrainingWrapper covers modules_to_save and trainable tokens (PEFT ≥ 0.15)
        from peft.utils.other import AuxiliaryTrainingWrapper as _Aux
    except ImportError:  # pragma: no cover - older PEFT
        from peft.utils.other import ModulesToSaveWrapper as _Aux

    roles = ", ".join(ROLES)
    touched = []
    for name, module in peft_model.named_modules():
        base_name = _strip(name)
        if isinstance(module, _Aux):
            raise AdapterScopeError(
                f"{source}: the adapter trains {base_name}.weight outright (modules_to_save or "
                f"trainable tokens); a diff may touch only the decoder layers' {roles} weights"
            )
        if isinstance(module, BaseTunerLayer):
            param = f"{base_name}.weight"
            if arch.parse_param_name(param) is None:
                raise AdapterScopeError(
                    f"{source}: the adapter touches {param}, outside the seven roles; a diff may "
                    f"touch only model.layers.<i>.{{self_attn,mlp}}.<role>.weight for roles {roles}"
                )
            touched.append(param)
    if not touched:
        raise AdapterMergeError(
            f"{source}: PEFT injected no weight-modifying layers (peft type "
            f"{type(peft_model.peft_config.get('default')).__name__}); nothing to merge"
        )
    return touched


@torch.no_grad()
def merged_deltas(
    peft_model: Any, base_model: torch.nn.Module, arch: Architecture | None = None,
    *, source: str = "adapter",
) -> dict[str, torch.Tensor]:
    """merge_and_unload `peft_model` (a PeftModel wrapping a *private copy* of `base_model`, which
    it modifies) and return merged − base per touched parameter, float32 on the CPU.

    Any family PEFT can merge works, because the delta is read off the merged weights rather than
    recomputed per family. AdapterScopeError if the adapter wraps, or the merge changes, any
    parameter outside the seven roles (a bias, a norm, the embedding); AdapterMergeError if PEFT
    cannot merge. Families that rewrite the base weights at init (PiSSA, OLoRA) still give the
    right delta: it is taken against `base_model`, not the copy's residual weights.
    """
    arch = arch or Architecture(base_model)
    touched = _scope_check(peft_model, arch, source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 vs PEFT: noise
            merged = peft_model.merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - tuners raise many types when they cannot merge
        raise AdapterMergeError(
            f"{source}: PEFT cannot merge this adapter into the weights "
            f"({type(exc).__name__}: {exc}); only adapters that merge_and_unload supports can be diffs"
        ) from exc
    base = dict(base_model.named_parameters())
    after = dict(merged.named_parameters())
    if set(after) != set(base):
        extra = sorted(set(after) ^ set(base))
        raise AdapterScopeError(
            f"{source}: merging changed the model's parameter set ({extra[:3]}…); the adapter "
            "adds or replaces modules instead of changing the seven roles' weights"
        )
    touched_set = set(touched)
    for name, param in after.items():
        if name not in touched_set and not torch.equal(param, base[name].to(param.device, param.dtype)):
            raise AdapterScopeError(
                f"{source}: merging changed {name}, outside the adapter's target weights and the "
                "seven roles (e.g. a trained bias or norm); a diff may touch only the decoder "
                f"layers' {', '.join(ROLES)} weights"
            )
    return {name: (after[name].detach().float().cpu() - base[name].detach().float().cpu()).contiguous()
            for name in touched}


def _base_names(value: str | None) -> set[str]:
    if not value:
        return set()
    text = str(value).rstrip("/\\")
    return {text.lower(), re.split(r"[/\\]", text)[-1].lower()}


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+?): copying a param with shape (.+?) from checkpoint, "
    r"the shape in current model is (.+?)\.(?:\s|$)"
)


def _mismatch_message(source: str, exc: Exception) -> str:
    """PEFT's load error, reduced to the first offending tensor (its state dict runs long)."""
    text = str(exc)
    found = _SIZE_MISMATCH.findall(text)
    if found:
        name, saved, here = found[0]
        return (f"{source}: does not fit this base model: adapter tensor {_strip(name)} has shape "
                f"{saved.replace('torch.Size', '')} in the file but {here.replace('torch.Size', '')} "
                f"on this model ({len(found)} size mismatch(es)); was it trained on another model?")
    return (f"{source}: does not fit this base model ({type(exc).__name__}: {text.strip()[:500]}); "
            "was it trained on another model?")


@dataclass
class MergedAdapter:
    """One adapter folder merged: its per-parameter delta (harness names, float32) and metadata."""

    path: Path
    family: str
    peft_type: str
    base_model_name_or_path: str | None
    delta: dict[str, torch.Tensor] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "family": self.family, "peft_type": self.peft_type,
                "base_model_name_or_path": self.base_model_name_or_path, "n_touched": len(self.delta)}


def adapter_delta(
    model: torch.nn.Module,
    path: str | Path,
    arch: Architecture | None = None,
    *,
    expected_base: str | None = None,
    strict_base: bool = False,
) -> MergedAdapter:
    """Merge one PEFT adapter folder into a deep copy of `model`: Δ = merged − base per parameter.

    `model` is never modified (the copy is merged and dropped); a non-float32 model is merged on a
    float32 copy so that Δ is not lost to bf16 rounding. Base checks: the adapter's tensors must
    load without size mismatch, and its saved keys must equal those PEFT expects for this model
    (else AdapterBaseMismatchError naming the first offending key); with `expected_base`, a
    declared base_model_name_or_path whose name differs warns (AdapterBaseWarning), or raises
    with `strict_base`. Other errors: AdapterConfigMissingError, AdapterMergeError,
    AdapterScopeError (module docstring).
    """
    from peft import PeftConfig, PeftModel
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    raw = read_adapter_config(path)
    source = f"adapter {path}"
    try:
        config = PeftConfig.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - PEFT raises many types on unknown/invalid configs
        raise AdapterMergeError(
            f"{source}: PEFT cannot read {ADAPTER_CONFIG} ({type(exc).__name__}: {exc})"
        ) from exc
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if config.is_prompt_learning or getattr(config, "is_adaption_prompt", False):
        raise AdapterMergeError(
            f"{source}: a {peft_type} adapter adds virtual tokens or prompts and has no weights to "
            "merge; only weight adapters (LoRA, DoRA, OFT, IA3, …) can be diffs"
        )
    for key in ("modules_to_save", "trainable_token_indices"):
        if raw.get(key):
            raise AdapterScopeError(
                f"{source}: {key}={raw[key]!r} trains parameters outside the seven roles "
                f"(e.g. {'model.embed_tokens.weight' if 'token' in key else raw[key]}); a diff may "
                f"touch only the decoder layers' {', '.join(ROLES)} weights"
            )
    declared = raw.get("base_model_name_or_path")
    if expected_base and declared and not (_base_names(declared) & _base_names(expected_base)):
        message = (f"{source}: trained on base model {declared!r}, but the run's model is "
                   f"{expected_base!r}")
        if strict_base:
            raise AdapterBaseMismatchError(message)
        warnings.warn(AdapterBaseWarning(message + "; merging anyway (shapes match)"), stacklevel=2)

    arch = arch or Architecture(model)
    student = copy.deepcopy(model)  # PEFT injects in place (and PiSSA rewrites base weights)
    if any(p.dtype != torch.float32 for p in student.parameters()):
        # Merge in float32: a bf16 merge would round Δ away. bf16 → float32 is exact, so the
        # base model itself stays a bit-exact reference for merged − base.
        student = student.float()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                peft_model = PeftModel.from_pretrained(student, str(path), is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise AdapterBaseMismatchError(_mismatch_message(source, exc)) from exc
        for w in caught:  # re-emit what is not PEFT's missing-keys notice (handled below)
            if "missing adapter keys" not in str(w.message) and not issubclass(w.category, FutureWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        _scope_check(peft_model, arch, source)  # first: a scope error says more than a key mismatch
        # save_embedding_layers=False: "auto" would look the base model up on the Hub (a network
        # call, and a warning offline) to see whether the vocabulary changed.
        expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
        saved = _saved_keys(path)
        if not getattr(model, "_checkpoint_conversion_mapping", None):
            # Both sets are in the saved naming (no adapter name): they must agree exactly, else
            # part of the adapter would be silently dropped or left at its init.
            for label, keys in (("is not in this model", saved - expected),
                                ("is missing from the adapter file", expected - saved)):
                if keys:
                    first = sorted(keys)[0]
                    raise AdapterBaseMismatchError(
                        f"{source}: adapter key {first!r} {label} ({len(keys)} such key(s)); the "
                        "adapter was trained on a base model with other layers or modules"
                    )
        delta = merged_deltas(peft_model, model, arch, source=source)
    finally:
        del student
    return MergedAdapter(path, adapter_family(raw), peft_type, declared, delta)


def _combine(pos: Mapping[str, torch.Tensor] | None, neg: Mapping[str, torch.Tensor] | None
             ) -> dict[str, torch.Tensor]:
    """w = Δ⁺ − Δ⁻ over the union of touched keys (a side that does not touch a key adds 0)."""
    pos, neg = pos or {}, neg or {}
    out = {}
    for key in sorted(set(pos) | set(neg)):
        if key in pos and key in neg:
            out[key] = (pos[key] - neg[key]).contiguous()
        elif key in pos:
            out[key] = pos[key].clone()
        else:
            out[key] = (-neg[key]).contiguous()
    return out


def _merge_pair(
    pair: AdapterPair, model: torch.nn.Module, arch: Architecture,
    expected_base: str | None, strict_base: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    merged = {side: adapter_delta(model, p, arch, expected_base=expected_base, strict_base=strict_base)
              for side, p in pair.sides()}
    pos = merged["pos"].delta if "pos" in merged else None
    neg = merged["neg"].delta if "neg" in merged else None
    w = validate_diff(_combine(pos, neg), arch, source=f"adapter pair {pair.name!r}")
    diagnostics = (diff_diagnostics(w, pos, neg) if pos is not None and neg is not None
                   else diff_diagnostics(w))
    if pair.one_sided:
        diagnostics["one_sided"] = "pos" if pos is not None else "neg"
    families = sorted({m.family for m in merged.values()})
    info = {
        "sha256": diff_sha256(w),
        "hparams": {"family": "+".join(families), **{s: m.summary() for s, m in merged.items()}},
        "diagnostics": diagnostics,
    }
    return w, info


def adapter_pair_diff(
    pair: AdapterPair,
    model: torch.nn.Module,
    arch: Architecture | None = None,
    *,
    cache: DiskCache | None = None,
    model_key: Mapping[str, Any] | None = None,
    expected_base: str | None = None,
    strict_base: bool = False,
) -> Diff:
    """The Diff of one pair: w = Δ⁺ − Δ⁻ (or ±one side), validated, named `pair.name`.

    With a `cache` (and `model_key`, what identifies the base weights) the merged w is stored per
    model and per adapter *content* (adapter_fingerprint), not per path; `recipe` is "adapter",
    `hparams` holds the family and each side's summary, `source` the pair's spec.
    """
    arch = arch or Architecture(model)

    def make(w: dict[str, torch.Tensor], info: dict[str, Any]) -> Diff:
        return Diff(name=pair.name, seed=pair.seed, w=w, source=f"adapters:{pair.spec()}",
                    sha256=info["sha256"], recipe="adapter", hparams=info["hparams"],
                    diagnostics=info["diagnostics"])

    if cache is None:
        return make(*_merge_pair(pair, model, arch, expected_base, strict_base))
    if model_key is None:
        raise ValueError("adapter_pair_diff(cache=...) needs model_key= (what identifies the weights)")
    from safetensors.torch import load_file, save_file

    def write(out: Path) -> None:
        w, info = _merge_pair(pair, model, arch, expected_base, strict_base)
        save_file(w, str(out / "w.safetensors"))
        (out / "diff.json").write_text(json.dumps(info, indent=1))

    def load(entry: Path) -> Diff:
        info = json.loads((entry / "diff.json").read_text())
        return make(load_file(str(entry / "w.safetensors")), info)

    parts = {**model_key, "pos": pair.pos and adapter_fingerprint(pair.pos),
             "neg": pair.neg and adapter_fingerprint(pair.neg)}
    return cache.get_or_build_dir("adapter_diff", parts, write, load, producer=adapter_pair_diff)


def load_adapter_diffs(
    pairs: str | Path | Iterable[AdapterPair | str | Path],
    model: torch.nn.Module,
    arch: Architecture | None = None,
    *,
    cache: DiskCache | None = None,
    model_key: Mapping[str, Any] | None = None,
    expected_base: str | None = None,
    strict_base: bool = False,
    base: str | Path | None = None,
) -> list[Diff]:
    """One Diff per pair, in order: AdapterPairs as parsed, or spec strings parsed here (`base` for
    relative paths). See adapter_pair_diff for caching and adapter_delta for the checks."""
    if isinstance(pairs, (str, Path)):
        parsed: list[AdapterPair] = list(parse_adapter_spec(pairs, base))
    else:
        items = list(pairs)
        parsed = [p for p in items if isinstance(p, AdapterPair)]
        rest = [p for p in items if not isinstance(p, AdapterPair)]
        if rest:
            if parsed:
                raise TypeError("load_adapter_diffs: pass AdapterPairs or spec strings, not both")
            parsed = list(parse_adapter_spec(rest, base))
    arch = arch or Architecture(model)
    return [adapter_pair_diff(p, model, arch, cache=cache, model_key=model_key,
                              expected_base=expected_base, strict_base=strict_base) for p in parsed]
