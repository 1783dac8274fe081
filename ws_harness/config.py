"""Run configuration: defaults, `[tool.ws_harness]` in pyproject.toml, WS_* env vars, --ws-* options."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

__all__ = [
    "ConfigError",
    "HarnessConfig",
    "ENV_VARS",
    "parse_seeds",
    "parse_diff",
    "validate_model_spec",
    "resolve_config",
]

# Precedence, lowest to highest: built-in default < pyproject < environment < command line.
ENV_VARS = {
    "model": "WS_MODEL",
    "diff": "WS_DIFF",
    "seeds": "WS_SEEDS",
    "rank": "WS_RANK",
    "out": "WS_OUT",
    "cache_dir": "WS_CACHE_DIR",
    "behaviour": "WS_BEHAVIOUR",
}

_DIFF_SUFFIXES = (".pt", ".safetensors")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting, its source and the fix."""


@dataclass(frozen=True)
class HarnessConfig:
    """What a run uses. `diff` is "build" (the harness trains one diff per seed) or diff files."""

    model: str = "smollm2-135m-instruct"
    diff: tuple[Path, ...] | str = "build"
    seeds: tuple[int, ...] = (0, 1, 2)
    rank: int = 8
    out: Path = Path("ws-out")
    cache_dir: Path = Path(".ws-cache")
    behaviour: str = "sycophancy"
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def builds_diffs(self) -> bool:
        return self.diff == "build"

    def diff_plan(self) -> list[tuple[str, int | None]]:
        """(name, seed) per diff of the run: ('seed0', 0)… when building, (file stem, None) when loading."""
        if self.builds_diffs:
            return [(f"seed{s}", s) for s in self.seeds]
        names = [p.stem for p in self.diff]  # type: ignore[union-attr]
        # Two files with one stem (a.pt, a.safetensors) must still get distinct names.
        return [(n if names.count(n) == 1 else p.name, None) for n, p in zip(names, self.diff)]


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


def parse_diff(value: Any, source: str = "diff", base: Path | None = None) -> tuple[Path, ...] | str:
    """"build", or a comma-separated list of .pt/.safetensors files, or a directory of them."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{source}: expected 'build' or diff file paths, got {value!r}")
    if value.strip() == "build":
        return "build"
    paths: list[Path] = []
    for raw in (s.strip() for s in value.split(",") if s.strip()):
        path = Path(raw)
        if base is not None and not path.is_absolute():
            path = base / path
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in _DIFF_SUFFIXES)
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
        elif path.suffix not in _DIFF_SUFFIXES:
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


def _parse_rank(value: Any, source: str) -> int:
    try:
        rank = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: rank {value!r} is not an integer; pass e.g. --ws-rank 8") from None
    if isinstance(value, bool) or rank < 1 or str(value).strip() not in (str(rank), f"{rank}.0"):
        raise ConfigError(f"{source}: rank must be a positive integer, got {value!r}")
    return rank


def _load_pyproject(rootdir: Path) -> dict[str, Any]:
    path = rootdir / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh).get("tool", {}).get("ws_harness", {})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: cannot parse TOML ({exc})") from None
    known = {f.name for f in fields(HarnessConfig)} - {"sources"}
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
    raw: dict[str, tuple[Any, str]] = {}
    for key, value in _load_pyproject(rootdir).items():
        raw[key] = (value, f"{rootdir / 'pyproject.toml'} [tool.ws_harness] {key}")
    for key, var in ENV_VARS.items():
        if environ.get(var, "").strip():
            raw[key] = (environ[var], f"environment variable {var}")
    for key, value in (cli or {}).items():
        if value is not None:
            raw[key] = (value, f"--ws-{key.replace('_', '-')}")

    cfg = HarnessConfig()
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (value, source) in raw.items():
        sources[key] = source
        if key == "model":
            values[key] = validate_model_spec(value, source)
        elif key == "diff":
            values[key] = parse_diff(value, source, base=rootdir)
        elif key == "seeds":
            values[key] = parse_seeds(value, source)
        elif key == "rank":
            values[key] = _parse_rank(value, source)
        elif key in ("out", "cache_dir"):
            if not isinstance(value, (str, Path)) or not str(value).strip():
                raise ConfigError(f"{source}: expected a directory path, got {value!r}")
            path = Path(value).expanduser()
            values[key] = path if path.is_absolute() else rootdir / path
        elif key == "behaviour":
            from ws_harness.data import available_behaviours

            names = available_behaviours()
            if value not in names and not Path(value).is_file():
                raise ConfigError(
                    f"{source}: unknown behaviour {value!r}; choose one of {names} "
                    "or pass the path of a behaviour .json file"
                )
            values[key] = value
    for key in ("out", "cache_dir"):
        if key not in values:
            values[key] = rootdir / getattr(cfg, key)
    return replace(cfg, **values, sources=sources)
