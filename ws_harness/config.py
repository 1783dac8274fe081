"""Run configuration: defaults, `[tool.ws_harness]` in pyproject.toml, WS_* env vars, --ws-* options.

Every setting is declared once, in `SETTINGS`; the dataclass defaults, the env var names, the
pytest options and the README's configuration table are all derived from it.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

if TYPE_CHECKING:  # pytest is only needed by the plugin, not to resolve a configuration
    import pytest

__all__ = [
    "ConfigError",
    "Setting",
    "SETTINGS",
    "HarnessConfig",
    "ENV_VARS",
    "parse_seeds",
    "parse_diff",
    "validate_model_spec",
    "resolve_config",
    "add_pytest_options",
    "cli_values",
    "settings_markdown",
]

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting, its source and the fix."""


def parse_seeds(value: Any, source: str = "seeds") -> tuple[int, ...]:
    """`"0,1,2"`, `[0, 1, 2]` or `3` → (0, 1, 2); seeds are distinct non-negative integers."""
    if isinstance(value, int) and not isinstance(value, bool):
        items: list[Any] = [value]
    elif isinstance(value, str):
        items = [s.strip() for s in value.split(",") if s.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{source}: expected a comma-separated list of integers, got {value!r}")
    seeds = []
    for item in items:
        try:
            seed = int(item)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{source}: {item!r} is not an integer seed; pass e.g. --ws-seeds 0,1,2"
            ) from None
        if seed < 0 or isinstance(item, bool):
            raise ConfigError(f"{source}: seed {item!r} must be a non-negative integer")
        seeds.append(seed)
    if not seeds:
        raise ConfigError(f"{source}: no seeds given; pass e.g. --ws-seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: seeds {seeds} repeat a value; each seed must be distinct")
    return tuple(seeds)


def parse_diff(value: Any, source: str = "diff", base: Path | None = None) -> tuple[Any, ...] | str:
    """"build"; a comma-separated list of .pt/.safetensors files, or a directory of them; or PEFT
    adapter pairs (`pos=DIR,neg=DIR`, `;` between seeds, or a folder of such pairs)."""
    from ws_harness.adapters import AdapterError, is_adapter_spec, parse_adapter_spec

    if isinstance(value, (str, Path, list, tuple)) and is_adapter_spec(value, base):
        try:
            return parse_adapter_spec(value, base)
        except AdapterError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{source}: expected 'build' or diff file paths, got {value!r}")
    if value.strip() == "build":
        return "build"
    # Imported here: diffs imports torch, which only a run that loads diff files needs.
    from ws_harness.diffs import DIFF_SUFFIXES

    paths: list[Path] = []
    for raw in (s.strip() for s in value.split(",") if s.strip()):
        path = Path(raw)
        if base is not None and not path.is_absolute():
            path = base / path
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in DIFF_SUFFIXES)
            if not found:
                raise ConfigError(
                    f"{source}: directory {path} holds no .pt or .safetensors diff files"
                )
            paths.extend(found)
        elif not path.exists():
            raise ConfigError(
                f"{source}: diff file {path} does not exist; pass existing .pt/.safetensors "
                "files (comma-separated), a directory of them, or 'build'"
            )
        elif path.suffix not in DIFF_SUFFIXES:
            raise ConfigError(
                f"{source}: {path} has suffix {path.suffix!r}; a diff is a torch.save'd dict "
                "(.pt) or a .safetensors file"
            )
        else:
            paths.append(path)
    return tuple(paths)


def validate_model_spec(spec: Any, source: str = "model") -> str:
    """Check the syntax of a model spec; whether it can be found is checked when it loads."""
    # Imported here: models imports transformers, which is slow and not needed to parse options.
    from ws_harness.models import EMBEDDED_MODELS, RANDOM_PRESETS

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{source}: expected a model spec string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("random:"):
        preset = spec.split(":", 1)[1]
        if preset not in RANDOM_PRESETS:
            raise ConfigError(
                f"{source}: unknown random preset {preset!r}; choose one of "
                + ", ".join(f"random:{p}" for p in sorted(RANDOM_PRESETS))
            )
        return spec
    if spec in EMBEDDED_MODELS or Path(spec).expanduser().is_dir() or _HF_ID.match(spec):
        return spec
    raise ConfigError(
        f"{source}: {spec!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        "a random:<preset>, an existing local directory, nor a Hugging Face id like 'org/name'"
    )


