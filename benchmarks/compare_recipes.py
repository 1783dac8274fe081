"""Measures the diff recipes of SPEC §2.3 on the embedded model: steering, p-values, build time.

    .venv/bin/python benchmarks/compare_recipes.py [--seeds 0,1,2] [--runs scripted,generated,...]

A run is a recipe name, optionally with hyper-parameter overrides: `scripted:steps=8,lr=0.002`.
Builds bypass the cache (cold timings); the model comes from the configured cache. Prints one JSON
row per build as it finishes, then the markdown table of benchmarks/recipes.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ws_harness.config import resolve_config
from ws_harness.lora import resolve_hparams
from ws_harness.session import HarnessSession
from ws_harness.steering import steering_curve

__all__ = ["main"]


def _parse_run(text: str) -> tuple[str, dict[str, float | int | bool]]:
    recipe, _, rest = text.partition(":")
    overrides: dict[str, float | int | bool] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if value.lower() in ("true", "false"):
            overrides[key] = value.lower() == "true"
        else:
            overrides[key] = int(value) if value.isdigit() else float(value)
    return recipe, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default="scripted;generated;distilled;scripted:steps=8",
                        help="';'-separated recipe[:key=value,...] runs")
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    session = HarnessSession(resolve_config(Path.cwd(), {"model": args.model}))
    probes = session.probes("eval")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for run in args.runs.split(";"):
        recipe, overrides = _parse_run(run)
        hp = resolve_hparams(recipe, overrides or None)
        for seed in seeds:
            start = time.perf_counter()
            diff = session.build_diff(seed, recipe, hp, progress=False, use_cache=False)
            built = time.perf_counter() - start
            start = time.perf_counter()
            curve = steering_curve(session.model, probes, diff.w, session.answer_ids)
            checked = time.perf_counter() - start
            d = diff.diagnostics
            row = {
                "run": run, "recipe": recipe, "hparams": hp.to_json(), "seed": seed,
                "build_s": built, "check_s": checked, "means": curve.mean,
                "effect": curve.effect, "p_ttest": curve.p_ttest, "p_wilcoxon": curve.p_wilcoxon,
                "steers": curve.steers, "norm_pos": d["norm_pos"], "norm_neg": d["norm_neg"],
                "cos_pos_negneg": d["cos_pos_negneg"], "drift_ratio": d["drift_ratio"],
                "final_loss": d["final_loss"],
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"model": session.config.model, "threads": args.threads,
                                         "results": results}, indent=1))
    print()
    print("| run | seed | α=−1 | α=−0.5 | α=0 | α=+0.5 | α=+1 | effect | p (t) | p (Wilcoxon) "
          "| steers | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        means = " | ".join(f"{m:+.2f}" for m in r["means"])
        print(f"| {r['run']} | {r['seed']} | {means} | {r['effect']:+.2f} | {r['p_ttest']:.2g} "
              f"| {r['p_wilcoxon']:.2g} | {'yes' if r['steers'] else 'no'} | {r['build_s']:.0f} |")


if __name__ == "__main__":
    main()
