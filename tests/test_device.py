"""--ws-device / --ws-dtype: clear errors, forwards on a copy, cache keys that say where they ran."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ws_harness import attribution, capture, retention
from ws_harness.config import ConfigError, resolve_config
from ws_harness.device import DEFAULT, resolve_placement
from ws_harness.session import HarnessSession, InputError
from ws_harness.steering import answer_logit_diff

WriteProject = Callable[[pytest.Pytester, Path, list[Path]], Path]  # conftest fixture
NO_CUDA = not torch.cuda.is_available()


def test_auto_is_the_cpu_in_float32_without_a_gpu() -> None:
    if not NO_CUDA:
        pytest.skip("this machine has a CUDA GPU: auto picks it")
    assert resolve_placement("auto", "float32") == DEFAULT
    assert DEFAULT.is_default and DEFAULT.key() == {}  # default cache keys are unchanged
    assert resolve_placement("cpu", "bfloat16").key() == {
        "forward_device": "cpu", "forward_dtype": "bfloat16"}


@pytest.mark.parametrize(("device", "dtype", "message"), [
    ("tpu", "float32", "--ws-device: 'tpu' is not one of auto, cpu, cuda, mps"),
    ("cuda:", "float32", "--ws-device: 'cuda:' is not one of"),
    ("cpu:0", "float32", "--ws-device: 'cpu:0' is not one of"),
    ("cpu", "int8", "--ws-dtype: 'int8' is not one of float32, bfloat16, float16"),
    ("cpu", "float16", "--ws-dtype float16 needs a GPU.*pass --ws-dtype bfloat16 or float32"),
])
def test_a_bad_placement_names_the_option_and_the_fix(device: str, dtype: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_placement(device, dtype)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="sees no CUDA GPU.*pass --ws-device cpu or auto"):
        resolve_placement("cuda", "bfloat16")


def test_the_options_are_settings_with_checked_values(tmp_path: Path) -> None:
    config = resolve_config(tmp_path, {"device": "cpu", "dtype": "bfloat16"}, environ={})
    assert (config.device, config.dtype) == ("cpu", "bfloat16")
    assert resolve_config(tmp_path, {}, environ={"WS_DEVICE": "cuda:1"}).device == "cuda:1"
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, mps or cuda:N"):
        resolve_config(tmp_path, {"device": "gpu"}, environ={})
    with pytest.raises(ConfigError, match="dtype must be one of float32, bfloat16, float16"):
        resolve_config(tmp_path, {"dtype": "fp8"}, environ={})


@pytest.fixture(scope="module")
def bf16(tiny: HarnessSession) -> HarnessSession:
    return HarnessSession(replace(tiny.config, device="cpu", dtype="bfloat16"))


def test_bfloat16_forwards_run_on_a_copy_and_key_their_entries(
    tiny: HarnessSession, bf16: HarnessSession, steering_diff: Callable[..., dict]
) -> None:
    """The base model (bases, targets) stays float32; forwards run on a bfloat16 copy whose
    captures agree with float32 to bfloat16's precision, and are cached under their own key."""
    assert tiny.forward_model is tiny.model  # the default: no copy
    assert bf16.forward_model is not bf16.model
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.forward_model.parameters()} == {torch.bfloat16}
    assert bf16.capture_key("fit", "clean", "last") != tiny.capture_key("fit", "clean", "last")
    assert "forward_dtype" not in tiny.model_key()

    ref = tiny.capture("fit", "clean")["resid"]
    got = bf16.capture("fit", "clean")["resid"]
    assert got.dtype == torch.float32 and got.shape == ref.shape
    rel = float((got - ref).norm() / ref.norm())
    assert 1e-6 < rel < 5e-2, rel  # not the float32 numbers, but close to them

    probes, ids = tiny.probes("eval"), tiny.answer_ids
    margin32 = answer_logit_diff(tiny.forward_model, probes, ids)
    margin16 = answer_logit_diff(bf16.forward_model, probes, ids)
    assert margin16.device.type == "cpu"
    assert torch.allclose(margin16, margin32, atol=0.15 * float(margin32.abs().max()) + 0.05)

    w = steering_diff(tiny)
    deltas = retention.write_part(w, tiny.arch)
    effect32 = retention.steering_effects(tiny.forward_model, tiny.forward_arch, probes, ids,
                                          {"w": deltas})["w"]
    effect16 = retention.steering_effects(bf16.forward_model, bf16.forward_arch, probes, ids,
                                          {"w": deltas})["w"]
    assert float(effect32.mean()) > 0.5  # the diff steers
    assert abs(float(effect16.mean()) / float(effect32.mean()) - 1) < 0.15

    grads32 = attribution.path_gradients(tiny.forward_model, tiny.forward_arch, probes, ids, w,
                                         n_nodes=2, measure=False)
    grads16 = attribution.path_gradients(bf16.forward_model, bf16.forward_arch, probes, ids, w,
                                         n_nodes=2, measure=False)
    assert abs(grads16.s_linear / grads32.s_linear - 1) < 0.15
    assert all(g.dtype == torch.float32 and g.device.type == "cpu"
               for g in grads16.grads.values())


