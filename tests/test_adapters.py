"""PEFT adapter folders as diffs, and adapter families as build recipes, on the tiny random model."""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ws_harness import lora
from ws_harness.adapters import (
    AdapterBaseMismatchError,
    AdapterBaseWarning,
    AdapterConfigMissingError,
    AdapterError,
    AdapterMergeError,
    AdapterPair,
    AdapterScopeError,
    AdapterSpecError,
    adapter_delta,
    adapter_family,
    adapter_pair_diff,
    discover_adapter_pairs,
    is_adapter_spec,
    load_adapter_diffs,
    merged_deltas,
    parse_adapter_spec,
    read_adapter_config,
)
from ws_harness.arch import ROLES
from ws_harness.cache import DiskCache
from ws_harness.diffs import diff_sha256
from ws_harness.session import HarnessSession

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 vs PEFT, harmless

SUFFIXES = [path.split(".")[-1] for path in ROLES.values()]  # q_proj … down_proj, as GPU runs name them
FAST = {"steps": 2, "batch_size": 2}


def _config(family: str, targets: list[str] | None = None) -> object:
    """PEFT configs with a non-trivial init (plus noise below), so every delta is non-zero."""
    from peft import IA3Config, LoraConfig, OFTConfig

    targets = targets or SUFFIXES
    if family in ("lora", "dora"):
        return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                          use_dora=family == "dora")
    if family == "pissa":
        return LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="pissa")
    if family == "oft":
        return OFTConfig(r=0, oft_block_size=16, target_modules=targets, init_weights=False)
    if family == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=["down_proj"],
                         init_ia3_weights=False)
    raise AssertionError(family)


def save_adapter(model: torch.nn.Module, config: object, folder: Path, seed: int,
                 noise: float = 0.05) -> Path:
    """get_peft_model on a copy, perturb every trainable tensor (a stand-in for training), save."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(noise * torch.randn_like(p))
    peft_model.save_pretrained(str(folder))
    return folder


def peft_reference(model: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """PEFT's own answer: merge_and_unload on a copy, minus the base, for every changed weight."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).merge_and_unload()
    base = dict(model.named_parameters())
    return {name: (p.detach() - base[name].detach()) for name, p in merged.named_parameters()
            if not torch.equal(p, base[name])}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.int32), before[name].view(torch.int32)), name


@pytest.fixture(scope="module")
def adapters(tiny: HarnessSession, tmp_path_factory: pytest.TempPathFactory
             ) -> Callable[[str], tuple[Path, Path]]:
    """family → (pos, neg) adapter folders on the tiny model, built once per family."""
    root = tmp_path_factory.mktemp("adapters")
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            made[family] = tuple(  # type: ignore[assignment]
                save_adapter(tiny.model, _config(family), root / family / side, seed)
                for side, seed in (("pos", 1), ("neg", 2))
            )
        return made[family]

    return get


# ---- spec and layout ---------------------------------------------------------------------------
def test_spec_pairs_lists_and_layouts(adapters: Callable[[str], tuple[Path, Path]],
                                      tmp_path: Path) -> None:
    pos, neg = adapters("lora")
    (one,) = parse_adapter_spec(f"pos={pos},neg={neg}")
    assert one == AdapterPair("lora", pos, neg) and not one.one_sided  # named after the parent
    two = parse_adapter_spec(f"name=a,pos={pos},neg={neg},seed=3; positive={neg},negative={pos}")
    assert [(p.name, p.pos, p.neg, p.seed) for p in two] == [("a", pos, neg, 3), ("lora", neg, pos, None)]
    listed = parse_adapter_spec([f"pos={pos},neg={neg}", f"pos={neg},neg={pos}"])
    assert [p.name for p in listed] == ["lora", "lora-2"]  # distinct names, always
    relative = parse_adapter_spec("pos=lora/pos,neg=lora/neg", base=pos.parent.parent)
    assert relative[0].pos == pos
    (sided,) = parse_adapter_spec(f"pos={pos}")
    assert sided.one_sided and sided.neg is None and sided.name == "lora-pos"
    assert parse_adapter_spec(sided.spec()) == (sided,)

    # layout: ROOT/{pos,neg}/ is one pair; ROOT/<name>/{pos,neg}/ one per seed, natural order.
    root = tmp_path / "runs"
    for name in ("seed10", "seed2"):
        shutil.copytree(pos, root / name / "pos")
        shutil.copytree(neg, root / name / "negative")
    (root / "notes").mkdir()  # neither side: skipped
    (root / ".hidden").mkdir()
    pairs = discover_adapter_pairs(root)
    assert [p.name for p in pairs] == ["seed2", "seed10"]
    assert pairs[0].neg == root / "seed2" / "negative"
    assert parse_adapter_spec(str(root)) == pairs
    assert discover_adapter_pairs(root / "seed2") == (pairs[0],)
    assert is_adapter_spec(str(root)) and is_adapter_spec(f"pos={pos}") and is_adapter_spec([str(root)])
    assert not is_adapter_spec(str(tmp_path / "w.pt")) and not is_adapter_spec("build")