def _parse_model(value: Any, source: str, rootdir: Path) -> str:
    return validate_model_spec(value, source)


def _parse_diff(value: Any, source: str, rootdir: Path) -> tuple[Path, ...] | str:
    return parse_diff(value, source, base=rootdir)


def _parse_seeds(value: Any, source: str, rootdir: Path) -> tuple[int, ...]:
    return parse_seeds(value, source)


def _parse_rank(value: Any, source: str, rootdir: Path) -> int:
    try:
        rank = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: rank {value!r} is not an integer; pass e.g. --ws-rank 8") from None
    if isinstance(value, bool) or rank < 1 or str(value).strip() not in (str(rank), f"{rank}.0"):
        raise ConfigError(f"{source}: rank must be a positive integer, got {value!r}")
    return rank


def _parse_dir(value: Any, source: str, rootdir: Path) -> Path:
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ConfigError(f"{source}: expected a directory path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else rootdir / path


def _parse_behaviour(value: Any, source: str, rootdir: Path) -> str:
    from ws_harness.data import available_behaviours

    names = available_behaviours()
    if not isinstance(value, str):
        raise ConfigError(
            f"{source}: expected a behaviour name ({', '.join(names)}) or the path of a "
            f"behaviour .json file, got {value!r}"
        )
    if value not in names and not Path(value).is_file():
        raise ConfigError(
            f"{source}: unknown behaviour {value!r}; choose one of {names} "
            "or pass the path of a behaviour .json file"
        )
    return value


MEASURE_MODES = ("top", "all", "none")


ADAPTER_FAMILIES = ("lora", "dora", "pissa", "oft", "ia3")  # lora.FAMILIES (torch-free here)


def _parse_adapter(value: Any, source: str, rootdir: Path) -> str:
    if not isinstance(value, str) or value.strip() not in ADAPTER_FAMILIES:
        raise ConfigError(f"{source}: adapter family must be one of {', '.join(ADAPTER_FAMILIES)}"
                          f" (PEFT's config for built diffs), got {value!r}")
    return value.strip()


def _parse_measure(value: Any, source: str, rootdir: Path) -> str:
    if not isinstance(value, str) or value.strip() not in MEASURE_MODES:
        raise ConfigError(
            f"{source}: measure must be one of {', '.join(MEASURE_MODES)} (which hypotheses get "
            f"the measured keep/drop retention), got {value!r}"
        )
    return value.strip()


DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")  # device.DEVICES (torch-free here)
DTYPE_CHOICES = ("float32", "bfloat16", "float16")  # device.DTYPES


def _parse_device(value: Any, source: str, rootdir: Path) -> str:
    text = value.strip() if isinstance(value, str) else None
    kind, colon, index = (text or "").partition(":")
    if text is None or kind not in DEVICE_CHOICES or (colon and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"{source}: device must be one of {', '.join(DEVICE_CHOICES)} or cuda:N "
                          f"(where model forwards run), got {value!r}")
    return text


def _parse_dtype(value: Any, source: str, rootdir: Path) -> str:
    if not isinstance(value, str) or value.strip() not in DTYPE_CHOICES:
        raise ConfigError(f"{source}: dtype must be one of {', '.join(DTYPE_CHOICES)} (the dtype "
                          f"of model forwards; scoring stays float64/float32), got {value!r}")
    return value.strip()


@dataclass(frozen=True)
class Setting:
    """One setting: its name, env var, built-in default, parser `(value, source, rootdir)` and help."""

    name: str
    env: str
    default: Any
    parse: Callable[[Any, str, Path], Any]
    help: str

    @property
    def option(self) -> str:
        """The pytest option, e.g. `--ws-cache-dir`."""
        return "--ws-" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        """The pytest option's dest, e.g. `ws_cache_dir`."""
        return f"ws_{self.name}"

    @property
    def shown_default(self) -> str:
        """The default as a user would type it: `0,1,2`, `ws-out`."""
        if isinstance(self.default, (tuple, list)):
            return ",".join(str(v) for v in self.default)
        return str(self.default)

    def default_for(self, rootdir: Path) -> Any:
        """The built-in default for a run in `rootdir` (a relative Path default is under rootdir)."""
        if isinstance(self.default, Path) and not self.default.is_absolute():
            return rootdir / self.default
        return self.default


# Precedence, lowest to highest: built-in default < pyproject < environment < command line.
SETTINGS: tuple[Setting, ...] = (
    Setting("model", "WS_MODEL", "smollm2-135m-instruct", _parse_model,
            "model spec: smollm2-135m-instruct, random:<preset>, a local dir or a cached HF id"),
    Setting("diff", "WS_DIFF", "build", _parse_diff,
            "'build' (train one diff per seed); .pt/.safetensors files, comma-separated, or a dir; "
            "or PEFT adapter pairs pos=DIR,neg=DIR (';' between seeds) or a folder of pairs"),
    Setting("seeds", "WS_SEEDS", (0, 1, 2), _parse_seeds,
            "comma-separated diff seeds to build, e.g. 0,1,2"),
    Setting("rank", "WS_RANK", 8, _parse_rank,
            "basis rank k of every hypothesis (at most d_model/4, to leave room for the null)"),
    Setting("out", "WS_OUT", Path("ws-out"), _parse_dir,
            "output folder for tables, plots and the conclusion"),
    Setting("cache_dir", "WS_CACHE_DIR", Path(".ws-cache"), _parse_dir,
            "on-disk cache for converted models, diffs and captures"),
    Setting("behaviour", "WS_BEHAVIOUR", "sycophancy", _parse_behaviour,
            "behaviour data: a shipped name (sycophancy) or a .json path"),
    Setting("adapter", "WS_ADAPTER", "lora", _parse_adapter,
            "adapter family of built diffs (PEFT config): lora, dora, pissa, oft or ia3"),
    Setting("measure", "WS_MEASURE", "top", _parse_measure,
            "measured keep/drop retention for: top (causal_oracle, block_oracle, w_oracle and "
            "the 2 best write/mixed hypotheses by c_lin, per diff), all (every write/mixed "
            "hypothesis) or none"),
    Setting("device", "WS_DEVICE", "auto", _parse_device,
            "where model forwards run: auto (the first CUDA GPU if torch sees one, else the CPU), "
            "cpu, cuda, cuda:N or mps"),
    Setting("dtype", "WS_DTYPE", "float32", _parse_dtype,
            "dtype of model forwards: float32, bfloat16 (GPU; CPU works, slowly) or float16 (GPU)"),
)
_BY_NAME = {s.name: s for s in SETTINGS}
ENV_VARS: dict[str, str] = {s.name: s.env for s in SETTINGS}


def _default(name: str) -> Any:
    return _BY_NAME[name].default


@dataclass(frozen=True)
class HarnessConfig:
    """What a run uses. `diff` is "build" (the harness trains one diff per seed) or diff files."""

    model: str = _default("model")
    diff: tuple[Any, ...] | str = _default("diff")  # Paths, AdapterPairs, or "build"
    seeds: tuple[int, ...] = _default("seeds")
    rank: int = _default("rank")
    out: Path = _default("out")
    cache_dir: Path = _default("cache_dir")
    behaviour: str = _default("behaviour")
    adapter: str = _default("adapter")
    measure: str = _default("measure")
    device: str = _default("device")
    dtype: str = _default("dtype")
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def builds_diffs(self) -> bool:
        return self.diff == "build"

    @property
    def adapter_diffs(self) -> bool:
        """Whether the diffs are PEFT adapter pairs (adapters.AdapterPair; duck-typed: no torch)."""
        return not self.builds_diffs and bool(self.diff) and hasattr(self.diff[0], "sides")

    def diff_plan(self) -> list[tuple[str, int | None]]:
        """(name, seed) per diff of the run: ('seed0', 0)… when building ('dora-seed0' for
        another adapter family), the pair's name for adapters, (file stem, None) for files."""
        if self.builds_diffs:
            prefix = "seed" if self.adapter == "lora" else f"{self.adapter}-seed"
            return [(f"{prefix}{s}", s) for s in self.seeds]
        if self.adapter_diffs:
            return [(pair.name, pair.seed) for pair in self.diff]  # type: ignore[union-attr]
        names = [p.stem for p in self.diff]  # type: ignore[union-attr]
        # Two files with one stem (a.pt, a.safetensors) must still get distinct names.
        return [(n if names.count(n) == 1 else p.name, None) for n, p in zip(names, self.diff)]


_FIELDS = tuple(f.name for f in fields(HarnessConfig) if f.name != "sources")
if _FIELDS != tuple(_BY_NAME):
    raise RuntimeError(f"HarnessConfig fields {_FIELDS} differ from the SETTINGS {tuple(_BY_NAME)}")


def _load_pyproject(rootdir: Path) -> dict[str, Any]:
    path = rootdir / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh).get("tool", {}).get("ws_harness", {})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: cannot parse TOML ({exc})") from None
    known = set(_BY_NAME)
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{path} [tool.ws_harness]: unknown key(s) {unknown}; known keys are {sorted(known)}"
        )
    return table


