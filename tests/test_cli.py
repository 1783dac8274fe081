"""The `ws-harness diff build|check` console script, run in-process on the tiny random model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ws_harness import cli
from ws_harness.diffs import load_diff
from ws_harness.session import HarnessSession


@pytest.fixture
def cache_dir(tiny: HarnessSession, tmp_path: Path) -> Path:
    """A fresh cache dir, seeded with the converted tokenizer so random:tiny loads in a second."""
    tiny.loaded  # noqa: B018 - make sure the shared cache holds the tokenizer
    target = tmp_path / "cache"
    for kind in ("tokenizer", "hashes"):
        shutil.copytree(tiny.cache.root / kind, target / kind, dirs_exist_ok=True)
    return target


def run(args: list[str], cache_dir: Path) -> int:
    return cli.main([*args, "--model", "random:tiny", "--cache-dir", str(cache_dir)])


def test_build_then_check_round_trip(
    cache_dir: Path, tmp_path: Path, tiny: HarnessSession, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "w.pt"
    rc = run(["diff", "build", "--seed", "0", "--out", str(out), "--steps", "2", "--force",
              "--no-progress"], cache_dir)
    built = capsys.readouterr()
    # Seed 0, 2 steps on random:tiny steers by a wide margin (effect +0.23, t ≈ 107, p ≈ 3e-28;
    # builds are single-threaded and deterministic), so the one right outcome is exit 0.
    assert rc == cli.EXIT_OK, built.err
    assert out.is_file() and "α=+1.0" in built.out and "‖Δ⁺‖" in built.out
    written = torch.load(out, weights_only=True)
    assert isinstance(written, dict) and all(isinstance(v, torch.Tensor) for v in written.values())
    # The file holds exactly the diff the library builds for that seed and step count.
    reference = tiny.build_diff(0, hparams={"steps": 2}, progress=False, use_cache=False)
    assert load_diff(out, tiny.arch).sha256 == reference.sha256
    rc_check = run(["diff", "check", str(out)], cache_dir)
    checked = capsys.readouterr()
    assert rc_check == cli.EXIT_OK  # the same verdict from the file as from the build
    assert checked.out.splitlines()[-4:-1] == built.out.splitlines()[-4:-1]  # α=0…+1 rows
    assert checked.out.splitlines()[-1] == f"ok: {out} is valid for random:tiny and steers"


def test_check_passes_a_steering_file_and_fails_a_backwards_one(
    cache_dir: Path, tmp_path: Path, tiny_diff_files: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = tiny_diff_files[0]  # hand-made: down_proj writes along W_U[Yes] − W_U[No]
    w = torch.load(good, weights_only=True)
    torch.save({k: -v for k, v in w.items()}, tmp_path / "backwards.pt")
    assert run(["diff", "check", str(good)], cache_dir) == cli.EXIT_OK
    assert "steers" in capsys.readouterr().out
    assert run(["diff", "check", str(tmp_path / "backwards.pt")], cache_dir) == 1
    err = capsys.readouterr().err
    assert "diff 'backwards' does not steer" in err and "α=+1" in err


def test_check_reports_an_invalid_file(
    cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"model.layers.1.mlp.down_proj.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    assert run(["diff", "check", str(tmp_path / "bad.pt")], cache_dir) == cli.EXIT_INVALID
    assert "expected shape [64, 128]" in capsys.readouterr().err


def test_build_refuses_a_bad_output_name(cache_dir: Path, tmp_path: Path) -> None:
    assert run(["diff", "build", "--seed", "0", "--out", str(tmp_path / "w.npy")], cache_dir) == 2
    with pytest.raises(SystemExit):  # argparse: --seed is required
        run(["diff", "build", "--out", str(tmp_path / "w.pt")], cache_dir)


def test_check_reports_a_bad_safetensors_file_in_one_line(
    cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "cut.safetensors"
    save_file({"model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 64)}, str(bad))
    bad.write_bytes(bad.read_bytes()[:-10])
    assert run(["diff", "check", str(bad)], cache_dir) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: invalid diff: {bad}: truncated"), err


def test_check_on_a_folder_says_it_is_a_folder(
    cache_dir: Path, tiny_diff_files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tiny_diff_files[0].parent
    assert run(["diff", "check", str(folder)], cache_dir) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert err == (f"error: {folder} is a folder, not a diff file; check one file at a time, "
                   f"e.g. ws-harness diff check {folder / 'w0.pt'}\n"), err


@pytest.mark.parametrize("action", [["diff", "check", "w.pt"], ["diff", "build", "--seed", "0",
                                                                  "--out", "w.pt"]])
def test_a_bad_model_is_reported_as_a_model_error(
    cache_dir: Path, tmp_path: Path, tiny_diff_files: list[Path], action: list[str],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_diff_files[0], tmp_path / "w.pt")
    (tmp_path / "empty_model").mkdir()
    rc = cli.main([*action, "--model", str(tmp_path / "empty_model"), "--cache-dir",
                   str(cache_dir)])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_INVALID
    assert err == (f"error: model {str(tmp_path / 'empty_model')!r}: model directory "
                   f"{tmp_path / 'empty_model'} has no config.json; point --ws-model (ws-harness: "
                   "--model) at a Hugging Face model directory (config.json + weights + "
                   "tokenizer)\n"), err