def test_spec_errors_name_the_folder(adapters: Callable[[str], tuple[Path, Path]],
                                     tmp_path: Path) -> None:
    pos, neg = adapters("lora")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterConfigMissingError, match=f"{empty}.*has no adapter_config.json"):
        parse_adapter_spec(f"pos={empty},neg={neg}")
    with pytest.raises(AdapterConfigMissingError, match="does not exist"):
        parse_adapter_spec(f"pos={tmp_path / 'nope'},neg={neg}")
    with pytest.raises(AdapterSpecError, match="unknown key 'pso'"):
        parse_adapter_spec(f"pso={pos},neg={neg}")
    with pytest.raises(AdapterSpecError, match="not key=value"):
        parse_adapter_spec(f"pos={pos},{neg}")
    with pytest.raises(AdapterSpecError, match="single PEFT adapter.*pos="):
        parse_adapter_spec(str(pos))
    half = tmp_path / "half"
    shutil.copytree(pos, half / "pos")
    with pytest.raises(AdapterSpecError, match=f"{half}.*no neg/"):
        discover_adapter_pairs(half)
    with pytest.raises(AdapterSpecError, match="holds no adapter pairs"):
        discover_adapter_pairs(empty)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(pos / "adapter_config.json", weightless)
    with pytest.raises(AdapterConfigMissingError, match=f"{weightless}.*no weights"):
        read_adapter_config(weightless)
    assert issubclass(AdapterError, ValueError)


# ---- merging: w against PEFT's own merge ---------------------------------------------------------
@pytest.mark.parametrize("family", ["lora", "dora", "pissa", "oft", "ia3"])
def test_merged_w_is_what_peft_merges(tiny: HarnessSession,
                                      adapters: Callable[[str], tuple[Path, Path]],
                                      family: str) -> None:
    pos, neg = adapters(family)
    before = snapshot(tiny.model)
    (diff,) = load_adapter_diffs(f"pos={pos},neg={neg}", tiny.model, tiny.arch)
    assert_unchanged(tiny.model, before)  # merged on a copy
    ref_pos, ref_neg = peft_reference(tiny.model, pos), peft_reference(tiny.model, neg)
    every = sorted(tiny.arch.param_name(layer, role) for layer in range(3) for role in ROLES)
    assert sorted(diff.w) == sorted(set(ref_pos) | set(ref_neg)) == every
    for key, value in diff.w.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, ref_pos[key] - ref_neg[key], rtol=0, atol=1e-6)
    assert diff.hparams["family"] == family and diff.recipe == "adapter"
    assert diff.name == family and diff.sha256 == diff_sha256(diff.w)
    d = diff.diagnostics
    assert d["norm_pos"] > 0 and d["norm_neg"] > 0 and d["n_touched"] == 21