def resolve_config(
    rootdir: Path,
    cli: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> HarnessConfig:
    """Merge the four layers and validate every value; raises ConfigError naming the source."""
    environ = dict(os.environ if environ is None else environ)
    cli = {} if cli is None else cli
    unknown = sorted(set(cli) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known settings are {list(_BY_NAME)}")
    table = _load_pyproject(rootdir)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        name = setting.name
        if cli.get(name) is not None:
            value, source = cli[name], setting.option
        elif environ.get(setting.env, "").strip():
            value, source = environ[setting.env], f"environment variable {setting.env}"
        elif name in table:
            value, source = table[name], f"{rootdir / 'pyproject.toml'} [tool.ws_harness] {name}"
        else:
            values[name] = setting.default_for(rootdir)
            continue
        values[name] = setting.parse(value, source, rootdir)
        sources[name] = source
    return HarnessConfig(**values, sources=sources)


def check_writable_dir(path: Path, setting: str, source: str) -> None:
    """Refuse at startup a folder the run could not write (a file, or no permission)."""
    option = _BY_NAME[setting].option
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{source}: {option} {path} is a file, not a folder; pass a folder path")
    probe = path / f".ws-write-check-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{source}: {option} {path} is not writable ({exc.strerror or exc}); pass a folder "
            "you can write to"
        ) from None


def check_paths(config: HarnessConfig) -> None:
    """The output and cache folders of a run can be written (checked before any work)."""
    for setting in ("out", "cache_dir"):
        source = config.sources.get(setting, f"default {setting}")
        check_writable_dir(getattr(config, setting), setting, source)


def add_pytest_options(group: pytest.OptionGroup) -> None:
    """Register every setting's `--ws-*` option (dest `ws_<name>`, default None) on `group`."""
    for setting in SETTINGS:
        help_text = f"{setting.help} (env {setting.env}; default {setting.shown_default})"
        group.addoption(
            setting.option, dest=setting.dest, default=None,
            help=help_text.replace("%", "%%"),  # argparse %-formats help strings
        )


def cli_values(config: pytest.Config) -> dict[str, Any]:
    """The `--ws-*` option values of a pytest run, by setting name (None where not given)."""
    return {setting.name: config.getoption(setting.dest) for setting in SETTINGS}


def _markdown_cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|")


def settings_markdown() -> str:
    """The README's configuration table (option, env, default, meaning), one row per setting."""
    lines = ["| option | env | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        lines.append(
            f"| `{s.option}` | `{s.env}` | `{s.shown_default}` | {_markdown_cell(s.help)} |"
        )
    return "\n".join(lines) + "\n"
