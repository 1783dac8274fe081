"""A warm run (every result cached) loads no model: identity, shape, prompts and diffs come from the cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ws_harness.arch import ROLES
from ws_harness.session import HarnessSession
from ws_harness.shape import ModelShape

WriteProject = Callable[[pytest.Pytester, Path, list[Path]], Path]

HYPOTHESIS = '''
"""my_write: the top-k left singular vectors of W_o."""
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="test", axis="write",
           refuted=["r_act", "r_causal", "r_w_combined", "r_w_struct", "r_act_specific"])
def basis(fit, layer):
    return left_basis(fit.weights(layer).o, fit.k)
'''


def _fresh(session: HarnessSession) -> HarnessSession:
    return HarnessSession(replace(session.config))


@pytest.mark.parametrize("spec", ["random:tiny", "random:tiny-untied"])
def test_the_cached_shape_agrees_with_the_architecture(tiny: HarnessSession, spec: str) -> None:
    session = HarnessSession(replace(tiny.config, model=spec))
    shape, arch = session.shape, session.arch  # arch checks param_shapes against the shape
    assert (shape.n_layers, shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim,
            shape.d_ff) == (arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads,
                            arch.head_dim, arch.d_ff)
    assert shape.param_shapes() == arch.param_shapes()
    for name in shape.shapes:
        assert shape.parse_param_name(name) == arch.parse_param_name(name), name
    for layer in range(shape.n_layers):
        for role in ROLES:
            assert shape.param_name(layer, role) == arch.param_name(layer, role)


def test_a_shape_without_the_seven_roles_is_refused() -> None:
    config = {"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
              "intermediate_size": 16}
    with pytest.raises(ValueError, match=r"no parameter 'model\.layers\.0\.self_attn\.q_proj"):
        ModelShape.from_config(config, {"model.embed_tokens.weight": [10, 8]})
    with pytest.raises(ValueError, match="lacks 'intermediate_size'"):
        ModelShape.from_config({k: v for k, v in config.items() if k != "intermediate_size"}, {})


def test_a_second_session_reads_identity_prompts_and_answers_without_the_model(
    tiny: HarnessSession,
) -> None:
    first = tiny.probes("eval", "positive"), tiny.answer_ids, tiny.shape  # fills the cache
    later = _fresh(tiny)
    probes = later.probes("eval", "positive")
    assert probes.texts == first[0].texts
    assert torch.equal(probes.input_ids, first[0].input_ids)
    assert torch.equal(probes.attention_mask, first[0].attention_mask)
    assert later.answer_ids == first[1]
    assert later.shape == first[2]
    assert later.model_key() == tiny.model_key()
    assert later.identity.fingerprint == tiny.loaded.fingerprint
    assert "loaded" not in later.__dict__  # no weights were read


def test_a_cached_diff_is_read_without_the_model(tiny: HarnessSession) -> None:
    hparams = {"steps": 2, "batch_size": 2}
    built = tiny.build_diff(0, hparams=hparams, progress=False)
    later = _fresh(tiny)
    again = later.build_diff(0, hparams=hparams, progress=False)
    assert again.sha256 == built.sha256 and again.name == built.name
    assert "loaded" not in later.__dict__


def test_a_warm_sweep_loads_no_model_and_gives_the_same_tables(
    pytester: pytest.Pytester, tiny_diff_files: list[Path], write_tiny_project: WriteProject,
    tmp_path: Path,
) -> None:
    folder = write_tiny_project(pytester, tmp_path / "cache", tiny_diff_files)
    (folder / "test_my_write.py").write_text(HYPOTHESIS)
    sweep = ("hypotheses", "-p", "no:cacheprovider", "--deselect", "ws_ranking")
    tables, timings = {}, {}
    for run in ("cold", "warm"):
        pytester.runpytest_subprocess(*sweep).assert_outcomes(passed=1, xfailed=10)
        out = pytester.path / "out"
        tables[run] = {n: (out / f"{n}.csv").read_bytes() for n in ("per_layer", "summary", "claims")}
        timings[run] = next(iter(json.loads((out / "timings.json").read_text()).values()))
    assert timings["cold"]["model"] > 0 and timings["cold"]["scores"] > 0
    assert "model" not in timings["warm"], timings["warm"]  # neither weights nor tokenizer
    assert "scores" not in timings["warm"] and "bases" not in timings["warm"]
    assert tables["warm"] == tables["cold"]


def test_a_fully_cached_sweep_runs_in_one_process_and_a_change_brings_the_workers_back(
    pytester: pytest.Pytester, tiny_diff_files: list[Path], write_tiny_project: WriteProject,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under `make test` this test runs in an xdist worker; the sweep below is its own controller.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    folder = write_tiny_project(pytester, tmp_path / "cache", tiny_diff_files)
    (folder / "test_my_write.py").write_text(HYPOTHESIS)
    sweep = ("hypotheses", "-p", "no:cacheprovider", "--deselect", "ws_ranking", "-n", "2")
    note = "*every result of this sweep is cached (run record *); running in this process " \
           "instead of 2 xdist workers*"
    out = pytester.path / "out"

    first = pytester.runpytest_subprocess(*sweep)
    first.assert_outcomes(passed=1, xfailed=10)
    first.stdout.no_fnmatch_line(note)
    assert "[gw1]" in first.stdout.str() or "2 workers" in first.stdout.str()
    cold = (out / "summary.csv").read_bytes()
    records = list((tmp_path / "cache" / "runs").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["entries"]

    second = pytester.runpytest_subprocess(*sweep)
    second.assert_outcomes(passed=1, xfailed=10)
    second.stdout.fnmatch_lines([note])
    assert (out / "summary.csv").read_bytes() == cold

    # An edited hypothesis is a different sweep: workers again, and a second record.
    (folder / "test_my_write.py").write_text(HYPOTHESIS + "\n# edited\n")
    third = pytester.runpytest_subprocess(*sweep)
    third.assert_outcomes(passed=1, xfailed=10)
    third.stdout.no_fnmatch_line(note)
    assert len(list((tmp_path / "cache" / "runs").glob("*.json"))) == 2
    # A removed entry means the record no longer holds: workers again.
    entries = json.loads(records[0].read_text())["entries"]
    (folder / "test_my_write.py").write_text(HYPOTHESIS)
    import shutil

    shutil.rmtree(tmp_path / "cache" / next(e for e in entries if e.startswith("scores/")))
    fourth = pytester.runpytest_subprocess(*sweep)
    fourth.assert_outcomes(passed=1, xfailed=10)
    fourth.stdout.no_fnmatch_line(note)
    assert (out / "summary.csv").read_bytes() == cold


def test_the_worker_count_is_not_part_of_the_run_fingerprint() -> None:
    from ws_harness.warm import _args_without_workers

    assert _args_without_workers(["hypotheses/", "-n", "4", "-q"]) == ["hypotheses/", "-q"]
    assert _args_without_workers(["-n4", "--numprocesses=2", "x"]) == ["x"]
    assert _args_without_workers(["--numprocesses", "auto", "-k", "foo"]) == ["-k", "foo"]
    assert _args_without_workers(["--basetemp=/tmp/x", "--basetemp", "/tmp/y", "h"]) == ["h"]
