"""Configuration layering and validation."""

from pathlib import Path

import pytest

from ws_harness.config import ConfigError, parse_seeds, resolve_config


def write_pyproject(root: Path, body: str) -> None:
    (root / "pyproject.toml").write_text("[tool.ws_harness]\n" + body)


def test_defaults_then_pyproject_then_env_then_cli(tmp_path: Path) -> None:
    write_pyproject(tmp_path, 'rank = 4\nseeds = [5, 6]\nmodel = "random:tiny"\n')
    cfg = resolve_config(tmp_path, {}, environ={})
    assert (cfg.rank, cfg.seeds, cfg.model) == (4, (5, 6), "random:tiny")
    assert cfg.cache_dir == tmp_path / ".ws-cache"
    cfg = resolve_config(tmp_path, {}, environ={"WS_RANK": "6", "WS_SEEDS": "1"})
    assert (cfg.rank, cfg.seeds) == (6, (1,))
    cfg = resolve_config(tmp_path, {"rank": "3"}, environ={"WS_RANK": "6"})
    assert cfg.rank == 3
    assert cfg.sources["rank"] == "--ws-rank"


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"rank": "0"}, "positive integer"),
        ({"rank": "eight"}, "not an integer"),
        ({"rank": "2.5"}, "not an integer"),
        ({"seeds": "0,x"}, "'x' is not an integer seed"),
        ({"seeds": "1,1"}, "repeat"),
        ({"seeds": "-1"}, "non-negative"),
        ({"model": "random:huge"}, "unknown random preset 'huge'"),
        ({"model": "not a model"}, "neither an embedded model"),
        ({"diff": "missing.pt"}, "missing.pt does not exist"),
        ({"behaviour": "flattery"}, "unknown behaviour 'flattery'"),
    ],
)
def test_invalid_values_name_the_setting(tmp_path: Path, cli: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        resolve_config(tmp_path, cli, environ={})
    assert "--ws-" in str(info.value)


def test_diff_accepts_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "diffs").mkdir()
    for name in ("b.pt", "a.safetensors", "notes.txt"):
        (tmp_path / "diffs" / name).write_bytes(b"")
    cfg = resolve_config(tmp_path, {"diff": "diffs"}, environ={})
    assert [p.name for p in cfg.diff] == ["a.safetensors", "b.pt"]
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="suffix '.bin'"):
        resolve_config(tmp_path, {"diff": "w.bin"}, environ={})
    with pytest.raises(ConfigError, match="no .pt or .safetensors"):
        (tmp_path / "empty").mkdir()
        resolve_config(tmp_path, {"diff": "empty"}, environ={})


def test_unknown_pyproject_key_is_rejected(tmp_path: Path) -> None:
    write_pyproject(tmp_path, "rnak = 4\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rnak'\]"):
        resolve_config(tmp_path, {}, environ={})


def test_env_error_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment variable WS_SEEDS"):
        resolve_config(tmp_path, {}, environ={"WS_SEEDS": "a"})


def test_parse_seeds_forms() -> None:
    assert parse_seeds("0, 1,2") == (0, 1, 2)
    assert parse_seeds([3]) == (3,)
    assert parse_seeds(7) == (7,)


def test_bad_option_fails_at_startup(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "ws_harness.plugin", "--ws-rank", "-3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ws-harness configuration: --ws-rank: rank must be a positive*"])
