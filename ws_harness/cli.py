"""The `ws-harness` console script: `diff build` and `diff check` (SPEC §2.3); room for `report`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ws_harness.diffs import Diff
    from ws_harness.session import HarnessSession
    from ws_harness.steering import SteeringCurve

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_DOES_NOT_STEER", "EXIT_INVALID"]

EXIT_OK = 0
EXIT_DOES_NOT_STEER = 1  # the diff is valid but fails the steering check
EXIT_INVALID = 2  # bad options, configuration or diff file (argparse also exits 2)


def _add_common(parser: argparse.ArgumentParser) -> None:
    # The same settings as the pytest options; None → pyproject [tool.ws_harness] / WS_* env.
    parser.add_argument("--model", default=None,
                        help="model spec (default from [tool.ws_harness] / WS_MODEL)")
    parser.add_argument("--cache-dir", dest="cache_dir", default=None,
                        help="on-disk cache (default from [tool.ws_harness] / WS_CACHE_DIR)")
    parser.add_argument("--behaviour", default=None,
                        help="behaviour name or .json (default from [tool.ws_harness])")
    parser.add_argument("--device", default=None,
                        help="where forwards run: auto, cpu, cuda, cuda:N, mps (default: WS_DEVICE)")
    parser.add_argument("--dtype", default=None,
                        help="dtype of forwards: float32, bfloat16, float16 (default: WS_DTYPE)")


def build_parser() -> argparse.ArgumentParser:
    """argparse tree: `ws-harness diff {build,check}`, `report [OUT]`, `findings [OUT]`, `merge OUT…`."""
    from ws_harness.lora import DEFAULT_FAMILY, DEFAULT_RECIPE, FAMILIES, RECIPES

    parser = argparse.ArgumentParser(
        prog="ws-harness", description="Weight-steering hypothesis harness utilities."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    diff = commands.add_parser("diff", help="build or check weight-steering diffs w = θ⁺ − θ⁻")
    diff_commands = diff.add_subparsers(dest="diff_command", required=True, metavar="ACTION")

    build = diff_commands.add_parser(
        "build", help="train a diff for one seed and write it as a {name: tensor} file"
    )
    build.add_argument("--seed", type=int, required=True, help="diff seed (LoRA init, data order)")
    build.add_argument("--out", type=Path, required=True, help="output file, .pt or .safetensors")
    build.add_argument("--recipe", choices=RECIPES, default=DEFAULT_RECIPE,
                       help=f"training-data recipe (default {DEFAULT_RECIPE})")
    build.add_argument("--steps", type=int, default=None, help="training steps per side")
    build.add_argument("--lr", type=float, default=None, help="learning rate")
    build.add_argument("--lora-rank", dest="lora_rank", type=int, default=None, help="LoRA rank r")
    build.add_argument("--adapter", choices=FAMILIES, default=DEFAULT_FAMILY,
                       help=f"adapter family, trained with PEFT's own config (default "
                            f"{DEFAULT_FAMILY})")
    build.add_argument("--force", action="store_true",
                       help="write the file even if the diff fails the steering check (exit 1)")
    build.add_argument("--no-progress", dest="progress", action="store_false",
                       help="hide the progress line (model conversion, training steps) on stderr")
    _add_common(build)

    check = diff_commands.add_parser(
        "check", help="validate a diff file against the model and print its steering curve"
    )
    check.add_argument("file", help="a .pt or .safetensors diff, or PEFT adapters: "
                                    "'pos=DIR,neg=DIR' (';' between pairs) or a folder of pairs")
    _add_common(check)

    report = commands.add_parser(
        "report", help="regenerate tables, plots and conclusion.md from a finished run"
    )
    report.add_argument("out", nargs="?", type=Path, default=None,
                        help="the run's output folder (default: the configured --ws-out)")
    findings = commands.add_parser(
        "findings", help="print the refuted= record each hypothesis needs, from a finished run"
    )
    findings.add_argument("out", nargs="?", type=Path, default=None,
                          help="the run's output folder (default: the configured --ws-out)")
    findings.add_argument("--write", action="store_true",
                          help="rewrite each hypothesis file's refuted= to the run's findings")
    from ws_harness.merge import add_merge_parser

    add_merge_parser(commands)
    from ws_harness.compare import add_compare_parser

    add_compare_parser(commands)
    return parser


def _findings(args: argparse.Namespace) -> int:
    from ws_harness.config import resolve_config
    from ws_harness.findings import finding_lines, stale_records, write_findings
    from ws_harness.results import read_tables

    out = args.out or resolve_config(Path.cwd(), {}).out
    try:
        results = read_tables(out)
    except FileNotFoundError as exc:  # exit 1 means "stale": a missing run is a usage error
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except (ValueError, KeyError, TypeError) as exc:
        print(f"error: {Path(out) / 'results.json'} is not a readable results file "
              f"({_one_line(exc)}); rerun the sweep to write it again", file=sys.stderr)
        return EXIT_INVALID
    if args.write:
        try:
            changed = write_findings(results)
        except (FileNotFoundError, ValueError, SyntaxError) as exc:
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_INVALID
        for path in changed:
            print(f"updated {path}")
        return 0
    for line in finding_lines(results):
        print(line)
    stale = stale_records(results)
    for line in stale:
        print(f"out of date: {line}")
    return 1 if stale else 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _model_problem(session: HarnessSession) -> str | None:
    """Load the session's model; what is wrong with it, so it is not blamed on the diff."""
    from ws_harness.models import ModelNotFoundError

    try:
        session.arch  # noqa: B018 - loads the model and checks its architecture
    except (ModelNotFoundError, OSError, ValueError) as exc:
        return f"model {session.config.model!r}: {_one_line(exc)}"
    return None


