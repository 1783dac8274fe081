"""Benchmark: time to score one basis over all layers, exact nulls vs 120-sample Monte Carlo nulls.

Shapes of the embedded model (smollm2-135m-instruct): 30 layers, d = 576, d_ff = 1536,
o_proj ΔW [576, 576], down_proj ΔW [576, 1536], 16 EVAL label samples per layer, k = 8.
Random data with fixed seeds, one torch thread. Run:

    .venv/bin/python benchmarks/bench_scores.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ws_harness.nulls import haar_bases
from ws_harness.scores import (
    Target,
    activation_target,
    combined_weight_target,
    recovery,
    summarize_layers,
    weight_target,
)

__all__ = ["main"]


def _time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in seconds (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _make_targets(
    layers: int, d: int, d_ff: int, n_eval: int, seed: int
) -> dict[str, list[Target]]:
    g = torch.Generator().manual_seed(seed)
    acts, o, down, comb = [], [], [], []
    for _ in range(layers):
        # Labels share a direction (as steering labels do) plus per-prompt noise.
        shared = torch.randn(1, d, generator=g)
        X = shared + torch.randn(n_eval, d, generator=g)
        dW_o = torch.randn(d, 8, generator=g) @ torch.randn(8, d, generator=g)  # LoRA-like low rank
        dW_down = torch.randn(d, 8, generator=g) @ torch.randn(8, d_ff, generator=g)
        acts.append(activation_target(X))
        o.append(weight_target(dW_o))
        down.append(weight_target(dW_down))
        comb.append(combined_weight_target([dW_o, dW_down]))
    return {"act": acts, "o_proj": o, "down_proj": down, "combined": comb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--d-ff", type=int, default=1536)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--mc", type=int, default=120, help="Monte Carlo null samples")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    targets = _make_targets(args.layers, args.d, args.d_ff, args.n_eval, seed=0)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for ts in targets.values():  # A's eigenvalues: cached per target, used by the saddlepoint
        for t in ts:
            _ = t.spectrum
    spectra_s = time.perf_counter() - t0
    B = haar_bases(args.d, args.k, 1, generator=1)[0].contiguous()

    def run(metric: str, **kw) -> Callable[[], object]:
        p_method = kw.get("p_method", "beta")

        def score_all() -> object:
            scores = [recovery(B, t, **kw) for t in targets[metric]]
            return summarize_layers(scores, targets[metric], "per_layer", p_method=p_method)

        return score_all

    print(
        f"scoring one basis (k={args.k}) over {args.layers} layers; d={args.d}, "
        f"d_ff={args.d_ff}, {args.n_eval} EVAL labels; torch threads = {torch.get_num_threads()}"
    )
    print(
        f"once per diff, 4 metrics x {args.layers} layers: build targets {build_s:.2f} s, "
        f"their spectra (saddlepoint only) {spectra_s:.2f} s\n"
    )
    header = (
        f"{'metric':<10} {'exact+Beta':>12} {'exact+saddle':>13} {f'MC-{args.mc}':>10} "
        f"{'MC/exact':>9}   {'R(exact)':>9} {'R sd exact':>11} {f'R sd MC-{args.mc}':>12}"
    )
    print(header)
    print("-" * len(header))
    for metric in ("act", "o_proj", "down_proj", "combined"):
        exact = _time(run(metric), args.repeats)
        saddle = _time(run(metric, p_method="saddlepoint"), args.repeats)
        mc = _time(run(metric, null="monte_carlo", n_null=args.mc, generator=0), args.repeats)
        s_exact = recovery(B, targets[metric][0])
        s_mc = recovery(B, targets[metric][0], null="monte_carlo", n_null=args.mc, generator=0)
        print(
            f"{metric:<10} {exact * 1e3:>10.1f}ms {saddle * 1e3:>11.1f}ms {mc * 1e3:>8.0f}ms "
            f"{mc / exact:>8.0f}x   {s_exact.r:>9.3f} {s_exact.null_sd_r:>11.4f} "
            f"{s_mc.null_sd_r:>12.4f}"
        )
    print(
        "\n(times: median of", args.repeats, "runs, all layers + layer summary; R columns: layer 0)"
    )


if __name__ == "__main__":
    main()
