"""Diffs on the tiny random model: validation, loading, exact restore, building, steering."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ws_harness import lora
from ws_harness.capture import capture_last_token
from ws_harness.diffs import (
    Diff,
    DiffValidationError,
    diff_diagnostics,
    diff_sha256,
    load_diff,
    load_diffs,
    save_diff,
    validate_diff,
    weight_steer,
)
from ws_harness.session import HarnessSession
from ws_harness.steering import (
    DiffDoesNotSteerError,
    answer_token_ids,
    check_steers,
    steering_curve,
)

MakeDiff = Callable[..., dict[str, torch.Tensor]]  # the `steering_diff` fixture
FAST = {"steps": 2, "batch_size": 2}  # a few seconds per build on the tiny model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bitwise_equal(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        # torch.equal plus a byte view: -0.0 vs 0.0 or NaN payloads would also be caught.
        assert torch.equal(p.detach().view(torch.int32), before[name].view(torch.int32)), name


@pytest.fixture
def private(tiny: HarnessSession, tmp_path: Path) -> HarnessSession:
    """A tiny session with its own empty cache, reusing the already-loaded model."""
    session = HarnessSession(replace(tiny.config, cache_dir=tmp_path / "cache"))
    session.__dict__["loaded"] = tiny.loaded
    return session


# ---- validation ------------------------------------------------------------------------------
def test_validation_names_the_key_and_the_expected_shape(tiny: HarnessSession) -> None:
    arch = tiny.arch
    down = arch.param_name(1, "down")  # [64, 128]
    good = {down: torch.zeros(64, 128)}
    assert validate_diff(good, arch)[down].dtype == torch.float32
    with pytest.raises(DiffValidationError, match=r"'model.layers.1.mlp.down_proj.weight' has "
                       r"shape \[128, 64\], expected shape \[64, 128\]"):
        validate_diff({down: torch.zeros(128, 64)}, arch)
    with pytest.raises(DiffValidationError, match=r"'model.layers.7.mlp.down_proj.weight' is not "
                       r"a parameter of the model.*layers.0.self_attn.q_proj.weight \[64, 64\]"):
        validate_diff({**good, "model.layers.7.mlp.down_proj.weight": torch.zeros(64, 128)}, arch)
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.zeros(64, 128)
        w[3, 5] = bad
        with pytest.raises(DiffValidationError, match=r"down_proj.weight' \(shape \[64, 128\]\) "
                           r"has 1 non-finite"):
            validate_diff({down: w}, arch)
    with pytest.raises(DiffValidationError, match=r"empty.*\[64, 64\]"):
        validate_diff({}, arch)
    with pytest.raises(TypeError, match="dict"):
        validate_diff([torch.zeros(64, 128)], arch)
    with pytest.raises(TypeError, match=r"holds a list, not a tensor of shape \[64, 128\]"):
        validate_diff({down: [0.0]}, arch)
    with pytest.raises(DiffValidationError, match=r"dtype torch.int64.*\[64, 128\]"):
        validate_diff({down: torch.zeros(64, 128, dtype=torch.long)}, arch)


def test_any_model_parameter_is_a_valid_key_and_peft_prefixes_are_stripped(
    tiny: HarnessSession,
) -> None:
    # Decision (documented in validate_diff): keys outside the seven LoRA roles are accepted if
    # they are parameters of the model; weight_steer applies them, the weight scores ignore them.
    prefixed = "base_model.model.model.layers.0.self_attn.o_proj.weight"
    w = validate_diff({"model.norm.weight": torch.ones(64), prefixed: torch.ones(64, 64)},
                      tiny.arch)
    assert sorted(w) == ["model.layers.0.self_attn.o_proj.weight", "model.norm.weight"]
    with pytest.raises(DiffValidationError, match="already holds"):
        validate_diff({"model.norm.weight": torch.ones(64),
                       "base_model.model.model.norm.weight": torch.ones(64)}, tiny.arch)
    # Validation against a plain {name: shape} mapping works without a model.
    assert validate_diff({"a.weight": torch.ones(2, 3)}, {"a.weight": (2, 3)})


def test_pt_and_safetensors_round_trip_with_one_fingerprint(steering_diff: MakeDiff,
    tiny: HarnessSession, tmp_path: Path
) -> None:
    w = steering_diff(tiny)
    diff = Diff("hand", 3, w, "test", diff_sha256(w), recipe="hand-made")
    pt = save_diff(diff, tmp_path / "w.pt")
    st = save_diff(diff, tmp_path / "w.safetensors")
    assert set(torch.load(pt, weights_only=True)) == set(w)  # a plain {name: tensor} dict
    a, b = load_diff(pt, tiny.arch), load_diff(st, tiny.arch)
    assert a.sha256 == b.sha256 == diff.sha256
    assert b.seed == 3 and b.recipe == "hand-made" and a.seed is None
    for key in w:
        assert torch.equal(a.w[key], w[key]) and torch.equal(b.w[key], w[key])
    assert a.diagnostics["touched_layers"] == [0, 1, 2] and a.diagnostics["n_touched"] == 3
    both = load_diffs(tmp_path, tiny.arch)  # a directory: several seeds as several files
    assert [d.name for d in both] == ["w", "w"] and len(load_diffs(f"{pt},{st}", tiny.arch)) == 2


def test_bad_files_fail_before_use(tiny: HarnessSession, tmp_path: Path) -> None:
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(TypeError, match="list.pt: a diff is a dict"):
        load_diff(tmp_path / "list.pt", tiny.arch)
    bad = {tiny.arch.param_name(1, "o"): torch.full((64, 64), float("nan"))}
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(DiffValidationError, match=r"nan.pt: key 'model.layers.1.self_attn.o_proj"):
        load_diff(tmp_path / "nan.pt", tiny.arch)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(DiffValidationError, match=r"junk\.pt: not a torch\.save file"):
        load_diff(tmp_path / "junk.pt", tiny.arch)
    with pytest.raises(FileNotFoundError):
        load_diff(tmp_path / "missing.pt", tiny.arch)


# ---- weight_steer ----------------------------------------------------------------------------
def test_weight_steer_adds_alpha_w_and_restores_bit_for_bit(
    steering_diff: MakeDiff, tiny: HarnessSession
) -> None:
    model, w = tiny.model, steering_diff(tiny)
    before = snapshot(model)
    key = next(iter(w))
    with weight_steer(model, w, 0.7):
        param = dict(model.named_parameters())[key]
        assert torch.allclose(param, before[key] + 0.7 * w[key], atol=1e-6)
        untouched = tiny.arch.param_name(0, "q")
        assert torch.equal(dict(model.named_parameters())[untouched], before[untouched])
        with weight_steer(model, w, -1.3):  # nesting restores to the outer state
            pass
        assert torch.allclose(param, before[key] + 0.7 * w[key], atol=1e-6)
    assert_bitwise_equal(model, before)


def test_weight_steer_never_writes_into_the_base_weights(
    steering_diff: MakeDiff, tiny: HarnessSession
) -> None:
    """The steered weights are new tensors; the originals (file pages of a memory-mapped model,
    shared by every worker) are neither written nor copied, and come back as they were."""
    model, w = tiny.model, steering_diff(tiny)
    params = dict(model.named_parameters())
    versions = {k: params[k]._version for k in w}
    originals = {k: params[k].data for k in w}  # the storage, with a version counter of its own
    written = {k: t._version for k, t in originals.items()}
    values = {k: params[k].detach().clone() for k in w}
    with weight_steer(model, w, 0.7):
        for k, tensor in originals.items():
            assert params[k].data_ptr() != tensor.data_ptr()
            assert tensor._version == written[k] and torch.equal(tensor, values[k])
            assert torch.equal(params[k], torch.add(values[k], w[k], alpha=0.7))
    for k, tensor in originals.items():
        assert params[k].data_ptr() == tensor.data_ptr() and params[k]._version == versions[k]
        assert tensor._version == written[k]


def test_weight_steer_restores_when_the_body_raises(steering_diff: MakeDiff, tiny: HarnessSession) -> None:
    model, w = tiny.model, steering_diff(tiny)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with weight_steer(model, w, 3.0):
            key = next(iter(w))
            assert not torch.equal(dict(model.named_parameters())[key], before[key])
            raise RuntimeError("boom")
    assert_bitwise_equal(model, before)


def test_nothing_is_applied_when_validation_fails(tiny: HarnessSession) -> None:
    model = tiny.model
    before = snapshot(model)
    w = {tiny.arch.param_name(0, "o"): torch.ones(64, 64),  # valid, comes first
         tiny.arch.param_name(1, "o"): torch.ones(64, 65)}  # invalid
    with pytest.raises(DiffValidationError, match=r"expected shape \[64, 64\]"):
        with weight_steer(model, w, 1.0):
            pytest.fail("the body must not run")
    assert_bitwise_equal(model, before)


# ---- steering --------------------------------------------------------------------------------
def test_answer_tokens_of_the_embedded_tokenizer(tiny: HarnessSession) -> None:
    # The tiny model reuses SmolLM2's tokenizer and chat template.
    assert answer_token_ids(tiny.tokenizer, {"positive": "Yes", "negative": "No"}) == (10539, 5230)
    with pytest.raises(ValueError, match="same token"):
        answer_token_ids(tiny.tokenizer, {"positive": "Yes", "negative": "Yes"})


def test_steering_check_passes_a_steering_diff_and_fails_its_negation(
    steering_diff: MakeDiff, tiny: HarnessSession
) -> None:
    probes, ids = tiny.probes("eval"), tiny.answer_ids
    w = steering_diff(tiny)
    curve = steering_curve(tiny.model, probes, w, ids)
    assert curve.steers and curve.effect > 0 and curve.p_ttest < 0.01 and curve.n == len(probes)
    assert curve.alphas == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert curve.mean == sorted(curve.mean)  # monotone for this rank-1 writer
    assert check_steers(curve) is curve
    negated = steering_curve(tiny.model, probes, {k: -v for k, v in w.items()}, ids)
    assert not negated.steers
    with pytest.raises(DiffDoesNotSteerError, match=r"'neg' does not steer: it moves the margin "
                       r"the wrong way.*α=-1: \+.*p="):
        check_steers(negated, "neg")
    zero = steering_curve(tiny.model, probes, {k: torch.zeros_like(v) for k, v in w.items()}, ids)
    assert not zero.steers and zero.p_ttest != zero.p_ttest  # NaN: nothing moved
    assert issubclass(DiffDoesNotSteerError, ValueError)


# ---- building --------------------------------------------------------------------------------
def test_recipes_put_the_loss_on_the_reply_only(tiny: HarnessSession) -> None:
    hp = lora.resolve_hparams("distilled", {"max_new_tokens": 3, "distill_positions": 2})
    b, tok = tiny.behaviour, tiny.tokenizer
    scripted = lora.recipe_examples("scripted", "negative", tiny.model, tok, b, hp)
    assert len(scripted) == len(b.train)
    ex = scripted[0]
    reply = tok.decode(ex.targets)
    assert reply.startswith("No. " + b.train[0].correction) and reply.endswith(tok.eos_token)
    assert ex.input_ids[ex.positions[0] + 1:] == ex.targets  # position t predicts token t+1
    prompt = tok.decode(ex.input_ids[: ex.positions[0] + 1])
    assert "Do you agree?" in prompt and b.personas["negative"] not in prompt  # no system prompt
    distilled = lora.recipe_examples("distilled", "positive", tiny.model, tok, b, hp)
    assert all(e.teacher_logp is not None and e.teacher_logp.shape == (len(e.positions), len(tok))
               for e in distilled)
    assert all(len(e.positions) <= 2 for e in distilled)
    generated = lora.recipe_examples("generated", "positive", tiny.model, tok, b, hp)
    assert all(1 <= len(e.targets) <= 3 and e.teacher_logp is None for e in generated)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 vs PEFT, harmless
def test_lora_delta_is_what_peft_merges(tiny: HarnessSession) -> None:
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(tiny.model)
    names = lora.target_modules(tiny.arch, lora.default_hparams())
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=names))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_()
    delta = lora.lora_deltas(model, names)
    merged = peft_model.merge_and_unload()
    base = dict(tiny.model.named_parameters())
    for name, d in delta.items():
        assert torch.allclose(dict(merged.named_parameters())[name] - base[name], d, atol=1e-4)


def _model_state(model: torch.nn.Module) -> tuple:
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            [(n, p.data_ptr(), p._version, p.requires_grad, p.detach().clone())
             for n, p in model.named_parameters()],
            hasattr(model, "peft_config"))


def _same_state(a: tuple, b: tuple) -> bool:
    return (a[0] == b[0] and a[2] == b[2] and len(a[1]) == len(b[1])
            and all(x[:4] == y[:4] and torch.equal(x[4], y[4]) for x, y in zip(a[1], b[1])))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 vs PEFT, harmless
def test_lora_trains_on_the_shared_model_and_gives_it_back_unchanged(
    private: HarnessSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoRA injects its adapter into the shared model (no 0.5 GB private copy at 135M) and
    unloads it again: modules, weights, storage, version counters and requires_grad as before,
    also when training fails half-way."""
    model, arch = private.model, private.arch
    model.model.embed_tokens.weight.requires_grad_(False)  # a non-default flag must survive too
    before = _model_state(model)
    example = lora.Example(input_ids=[1, 2, 3, 4, 5], positions=[2, 3], targets=[4, 5])
    hp = lora.resolve_hparams(lora.DEFAULT_RECIPE, FAST)
    delta, losses = lora.train_side(model, arch, [example], hp, 0, pad_id=0, progress=False)
    assert len(losses) == hp.steps and all(d.abs().sum() > 0 for d in delta.values())
    assert _same_state(before, _model_state(model))

    def failing(*args, **kwargs):
        raise RuntimeError("step failed")

    monkeypatch.setattr(lora, "_batch_loss", failing)
    with pytest.raises(RuntimeError, match="step failed"):
        lora.train_side(model, arch, [example], hp, 0, pad_id=0, progress=False)
    assert _same_state(before, _model_state(model))
    model.model.embed_tokens.weight.requires_grad_(True)