def _report(args: argparse.Namespace) -> int:
    from ws_harness.report import main as report_main

    return report_main([] if args.out is None else [str(args.out)])


def _session(args: argparse.Namespace) -> HarnessSession:
    from ws_harness.config import resolve_config
    from ws_harness.session import HarnessSession

    cli = {"model": args.model, "cache_dir": args.cache_dir, "behaviour": args.behaviour,
           "device": args.device, "dtype": args.dtype}
    return HarnessSession(resolve_config(Path.cwd(), cli))


def _print_diagnostics(diff: Diff) -> None:
    d = diff.diagnostics
    layers = d.get("touched_layers", [])
    span = f"{layers[0]}…{layers[-1]}" if layers else "none"
    print(f"diff {diff.name}: {d.get('n_touched', len(diff.w))} tensors, layers {span}, "
          f"‖w‖={d.get('norm_w', float('nan')):.4g}, sha256 {diff.sha256[:16]}")
    if "norm_pos" in d:
        print(f"  ‖Δ⁺‖={d['norm_pos']:.4g}  ‖Δ⁻‖={d['norm_neg']:.4g}  "
              f"cos(Δ⁺, −Δ⁻)={d['cos_pos_negneg']:+.3f}  drift ratio={d['drift_ratio']:.3f}")
    if "build_seconds" in d:
        print(f"  built in {d['build_seconds']:.1f} s")


def _print_curve(curve: SteeringCurve) -> None:
    print(f"steering on {curve.n} EVAL prompts: logit(Yes) − logit(No), mean ± sd")
    for alpha, mean, sd in zip(curve.alphas, curve.mean, curve.sd, strict=True):
        print(f"  α={alpha:+.1f}  {mean:+8.3f} ± {sd:.3f}")
    print(f"  effect(α=+1 − α=−1) {curve.effect:+.3f}; paired one-sided t-test "
          f"t={curve.t:.3g} p={curve.p_ttest:.3g}; Wilcoxon p={curve.p_wilcoxon:.3g}")


def _diff_build(args: argparse.Namespace) -> int:
    from ws_harness import progress
    from ws_harness.diffs import DIFF_SUFFIXES, save_diff

    if args.out.suffix not in DIFF_SUFFIXES:
        print(f"error: --out {args.out}: use a .pt or .safetensors file name", file=sys.stderr)
        return EXIT_INVALID
    if args.seed < 0:
        print(f"error: --seed {args.seed}: seeds are non-negative integers", file=sys.stderr)
        return EXIT_INVALID
    overrides = {k: v for k, v in {"steps": args.steps, "lr": args.lr,
                                   "rank": args.lora_rank}.items() if v is not None}
    # The same status line as a sweep's, around what can take minutes: converting the model,
    # training each side; it is finished before the diagnostics are printed.
    with progress.rendering(enabled=args.progress) as renderer:
        if renderer is not None:
            progress.expect("diff", 1)
        session = _loaded_session(args)
        if session is None:
            return EXIT_INVALID
        from ws_harness.session import InputError, check_family_dtype

        try:
            check_family_dtype(args.adapter, session.placement)
        except InputError as exc:
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_INVALID
        diff = session.build_diff(args.seed, args.recipe, overrides or None,
                                  progress=args.progress, family=args.adapter)
    failure = _show_and_check(session, diff)
    if failure is not None:
        if args.force:
            save_diff(diff, args.out)
            print(f"wrote {args.out} (--force) although the diff does not steer", file=sys.stderr)
        else:
            print(f"not written: {args.out}; pass --force to write it anyway", file=sys.stderr)
        print(f"error: {failure}", file=sys.stderr)
        return EXIT_DOES_NOT_STEER
    save_diff(diff, args.out)
    print(f"wrote {args.out}")
    return EXIT_OK