def test_lora_delta_matches_the_saved_factors(tiny: HarnessSession,
                                              adapters: Callable[[str], tuple[Path, Path]]) -> None:
    """An independent check of the LoRA case: Δ = (α/r)·B·A read straight from the file."""
    from safetensors.torch import load_file

    pos, _ = adapters("lora")
    merged = adapter_delta(tiny.model, pos, tiny.arch)
    saved = load_file(str(pos / "adapter_model.safetensors"))
    name = tiny.arch.module_name(2, "o")
    a, b = (saved[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
    torch.testing.assert_close(merged.delta[f"{name}.weight"], 2.0 * b @ a, rtol=0, atol=1e-6)
    assert merged.family == "lora" and merged.peft_type == "LORA"


def test_one_sided_diff_is_delta_pos(tiny: HarnessSession,
                                     adapters: Callable[[str], tuple[Path, Path]]) -> None:
    pos, neg = adapters("ia3")
    (diff,) = load_adapter_diffs(f"pos={pos}", tiny.model, tiny.arch)
    ref = peft_reference(tiny.model, pos)
    assert sorted(diff.w) == sorted(ref) and diff.diagnostics["one_sided"] == "pos"
    for key in ref:
        torch.testing.assert_close(diff.w[key], ref[key], rtol=0, atol=1e-6)
    (negative,) = load_adapter_diffs(f"neg={neg}", tiny.model, tiny.arch)
    ref = peft_reference(tiny.model, neg)
    torch.testing.assert_close(negative.w[next(iter(ref))], -ref[next(iter(ref))], rtol=0, atol=1e-6)


def test_family_labels() -> None:
    assert adapter_family({"peft_type": "LORA", "use_dora": True}) == "dora"
    assert adapter_family({"peft_type": "LORA", "init_lora_weights": "pissa_niter_4"}) == "pissa"
    assert adapter_family({"peft_type": "LORA", "init_lora_weights": True}) == "lora"
    assert adapter_family({"peft_type": "OFT"}) == "oft"


# ---- errors ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
def test_adapter_outside_the_seven_roles_is_named(tiny: HarnessSession, tmp_path: Path) -> None:
    from peft import LoraConfig

    embed = save_adapter(tiny.model, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"],
                                                init_lora_weights=False), tmp_path / "embed", 0)
    with pytest.raises(AdapterScopeError, match=f"adapter {embed}.*model.embed_tokens.weight"):
        adapter_delta(tiny.model, embed, tiny.arch)
    head = save_adapter(tiny.model, LoraConfig(r=2, target_modules=["q_proj"],
                                               modules_to_save=["lm_head"]), tmp_path / "head", 0)
    with pytest.raises(AdapterScopeError, match=f"adapter {head}.*modules_to_save.*lm_head"):
        adapter_delta(tiny.model, head, tiny.arch)


def test_unmergeable_adapter_is_named(tiny: HarnessSession, tmp_path: Path) -> None:
    from peft import PromptTuningConfig

    folder = save_adapter(tiny.model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                          tmp_path / "prompt", 0)
    with pytest.raises(AdapterMergeError, match=f"adapter {folder}.*PROMPT_TUNING.*no weights to merge"):
        adapter_delta(tiny.model, folder, tiny.arch)


def _llama(**overrides: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(vocab_size=128, num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)
    params.update(overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **params))


def test_base_model_mismatch_is_named(tiny: HarnessSession, tmp_path: Path) -> None:
    narrow = save_adapter(_llama(hidden_size=32), _config("lora"), tmp_path / "narrow", 0)
    expected = (f"adapter {narrow}: does not fit this base model: adapter tensor "
                r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.default\.weight has shape \(\[4, 32\]\)")
    with pytest.raises(AdapterBaseMismatchError, match=expected):
        adapter_delta(tiny.model, narrow, tiny.arch)
    deeper = save_adapter(_llama(num_hidden_layers=4), _config("lora"), tmp_path / "deeper", 0)
    with pytest.raises(AdapterBaseMismatchError, match=r"model\.layers\.3\..*is not in this model"):
        adapter_delta(tiny.model, deeper, tiny.arch)
    # A declared base name that differs: a warning by default, an error when strict.
    named = save_adapter(tiny.model, _config("lora"), tmp_path / "named", 0)
    import json

    config = json.loads((named / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "Qwen/Qwen3-8B"
    (named / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(AdapterBaseWarning, match="Qwen3-8B"):
        adapter_delta(tiny.model, named, tiny.arch, expected_base="smollm2-135m-instruct")
    with pytest.raises(AdapterBaseMismatchError, match="Qwen3-8B"):
        adapter_delta(tiny.model, named, tiny.arch, expected_base="random:tiny", strict_base=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterBaseWarning)  # the repo name matches a local dir name
        adapter_delta(tiny.model, named, tiny.arch, expected_base="/models/qwen3-8b/")


def test_adapter_diffs_are_cached_by_content(tiny: HarnessSession, tmp_path: Path,
                                             adapters: Callable[[str], tuple[Path, Path]]) -> None:
    pos, neg = adapters("dora")
    cache = DiskCache(tmp_path / "cache")
    key = {"model": "random:tiny", "model_fingerprint": tiny.loaded.fingerprint}
    first = adapter_pair_diff(AdapterPair("a", pos, neg), tiny.model, tiny.arch, cache=cache,
                              model_key=key)
    copied = tmp_path / "copy"
    shutil.copytree(pos, copied / "pos")
    shutil.copytree(neg, copied / "neg")
    (second,) = load_adapter_diffs(str(copied), tiny.model, tiny.arch, cache=cache, model_key=key)
    assert len(cache.builds) == 1 and first.sha256 == second.sha256
    assert second.name == "copy" and first.name == "a"  # the name is the pair's, not the entry's
    with pytest.raises(ValueError, match="model_key"):
        adapter_pair_diff(AdapterPair("a", pos, neg), tiny.model, cache=cache)


# ---- families as build recipes -----------------------------------------------------------------------
def test_family_configs_are_peft_own() -> None:
    from peft import IA3Config, LoraConfig, OFTConfig

    hp = lora.default_hparams()
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert isinstance(lora.peft_config("lora", hp, names), LoraConfig)
    assert lora.peft_config("dora", hp, names).use_dora
    assert lora.peft_config("pissa", hp, names).init_lora_weights == "pissa"
    assert isinstance(lora.peft_config("oft", hp, names), OFTConfig)
    ia3 = lora.peft_config("ia3", hp, names)
    assert isinstance(ia3, IA3Config) and set(ia3.feedforward_modules) == {names[1]}
    assert lora.default_hparams(family="lora") == lora.default_hparams()  # the default path as before
    assert lora.default_hparams(family="ia3").lr > lora.default_hparams().lr
    with pytest.raises(ValueError, match="unknown adapter family 'delora'"):
        lora.default_hparams(family="delora")


@pytest.mark.parametrize("family", ["dora", "pissa", "oft", "ia3"])
def test_family_builds_touch_the_targets_and_are_deterministic(tiny: HarnessSession,
                                                               family: str) -> None:
    def build() -> object:
        return lora.build_diff(tiny.model, tiny.tokenizer, tiny.arch, tiny.behaviour, 0,
                               hparams=FAST, progress=False, family=family)

    before = snapshot(tiny.model)
    a, again = build(), build()
    assert_unchanged(tiny.model, before)
    assert sorted(a.w) == sorted(tiny.arch.param_name(1, r) for r in ROLES)
    assert a.sha256 == again.sha256 and a.diagnostics["norm_w"] > 0
    assert a.name == f"scripted-{family}-seed0" and a.source == f"built:scripted:{family}"
    assert a.hparams["family"] == family


def test_lora_family_reads_alike_either_way(tiny: HarnessSession) -> None:
    """The default path's Δ = scale·B·A equals PEFT's merged − base (what the other families use)."""
    from peft import get_peft_model

    hp = lora.resolve_hparams("scripted", FAST)
    names = lora.target_modules(tiny.arch, hp)
    student = copy.deepcopy(tiny.model)
    torch.manual_seed(0)
    peft_model = get_peft_model(student, lora.peft_config("lora", hp, names))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    factors = lora.lora_deltas(student, names)
    merged = merged_deltas(peft_model, tiny.model, tiny.arch)
    assert sorted(factors) == sorted(merged)
    for key in factors:
        torch.testing.assert_close(merged[key], factors[key], rtol=0, atol=1e-6)


def test_family_enters_the_cache_key(tiny: HarnessSession, tmp_path: Path) -> None:
    session = HarnessSession(replace(tiny.config, cache_dir=tmp_path / "cache"))
    session.__dict__["loaded"] = tiny.loaded
    kwargs = dict(hparams=FAST, progress=False, cache=session.cache, model_key=session.model_key())
    default = lora.build_diff(tiny.model, tiny.tokenizer, tiny.arch, tiny.behaviour, 0, **kwargs)
    dora = lora.build_diff(tiny.model, tiny.tokenizer, tiny.arch, tiny.behaviour, 0,
                           family="dora", **kwargs)
    again = lora.build_diff(tiny.model, tiny.tokenizer, tiny.arch, tiny.behaviour, 0,
                            family="dora", **kwargs)
    # (a fresh cache also builds the tokenizer entry that names the random model's config)
    diff_builds = [b for b in session.cache.builds if b.startswith("diff/")]
    assert len(diff_builds) == 2 and default.sha256 != dora.sha256 == again.sha256
    assert default.name == "scripted-seed0" and default.source == "built:scripted"
