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


def build_parser() -> argparse.ArgumentParser:
    """argparse tree: `ws-harness diff {build,check}` and `ws-harness report [OUT]`."""
    from ws_harness.lora import DEFAULT_RECIPE, RECIPES

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
    build.add_argument("--force", action="store_true",
                       help="write the file even if the diff fails the steering check (exit 1)")
    build.add_argument("--no-progress", dest="progress", action="store_false",
                       help="hide the training progress bars")
    _add_common(build)

    check = diff_commands.add_parser(
        "check", help="validate a diff file against the model and print its steering curve"
    )
    check.add_argument("file", type=Path, help="a .pt or .safetensors diff")
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
    return parser


def _findings(args: argparse.Namespace) -> int:
    from ws_harness.config import resolve_config
    from ws_harness.findings import finding_lines, stale_records, write_findings
    from ws_harness.results import read_tables

    out = args.out or resolve_config(Path.cwd(), {}).out
    results = read_tables(out)
    if args.write:
        for path in write_findings(results):
            print(f"updated {path}")
        return 0
    for line in finding_lines(results):
        print(line)
    stale = stale_records(results)
    for line in stale:
        print(f"out of date: {line}")
    return 1 if stale else 0


def _report(args: argparse.Namespace) -> int:
    from ws_harness.report import main as report_main

    return report_main([] if args.out is None else [str(args.out)])


def _session(args: argparse.Namespace) -> HarnessSession:
    from ws_harness.config import resolve_config
    from ws_harness.session import HarnessSession

    cli = {"model": args.model, "cache_dir": args.cache_dir, "behaviour": args.behaviour}
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
    from ws_harness.diffs import DIFF_SUFFIXES, save_diff

    if args.out.suffix not in DIFF_SUFFIXES:
        print(f"error: --out {args.out}: use a .pt or .safetensors file name", file=sys.stderr)
        return EXIT_INVALID
    if args.seed < 0:
        print(f"error: --seed {args.seed}: seeds are non-negative integers", file=sys.stderr)
        return EXIT_INVALID
    overrides = {k: v for k, v in {"steps": args.steps, "lr": args.lr,
                                   "rank": args.lora_rank}.items() if v is not None}
    session = _session(args)
    diff = session.build_diff(args.seed, args.recipe, overrides or None, progress=args.progress)
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
    from ws_harness.diffs import load_diff

    session = _session(args)
    try:
        diff = load_diff(args.file, session.arch)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: invalid diff: {exc}", file=sys.stderr)
        return EXIT_INVALID
    failure = _show_and_check(session, diff)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return EXIT_DOES_NOT_STEER
    print(f"ok: {args.file} is valid for {session.config.model} and steers")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ws-harness`; returns the exit code (0 ok, 1 does not steer, 2 invalid)."""
    from ws_harness.config import ConfigError

    args = build_parser().parse_args(argv)
    handlers = {("diff", "build"): _diff_build, ("diff", "check"): _diff_check,
                ("report", None): _report, ("findings", None): _findings}
    try:
        return handlers[(args.command, getattr(args, "diff_command", None))](args)
    except ConfigError as exc:
        print(f"error: configuration: {exc}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