def test_non_lora_families_refuse_reduced_precision(bf16: HarnessSession) -> None:
    from ws_harness.lora import Example, LoraHParams, train_side

    example = Example(input_ids=[1, 2, 3, 4], positions=[2], targets=[4])
    with pytest.raises(ValueError, match="building dora diffs needs float32 forwards"):
        train_side(bf16.forward_model, bf16.forward_arch, [example], LoraHParams(), 0,
                   pad_id=0, progress=False, family="dora")


def test_a_device_this_machine_lacks_is_reported_once(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject,
) -> None:
    if not NO_CUDA:
        pytest.skip("this machine has a CUDA GPU")
    folder = write_tiny_project(pytester, tiny.config.cache_dir, tiny_diff_files)
    (folder / "test_my_write.py").write_text(textwrap.dedent('''\
        """A test hypothesis."""
        from ws_harness.hypothesis import per_layer
        from ws_harness.linalg import left_basis


        @per_layer(family="W:write", axis="write")
        def basis(fit, layer):
            return left_basis(fit.weights(layer).o, fit.k)
        '''))
    result = pytester.runpytest_subprocess("hypotheses", "-p", "no:cacheprovider",
                                           "--ws-device", "cuda")
    result.assert_outcomes(failed=1, deselected=None)
    result.stdout.fnmatch_lines([
        "*ws-harness cannot run the hypotheses: --ws-device cuda: torch * sees no CUDA GPU*"
        "pass --ws-device cpu or auto*"])


def test_capture_moves_inputs_to_the_model(bf16: HarnessSession) -> None:
    """Probe batches on the CPU reach a model wherever it is (here: a CPU copy in bfloat16)."""
    probes = bf16.probes("fit")
    got = capture.capture_last_token(bf16.forward_model, bf16.forward_arch, probes.slice(0, 3))
    assert got["resid"].shape[1] == 3 and got["resid"].dtype == torch.float32
    assert got["resid"].device.type == "cpu"


def test_a_bad_placement_is_an_input_error_of_the_session(tiny: HarnessSession) -> None:
    session = HarnessSession(replace(tiny.config, device="cpu", dtype="float16"))
    with pytest.raises(InputError, match="float16 needs a GPU"):
        session.preflight()


def test_weight_steer_in_bfloat16_rounds_once_and_restores(
    bf16: HarnessSession, tiny: HarnessSession, steering_diff: Callable[..., dict]
) -> None:
    from ws_harness.diffs import weight_steer

    w = steering_diff(tiny)
    name = next(iter(w))
    param = dict(bf16.forward_model.named_parameters())[name]
    before = param.detach().clone()
    with weight_steer(bf16.forward_model, w, 1.0):
        expected = (before.float() + w[name].float()).to(torch.bfloat16)
        assert torch.equal(param, expected)
    assert torch.equal(param, before)


def test_the_cli_refuses_a_device_this_machine_lacks(tiny: HarnessSession, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from ws_harness.cli import main

    if not NO_CUDA:
        pytest.skip("this machine has a CUDA GPU")
    code = main(["diff", "build", "--model", "random:tiny", "--cache-dir",
                 str(tiny.config.cache_dir), "--device", "cuda", "--seed", "0",
                 "--out", str(tmp_path / "w.pt"), "--no-progress"])
    assert code == 2 and not (tmp_path / "w.pt").exists()
    assert "error: --ws-device cuda: torch" in capsys.readouterr().err


def test_building_non_lora_diffs_in_bfloat16_is_refused_before_any_work(
    tiny: HarnessSession, tmp_path: Path
) -> None:
    session = HarnessSession(replace(tiny.config, diff="build", adapter="dora", device="cpu",
                                     dtype="bfloat16", cache_dir=tmp_path / "fresh"))
    with pytest.raises(InputError, match="building dora diffs needs float32 forwards.*"
                                         "pass --ws-dtype float32"):
        session.preflight()
    assert "loaded" not in session.__dict__  # refused before the model was even loaded
