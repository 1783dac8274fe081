"""Configuration layering and validation."""

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import tomllib

from ws_harness.config import (
    ENV_VARS,
    SETTINGS,
    ConfigError,
    HarnessConfig,
    cli_values,
    parse_seeds,
    resolve_config,
    settings_markdown,
)

REPO = Path(__file__).resolve().parents[1]
NAMES = [s.name for s in SETTINGS]


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
        ({"measure": "some"}, "measure must be one of top, all, none"),
        ({"device": "gpu"}, "device must be one of auto, cpu, cuda, mps or cuda:N"),
        ({"device": "mps:0"}, "device must be one of auto, cpu, cuda, mps or cuda:N"),
        ({"device": "cuda:"}, "device must be one of auto, cpu, cuda, mps or cuda:N"),
        ({"dtype": "half"}, "dtype must be one of float32, bfloat16, float16"),
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


def test_settings_table_is_the_one_source() -> None:
    assert NAMES == ["model", "diff", "seeds", "rank", "out", "cache_dir", "behaviour", "adapter",
                     "measure", "device", "dtype"]
    assert [f.name for f in fields(HarnessConfig) if f.name != "sources"] == NAMES
    defaults = HarnessConfig()
    for s in SETTINGS:
        assert getattr(defaults, s.name) == s.default
        assert ENV_VARS[s.name] == s.env == "WS_" + s.name.upper()
        assert s.option == "--ws-" + s.name.replace("_", "-")
        assert s.dest == "ws_" + s.name
    assert [s.shown_default for s in SETTINGS] == [
        "smollm2-135m-instruct", "build", "0,1,2", "8", "ws-out", ".ws-cache", "sycophancy",
        "lora", "top", "auto", "float32",
    ]


def test_readme_table_is_generated_from_settings() -> None:
    assert settings_markdown() in (REPO / "README.md").read_text()


def test_pyproject_keys_are_the_settings() -> None:
    with (REPO / "pyproject.toml").open("rb") as fh:
        table = tomllib.load(fh)["tool"]["ws_harness"]
    assert set(table) == set(NAMES)


def _layer_values(name: str, root: Path) -> tuple[str, str, str, tuple[Any, Any, Any]]:
    """(pyproject TOML literal, env value, cli value, their parsed values) for one setting."""
    for f in ("a.pt", "b.safetensors", "e.json", "c.json"):
        (root / f).write_bytes(b"")
    return {
        "model": ('"random:tiny"', "random:qwen3-0.6b", "org/name",
                  ("random:tiny", "random:qwen3-0.6b", "org/name")),
        "diff": ('"build"', "a.pt", "b.safetensors",
                 ("build", (root / "a.pt",), (root / "b.safetensors",))),
        "seeds": ("[4]", "5,6", "7", ((4,), (5, 6), (7,))),
        "rank": ("2", "3", "4", (2, 3, 4)),
        "out": ('"o1"', "o2", "o3", (root / "o1", root / "o2", root / "o3")),
        "cache_dir": ('"c1"', "c2", "c3", (root / "c1", root / "c2", root / "c3")),
        "behaviour": ('"sycophancy"', str(root / "e.json"), str(root / "c.json"),
                      ("sycophancy", str(root / "e.json"), str(root / "c.json"))),
        "adapter": ('"dora"', "ia3", "oft", ("dora", "ia3", "oft")),
        "measure": ('"all"', "none", "top", ("all", "none", "top")),
        "device": ('"cpu"', "cuda:1", "mps", ("cpu", "cuda:1", "mps")),
        "dtype": ('"bfloat16"', "float16", "float32", ("bfloat16", "float16", "float32")),
    }[name]


@pytest.mark.parametrize("setting", SETTINGS, ids=NAMES)
def test_each_setting_honours_pyproject_env_and_option_in_order(tmp_path: Path, setting: Any) -> None:
    name, env = setting.name, setting.env
    toml, env_value, cli_value, (from_toml, from_env, from_cli) = _layer_values(name, tmp_path)

    def check(cli: dict[str, Any], environ: dict[str, str], expected: Any, source: str | None) -> None:
        cfg = resolve_config(tmp_path, cli, environ)
        assert getattr(cfg, name) == expected
        assert cfg.sources.get(name) == source
        for other in SETTINGS:  # the other settings keep their built-in defaults
            if other is not setting:
                assert getattr(cfg, other.name) == other.default_for(tmp_path)

    check({}, {}, setting.default_for(tmp_path), None)
    write_pyproject(tmp_path, f"{name} = {toml}\n")
    toml_source = f"{tmp_path / 'pyproject.toml'} [tool.ws_harness] {name}"
    check({}, {}, from_toml, toml_source)
    check({name: None}, {env: "  "}, from_toml, toml_source)  # unset option, blank env: ignored
    check({}, {env: env_value}, from_env, f"environment variable {env}")
    check({name: cli_value}, {env: env_value}, from_cli, setting.option)
    check({name: cli_value}, {}, from_cli, setting.option)


def test_unknown_cli_setting_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['rnak'\]"):
        resolve_config(tmp_path, {"rnak": 3}, environ={})


def test_plugin_options_read_back_by_setting_name(pytestconfig: pytest.Config) -> None:
    assert list(cli_values(pytestconfig)) == NAMES


def test_pytest_options_come_from_settings(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(
        "from ws_harness.config import add_pytest_options\n"
        "def pytest_addoption(parser):\n"
        "    add_pytest_options(parser.getgroup('ws-test'))\n"
    )
    pytester.makepyfile(
        "from ws_harness.config import cli_values\n"
        "def test_values(pytestconfig):\n"
        "    assert cli_values(pytestconfig) == {'model': None, 'diff': None, 'seeds': '4,5',\n"
        "        'rank': '3', 'out': None, 'cache_dir': 'c', 'behaviour': None,\n"
        "        'adapter': None, 'measure': None, 'device': None, 'dtype': None}\n"
    )
    result = pytester.runpytest("--ws-rank", "3", "--ws-cache-dir", "c", "--ws-seeds=4,5")
    result.assert_outcomes(passed=1)
    monkeypatch.setenv("COLUMNS", "400")  # no help text wraps
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [f"*{s.help} (env {s.env}; default {s.shown_default})" for s in SETTINGS]
    )
    for s in SETTINGS:
        assert f"{s.option}={s.dest.upper()}" in result.stdout.str()