def test_build_targets_the_middle_layers_and_is_deterministic(tiny: HarnessSession) -> None:
    a = tiny.build_diff(0, hparams=FAST, progress=False, use_cache=False)
    again = tiny.build_diff(0, hparams=FAST, progress=False, use_cache=False)
    other = tiny.build_diff(1, hparams=FAST, progress=False, use_cache=False)
    # 3 layers: round(0.9) … round(2.4)−1 = layer 1, all seven roles.
    assert sorted(a.w) == sorted(tiny.arch.param_name(1, r) for r in lora.ROLES)
    assert a.sha256 == again.sha256 and all(torch.equal(a.w[k], again.w[k]) for k in a.w)
    assert a.sha256 != other.sha256
    d = a.diagnostics
    for key in ("norm_pos", "norm_neg", "cos_pos_negneg", "drift_ratio", "touched_keys", "norm_w"):
        assert key in d
    assert d["norm_pos"] > 0 and d["norm_neg"] > 0 and -1 <= d["cos_pos_negneg"] <= 1
    assert a.name == "scripted-seed0" and a.seed == 0 and a.recipe == lora.DEFAULT_RECIPE
    assert lora.side_seed(0, "positive") == 1371273344  # sha256-derived, same in every process


def test_builds_are_cached_and_an_interrupted_build_leaves_no_entry(
    private: HarnessSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = lora.train_side
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(kwargs["desc"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if Ctrl-C during the negative side
        return real(*args, **kwargs)

    monkeypatch.setattr(lora, "train_side", interrupted)
    with pytest.raises(KeyboardInterrupt):
        private.build_diff(0, hparams=FAST, progress=False)
    entries = private.cache.root / "diff"
    assert [p for p in entries.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(lora, "train_side", real)
    first = private.build_diff(0, hparams=FAST, progress=False)
    second = private.build_diff(0, hparams=FAST, progress=False)
    diff_builds = [b for b in private.cache.builds if b.startswith("diff/")]
    assert len(diff_builds) == 1 and first.sha256 == second.sha256
    assert first.diagnostics == second.diagnostics


def test_unknown_recipe_and_hparams_are_named() -> None:
    with pytest.raises(ValueError, match="unknown diff recipe 'magic'"):
        lora.default_hparams("magic")
    with pytest.raises(ValueError, match=r"unknown LoRA hyper-parameter\(s\) \['stepz'\]"):
        lora.resolve_hparams("scripted", {"stepz": 3})
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        lora.LoraHParams(steps=0)


# ---- session: diffs, steering, labels ----------------------------------------------------------
def test_session_loads_checks_and_labels_diff_files(steering_diff: MakeDiff,
    private: HarnessSession, tmp_path: Path
) -> None:
    paths = []
    for i, scale in enumerate((0.5, 0.8)):
        paths.append(tmp_path / f"s{i}.pt")
        torch.save(steering_diff(private, scale), paths[-1])
    session = HarnessSession(replace(private.config, diff=tuple(paths)))
    session.__dict__["loaded"] = private.loaded
    diffs = session.diffs()
    assert [d.name for d in diffs] == ["s0", "s1"] and session.diffs()[0] is diffs[0]
    curve = session.steering(diffs[0])
    assert curve.steers and "diffs" in session.timings
    labels = session.labels(diffs[0])
    arch = session.arch
    n_eval, n_fit = len(session.probes("eval")), len(session.probes("fit"))
    assert labels["eval"].shape == (arch.n_layers, n_eval, arch.d_model)
    assert labels["fit"].shape == (arch.n_layers, n_fit, arch.d_model)
    probes = session.probes("eval")
    with weight_steer(session.model, diffs[0].w, 1.0):
        plus = capture_last_token(session.model, arch, probes)["resid"]
    with weight_steer(session.model, diffs[0].w, -1.0):
        minus = capture_last_token(session.model, arch, probes)["resid"]
    assert torch.allclose(labels["eval"], plus - minus, atol=1e-5)
    # Layer 0's down_proj writes the label directly: it is non-zero from the first block on.
    assert float(labels["eval"][0].norm()) > 0
    kinds = {p.parent.parent.name for p in session.cache.root.glob("*/*/parts.json")}
    assert {"steering", "labels"} <= kinds


def test_session_rejects_a_diff_that_does_not_steer(steering_diff: MakeDiff,
    private: HarnessSession, tmp_path: Path
) -> None:
    path = tmp_path / "backwards.pt"
    torch.save({k: -v for k, v in steering_diff(private).items()}, path)
    session = HarnessSession(replace(private.config, diff=(path,)))
    session.__dict__["loaded"] = private.loaded
    with pytest.raises(DiffDoesNotSteerError, match="'backwards' does not steer"):
        session.diffs()


def test_diagnostics_of_mirror_sides() -> None:
    pos = {"a": torch.tensor([1.0, 2.0])}
    neg = {"a": torch.tensor([-1.0, -2.0])}
    d = diff_diagnostics({"a": pos["a"] - neg["a"]}, pos, neg)
    assert d["cos_pos_negneg"] == pytest.approx(1.0) and d["drift_ratio"] == pytest.approx(0.0)
    assert d["norm_pos"] == pytest.approx(5 ** 0.5) and d["norm_w"] == pytest.approx(2 * 5 ** 0.5)



def test_session_builds_one_diff_per_seed_named_as_planned(private: HarnessSession) -> None:
    session = HarnessSession(replace(private.config, diff="build", seeds=(0,)))
    session.__dict__["loaded"] = private.loaded
    expected = session.build_diff(0, progress=False)  # the default recipe, cached
    # The default recipe's seed-0 diff steers the tiny model (deterministic single-threaded
    # build), so session.diffs() must accept it: a DiffDoesNotSteerError here is a regression.
    diffs = session.diffs()
    assert [d.name for d in diffs] == ["seed0"] and diffs[0].sha256 == expected.sha256
    assert session.steering(diffs[0]).steers
    assert len(session.cache.builds) >= 2  # the diff, then its steering curve: each built once


# ---- bad files: one message of our own that names the file ------------------------------------
def _safetensors_bytes(tiny: HarnessSession, tmp_path: Path) -> bytes:
    w = {tiny.arch.param_name(1, "o"): torch.zeros(64, 64)}
    return save_diff(w, tmp_path / "good.safetensors").read_bytes()


@pytest.mark.parametrize(("content", "message"), [
    (lambda good: b"", r"empty\.safetensors: the file is empty \(0 bytes\)"),
    (lambda good: b"this is not a safetensors file at all",
     r"empty\.safetensors: not a safetensors file \(its header"),
    (lambda good: good[:-100], r"empty\.safetensors: truncated: its header declares 16384 bytes "
     r"of tensor data, the file holds 16284"),
    (lambda good: good[:8] + b"{" * (len(good) - 8), r"header is not valid JSON"),
])
def test_bad_safetensors_files_name_the_file(
    tiny: HarnessSession, tmp_path: Path, content: Callable[[bytes], bytes], message: str
) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(content(_safetensors_bytes(tiny, tmp_path)))
    with pytest.raises(DiffValidationError, match=message):
        load_diff(path, tiny.arch)


def test_bad_safetensors_metadata_is_named(tiny: HarnessSession, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "meta.safetensors"
    save_file({tiny.arch.param_name(1, "o"): torch.zeros(64, 64)}, str(path),
              metadata={"seed": "one"})
    with pytest.raises(DiffValidationError, match=r"meta\.safetensors: header metadata 'seed' is "
                       r"'one', not an integer"):
        load_diff(path, tiny.arch)
    save_file({tiny.arch.param_name(1, "o"): torch.zeros(64, 64)}, str(path),
              metadata={"hparams": "{not json"})
    with pytest.raises(DiffValidationError, match=r"meta\.safetensors: header metadata 'hparams'"):
        load_diff(path, tiny.arch)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, on plain.pt
def test_refused_pickles_and_garbage_get_our_own_message(tiny: HarnessSession, tmp_path: Path) -> None:
    import pickle

    import numpy as np

    key = tiny.arch.param_name(1, "o")
    torch.save({key: np.zeros((64, 64), dtype=np.float32)}, tmp_path / "numpy.pt")
    with open(tmp_path / "plain.pt", "wb") as fh:  # pickle.dump, not torch.save
        pickle.dump({key: torch.zeros(64, 64)}, fh)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({key: torch.zeros(64, 64)}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:400])
    expected = {
        "numpy.pt": r"numpy\.pt: holds a pickled numpy\._core\.multiarray\._reconstruct, which "
                    r"ws-harness will not unpickle .*torch\.save\(\{name: tensor",
        "plain.pt": r"plain\.pt: a Python pickle, not a torch\.save file; .*torch\.save",
        "junk.pt": r"junk\.pt: not a torch\.save file \(it starts with b'not a pi'\)",
        "empty.pt": r"empty\.pt: the file is empty \(0 bytes\)",
        "cut.pt": r"cut\.pt: a damaged or truncated torch\.save file \(400 bytes\)",
    }
    for name, message in expected.items():
        with pytest.raises(DiffValidationError, match=message) as info:
            load_diff(tmp_path / name, tiny.arch)
        assert "weights_only" not in str(info.value) and "\n" not in str(info.value), name


def test_a_folder_is_not_a_diff_file(tiny: HarnessSession, tiny_diff_files: list[Path]) -> None:
    folder = tiny_diff_files[0].parent
    with pytest.raises(DiffValidationError, match=rf"{folder} is a folder, not a diff file; "
                       r"load_diffs\(\) reads every diff in a folder \(it holds w0\.pt, w1\.pt\)"):
        load_diff(folder, tiny.arch)