def _loaded_session(args: argparse.Namespace) -> HarnessSession | None:
    """The command's session with its model loaded, or None after printing why it cannot load."""
    from ws_harness.session import InputError

    session = _session(args)
    try:
        session.placement  # noqa: B018 - --device/--dtype usable on this machine (first: keys use it)
        problem = _model_problem(session)
    except InputError as exc:
        problem = _one_line(exc)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return None
    return session


def _show_and_check(session: HarnessSession, diff: Diff) -> Exception | None:
    """Print a diff's diagnostics and steering curve; the DiffDoesNotSteerError if it fails."""
    from ws_harness.steering import DiffDoesNotSteerError, check_steers

    _print_diagnostics(diff)
    curve = session.steering(diff)
    _print_curve(curve)
    try:
        check_steers(curve, diff.name)
    except DiffDoesNotSteerError as exc:
        return exc
    return None


def _diff_check(args: argparse.Namespace) -> int:
    from ws_harness.adapters import is_adapter_spec
    from ws_harness.diffs import DIFF_SUFFIXES, load_diff

    if is_adapter_spec(args.file):
        return _adapters_check(args)
    args.file = Path(args.file)
    # The file first (cheap), then the model, then the diff against it: each error its own.
    if args.file.is_dir():
        inside = sorted(p for p in args.file.iterdir() if p.suffix in DIFF_SUFFIXES)
        hint = (f"check one file at a time, e.g. ws-harness diff check {inside[0]}" if inside
                else "it holds no .pt or .safetensors diff")
        print(f"error: {args.file} is a folder, not a diff file; {hint}", file=sys.stderr)
        return EXIT_INVALID
    if not args.file.is_file():
        print(f"error: invalid diff: diff file {args.file} does not exist", file=sys.stderr)
        return EXIT_INVALID
    session = _loaded_session(args)
    if session is None:
        return EXIT_INVALID
    try:
        diff = load_diff(args.file, session.arch)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: invalid diff: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INVALID
    failure = _show_and_check(session, diff)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return EXIT_DOES_NOT_STEER
    print(f"ok: {args.file} is valid for {session.config.model} and steers")
    return EXIT_OK


def _adapters_check(args: argparse.Namespace) -> int:
    """`diff check` of PEFT adapter pairs: merge each with PEFT, validate, show its curve."""
    from ws_harness.adapters import AdapterError, load_adapter_diffs, parse_adapter_spec

    try:
        pairs = parse_adapter_spec(args.file)
    except AdapterError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INVALID
    session = _loaded_session(args)
    if session is None:
        return EXIT_INVALID
    try:
        diffs = load_adapter_diffs(pairs, session.model, session.arch, cache=session.cache,
                                   model_key=session.model_key(), expected_base=session.config.model)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: invalid adapter: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INVALID
    failures = [f for f in (_show_and_check(session, d) for d in diffs) if f is not None]
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if failures:
        return EXIT_DOES_NOT_STEER
    print(f"ok: {len(diffs)} adapter diff(s) valid for {session.config.model} and steer")
    return EXIT_OK


def _merge(args: argparse.Namespace) -> int:
    from ws_harness.merge import run_merge

    return run_merge(args)


def _compare(args: argparse.Namespace) -> int:
    from ws_harness.compare import run_compare

    return run_compare(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ws-harness`; returns the exit code (0 ok, 1 does not steer, 2 invalid)."""
    from ws_harness.config import ConfigError

    args = build_parser().parse_args(argv)
    handlers = {("diff", "build"): _diff_build, ("diff", "check"): _diff_check,
                ("report", None): _report, ("findings", None): _findings,
                ("merge", None): _merge, ("compare", None): _compare}
    try:
        return handlers[(args.command, getattr(args, "diff_command", None))](args)
    except ConfigError as exc:
        print(f"error: configuration: {exc}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
