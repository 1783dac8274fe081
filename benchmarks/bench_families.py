"""Steering curves per adapter family (lora, dora, pissa, oft, ia3) on the embedded model.

    .venv/bin/python benchmarks/bench_families.py [--families lora,dora,pissa,oft,ia3] [--seeds 0]
        [--recipe scripted] [--threads 2] [--json rows.json]

A family may carry hyper-parameter overrides: `--families "oft:lr=0.02;ia3:lr=0.05,steps=24"`
(`;`-separated when overrides are given). Each build uses PEFT's own config of the family
(ws_harness.lora.peft_config), bypasses the cache (cold timings) and is measured with the SPEC
§2.3 steering check on the EVAL prompts; a family that does not steer is reported as such (the
`steers` column), never dropped. Cost on 2 idle cores: ~40–60 s per build (DoRA and OFT a little
more per step), so the five families on one seed take ~5 min.
Prints one JSON row per build, then the markdown table of benchmarks/families.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ws_harness import lora
from ws_harness.config import resolve_config
from ws_harness.session import HarnessSession
from ws_harness.steering import steering_curve

__all__ = ["main", "parse_runs"]


def parse_runs(text: str) -> list[tuple[str, dict[str, Any]]]:
    """"lora,dora" or "oft:lr=0.02;ia3:lr=0.05,steps=24" → [(family, overrides), …]."""
    items = text.split(";") if (";" in text or ":" in text) else text.split(",")
    runs = []
    for item in filter(None, (i.strip() for i in items)):
        family, _, rest = item.partition(":")
        overrides: dict[str, Any] = {}
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            overrides[key.strip()] = int(value) if value.strip().isdigit() else float(value)
        if family not in lora.FAMILIES:
            raise SystemExit(f"unknown family {family!r}; choose from {lora.FAMILIES}")
        runs.append((family, overrides))
    return runs


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(lora.FAMILIES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--recipe", default=lora.DEFAULT_RECIPE, choices=lora.RECIPES)
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    session = HarnessSession(resolve_config(Path.cwd(), {"model": args.model}))
    probes = session.probes("eval")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []
    for family, overrides in parse_runs(args.families):
        hp = lora.resolve_hparams(args.recipe, overrides or None, family)
        for seed in seeds:
            start = time.perf_counter()
            diff = lora.build_diff(
                session.model, session.tokenizer, session.arch, session.behaviour, seed,
                args.recipe, hp, progress=False, family=family,
            )
            built = time.perf_counter() - start
            curve = steering_curve(session.model, probes, diff.w, session.answer_ids)
            d = diff.diagnostics
            row = {
                "family": family, "overrides": overrides, "hparams": hp.to_json(), "seed": seed,
                "recipe": args.recipe, "build_s": built, "alphas": curve.alphas,
                "means": curve.mean, "effect": curve.effect, "p_ttest": curve.p_ttest,
                "p_wilcoxon": curve.p_wilcoxon, "steers": curve.steers,
                "norm_pos": d["norm_pos"], "norm_neg": d["norm_neg"], "norm_w": d["norm_w"],
                "cos_pos_negneg": d["cos_pos_negneg"], "final_loss": d["final_loss"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"model": session.config.model, "threads": args.threads,
                                         "rows": rows}, indent=1))
    print()
    print("| family | lr | seed | α=−1 | α=−0.5 | α=0 | α=+0.5 | α=+1 | effect | p (t) | steers "
          "| ‖w‖ | final loss +/− | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        means = " | ".join(f"{m:+.2f}" for m in r["means"])
        loss = r["final_loss"]
        print(f"| {r['family']} | {r['hparams']['lr']:g} | {r['seed']} | {means} | {r['effect']:+.2f} "
              f"| {r['p_ttest']:.2g} | {'yes' if r['steers'] else '**no**'} | {r['norm_w']:.3g} "
              f"| {loss['positive']:.2f} / {loss['negative']:.2f} | {r['build_s']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
