"""Model specs and the architecture view, on random presets (no download, no embedded weights)."""

import shutil
from pathlib import Path

import pytest
import torch

from ws_harness import models
from ws_harness.arch import ROLES, Architecture
from ws_harness.cache import CacheWarning, DiskCache, write_manifest
from ws_harness.models import ModelNotFoundError, load_model, load_tokenizer
from ws_harness.session import HarnessSession


def test_tiny_preset_shapes_and_roles(tiny: HarnessSession) -> None:
    arch = tiny.arch
    assert (arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads) == (3, 64, 4, 2)
    assert arch.gqa_group == 2 and arch.head_dim == 16
    w = arch.layer(1)
    assert w.q.shape == (64, 64) and w.k.shape == (32, 64) and w.o.shape == (64, 64)
    assert w.down.shape == (64, 128) and w.write.shape == (64, 64 + 128)
    assert arch.param_name(2, "o") == "model.layers.2.self_attn.o_proj.weight"
    assert arch.parse_param_name("model.layers.2.mlp.down_proj.weight") == (2, "down")
    assert arch.parse_param_name("model.norm.weight") is None
    assert arch.unembedding.shape == (len(tiny.tokenizer), 64)
    assert len(arch.param_shapes()) == 3 * len(ROLES)


def test_random_init_is_deterministic(tiny: HarnessSession) -> None:
    again = load_model("random:tiny", tiny.cache)
    for (name, a), (_, b) in zip(tiny.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), name
    assert again.fingerprint == tiny.loaded.fingerprint


def test_expand_kv_repeats_each_kv_head_per_group(tiny: HarnessSession) -> None:
    arch = tiny.arch
    k = arch.layer(0).k
    expanded = arch.expand_kv(k)
    hd = arch.head_dim
    for head in range(arch.n_heads):
        kv = head // arch.gqa_group
        assert torch.equal(expanded[head * hd:(head + 1) * hd], k[kv * hd:(kv + 1) * hd])
    with pytest.raises(ValueError, match="expects 32 rows"):
        arch.expand_kv(arch.layer(0).q)


def test_missing_module_is_named(tmp_path: Path) -> None:
    loaded = load_model("random:tiny", DiskCache(tmp_path / "c"))
    del loaded.model.model.layers[1].mlp.gate_proj
    with pytest.raises(ValueError, match=r"lacks module 'model.layers.1.mlp.gate_proj' \(role 'gate'\)"):
        Architecture(loaded.model)


def test_missing_local_model_says_where_it_looked(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c")
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache.*--ws-model"):
        load_model("nobody/no-such-model-xyz", cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_model(str(tmp_path / "empty"), cache)


def test_local_directory_round_trip(tiny: HarnessSession, tmp_path: Path) -> None:
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), DiskCache(tmp_path / "c"))
    batch = tiny.probes("fit")
    ids = batch.input_ids[:2]
    with torch.no_grad():
        a = tiny.model(input_ids=ids).logits
        b = loaded.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_untied_qwen3_preset_has_its_own_unembedding(tmp_path: Path) -> None:
    loaded = load_model("random:tiny-untied", DiskCache(tmp_path / "c"))
    arch = Architecture(loaded.model)
    assert arch.head_dim == 32 and arch.n_layers == 4
    assert arch.unembedding.data_ptr() != arch.embedding.data_ptr()


# ---- damaged model and tokenizer entries are removed and rebuilt, never trusted ---------------
def _fresh_cache(tiny: HarnessSession, tmp_path: Path) -> DiskCache:
    """A cache holding a copy of the shared cache's tokenizer entry (and the GGUF hash memo)."""
    tiny.loaded  # noqa: B018 - make sure the shared cache holds the tokenizer
    spec = "smollm2-135m-instruct"
    sha = models._memo_sha256(models._embedded_gguf(spec), tiny.cache)
    key = tiny.cache.key("tokenizer", {"spec": spec, "gguf_sha256": sha},
                         models._save_gguf_tokenizer)
    shutil.copytree(tiny.cache.root / "tokenizer" / key, tmp_path / "c" / "tokenizer" / key)
    shutil.copytree(tiny.cache.root / "hashes", tmp_path / "c" / "hashes")
    return DiskCache(tmp_path / "c")


def _entries(cache: DiskCache, kind: str) -> list[Path]:
    return [p for p in (cache.root / kind).iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_a_tokenizer_entry_missing_tokenizer_json_is_rebuilt(
    tiny: HarnessSession, tmp_path: Path
) -> None:
    cache = _fresh_cache(tiny, tmp_path)
    (entry,) = _entries(cache, "tokenizer")
    (entry / "tokenizer.json").unlink()
    with pytest.warns(CacheWarning, match=rf"tokenizer/{entry.name}: tokenizer.json is missing; "
                      "removed, rebuilding"):
        tokenizer = load_tokenizer(cache)
    assert (entry / "tokenizer.json").is_file() and cache.builds == [f"tokenizer/{entry.name}"]
    assert tokenizer("Yes").input_ids == tiny.tokenizer("Yes").input_ids


def test_a_tokenizer_that_does_not_load_is_rebuilt_even_when_its_manifest_agrees(
    tiny: HarnessSession, tmp_path: Path
) -> None:
    # Damage the manifest cannot see (it was rewritten to match): loading is the last check.
    cache = _fresh_cache(tiny, tmp_path)
    (entry,) = _entries(cache, "tokenizer")
    (entry / "tokenizer.json").write_text("{")
    write_manifest(entry, "tokenizer")
    with pytest.warns(CacheWarning, match=rf"tokenizer/{entry.name}: failed to load \("):
        load_tokenizer(cache)
    assert len(cache.builds) == 1


def test_a_truncated_model_entry_is_rebuilt(
    tiny: HarnessSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The GGUF conversion (~25 s) is replaced by saving the tiny model: the entry is what matters.
    def convert(gguf: Path, out: Path) -> None:
        tiny.model.save_pretrained(out, safe_serialization=True)
        tiny.tokenizer.save_pretrained(out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    cache = _fresh_cache(tiny, tmp_path)
    load_model("smollm2-135m-instruct", cache)
    (entry,) = _entries(cache, "model")
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(CacheWarning, match=rf"model/{entry.name}: model.safetensors has \d+ bytes, "
                      r"expected \d+; removed, rebuilding"):
        again = load_model("smollm2-135m-instruct", cache)
    assert len(cache.builds) == 2 and again.model.config.hidden_size == 64
