"""Calibration of the claim p-values where BH uses them (issue 10, item 9).

Rejection rates of Haar-random k-dim subspaces at α ∈ {1e-2, 1e-3, 1e-4} at the real size
(d = 576, k = 8) for the saddlepoint p (what claims use, ``schema.P_METHOD``) and the
moment-matched Beta p (SPEC §4), for

* one layer: E = tr(PA), p from ``nulls.saddlepoint_p_value`` / ``nulls.beta_p_value``;
* layer means, per-layer null (an independent subspace per layer; mean_l R_l):
  ``nulls.layer_mean_saddlepoint_p_value`` / the Beta of ``scores.summarize_layers``;
* layer means, global null (one subspace shared by every layer, i.e. tr(PĀ), Ā = mean_l A_l):
  ``saddlepoint_p_value`` / ``beta_p_value`` on Ā's spectrum.

Spectra: synthetic ones of the default run's shapes (labels: one dominant eigenvalue, then a
fast-decaying tail, rank 20 = n_eval; weight diffs: a gentler power-law decay, rank 16 =
2 × LoRA rank), and, where the harness cache holds the default run's labels and a diff, the
measured spectra (``--real``, default on when .ws-cache is present).

Draws use ``nulls.diagonal_null_energies`` (exact in law: only the rows of a random
orthonormal d×k matrix along A's eigenvectors, plus a Bartlett-Wishart for the rest), float64,
numpy Generators with fixed seeds. Rates are counted with ``strategies.count_below``
(bisection: p is monotone in E). Bounds: one-sided Clopper–Pearson 99 % upper bound of the
rate; "above α" when even the 99 % lower bound exceeds α (a rate clearly above α).

Usage (single process, ~10 min at the defaults on one core):

    .venv/bin/python benchmarks/bench_calibration.py [--draws 1000000] [--mean-draws 400000]
        [--no-real] [--out benchmarks/calibration.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "invariants"))

from strategies import (  # noqa: E402
    count_below,
    label_like_spectrum,
    mean_like_spectrum,
    weight_like_spectrum,
)

from ws_harness import nulls as nu  # noqa: E402

D, K = 576, 8
ALPHAS = (1e-2, 1e-3, 1e-4)
N_LAYERS = 15  # touched layers of the default run (9–23 of 30)


def cp_bounds(x: int, n: int, level: float = 0.99) -> tuple[float, float]:
    """One-sided Clopper–Pearson (lower, upper) bounds of a binomial rate at ``level``."""
    lo = 0.0 if x == 0 else float(stats.beta.ppf(1 - level, x, n - x + 1))
    hi = 1.0 if x == n else float(stats.beta.ppf(level, x + 1, n - x))
    return lo, hi


Case = tuple[list[np.ndarray], np.ndarray]  # per-layer spectra, spectrum of Ā


def synthetic_cases() -> dict[str, Case]:
    """Per-layer spectra (L = 15) of the default run's shapes and their Ā (``mean_like_spectrum``)."""
    labels = [label_like_spectrum(top) for top in np.linspace(0.98, 0.86, N_LAYERS)]
    weights = [weight_like_spectrum(ex) for ex in np.linspace(1.0, 1.4, N_LAYERS)]
    return {
        "label": (labels, mean_like_spectrum(labels, D, seed=3)),
        "weight": (weights, mean_like_spectrum(weights, D, seed=4)),
    }


def real_cases(cache: Path) -> dict[str, Case] | None:
    """The default run's measured label and combined-weight spectra per touched layer, and Ā's."""
    try:
        import torch
        from safetensors import safe_open
        from safetensors.torch import load_file

        from ws_harness import scores as sc
    except ImportError:
        return None
    diff = next(
        (p for p in sorted((cache / "diff").glob("*/parts.json"))
         if json.loads(p.read_text())["parts"].get("model") == "smollm2-135m-instruct"),
        None,
    )
    lab = next(
        (p for p in sorted((cache / "labels").glob("*/parts.json"))
         if json.loads(p.read_text())["parts"].get("model") == "smollm2-135m-instruct"),
        None,
    )
    if diff is None or lab is None:
        return None
    X = load_file(str(lab.parent / "tensors.safetensors"))["eval"]
    act, w = [], []
    with safe_open(str(diff.parent / "w.safetensors"), "pt") as f:
        touched = sorted({int(k.split(".")[2]) for k in f.keys() if "o_proj" in k})
        for l in touched:
            act.append(sc.activation_target(X[l]))
            Ms = [f.get_tensor(f"model.layers.{l}.self_attn.o_proj.weight").to(torch.float32),
                  f.get_tensor(f"model.layers.{l}.mlp.down_proj.weight").to(torch.float32)]
            w.append(sc.combined_weight_target(Ms))
    return {
        name: ([t.spectrum.numpy() for t in ts], sc.mean_spectrum(ts).numpy())
        for name, ts in (("label", act), ("weight", w))
    }


def _clean(lam: np.ndarray, rel: float = 1e-10) -> np.ndarray:
    """Drop float-noise eigenvalues (< rel·λ_max) and renormalise to tr A = 1."""
    lam = np.sort(np.clip(np.asarray(lam, float), 0.0, None))[::-1]
    lam = lam[lam > rel * lam[0]]
    return lam / lam.sum()


Row = tuple[str, float, str, str, str, int, int]


def rates(
    draws: np.ndarray, methods: dict[str, Callable[[float], float]], case: str, scope: str
) -> list[Row]:
    rows = []
    for name, p_of in methods.items():
        for a in ALPHAS:
            rows.append((scope, a, name, case, "", draws.size, count_below(draws, p_of, a)))
    return rows


def single_layer(lam: np.ndarray, n: int, seed: int, case: str) -> list[Row]:
    lam = _clean(lam)
    e = nu.diagonal_null_energies(lam, K, D, n, seed)
    mean, var = nu.null_moments(1.0, float(np.sum(lam**2)), K, D)
    return rates(e, {
        "saddlepoint": lambda x: nu.saddlepoint_p_value(x, lam, K, D),
        "beta": lambda x: nu.beta_p_value(x, mean, var),
    }, case, "layer")


def per_layer_mean(layers: list[np.ndarray], n: int, seed: int, case: str) -> list[Row]:
    specs = [_clean(s) for s in layers]
    L = len(specs)
    r = np.zeros(n)
    for l, lam in enumerate(specs):
        r += nu.diagonal_null_energies(lam, K, D, n, seed + 1000 * l) * (D / K) / L
    var_r = sum(nu.null_moments(1.0, float(np.sum(s**2)), K, D)[1] for s in specs) / L**2
    c = D / K  # summarize_layers: S = mean R / c, a Beta matched to S's moments
    return rates(r, {
        "saddlepoint": lambda x: nu.layer_mean_saddlepoint_p_value(x, specs, [K] * L, D),
        "beta": lambda x: nu.beta_p_value(x / c, 1.0 / c, var_r * (D / K) ** 2 / c**2),
    }, case, f"mean of {L}, per-layer null")


def global_mean(lam_bar: np.ndarray, n: int, seed: int, case: str, L: int) -> list[Row]:
    lam = _clean(lam_bar)
    e = nu.diagonal_null_energies(lam, K, D, n, seed)
    mean, var = nu.null_moments(1.0, float(np.sum(lam**2)), K, D)
    return rates(e, {
        "saddlepoint": lambda x: nu.saddlepoint_p_value(x, lam, K, D),
        "beta": lambda x: nu.beta_p_value(x, mean, var),
    }, case, f"mean of {L}, global null (Ā, rank {lam.size})")


def table(rows: list[Row]) -> str:
    head = ("| scope | α | method | d | k | spectrum | draws | rejections | rate | rate/α "
            "| 99% upper | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for scope, a, method, case, _, n, x in rows:
        lo, hi = cp_bounds(x, n)
        verdict = "**above α**" if lo > a else ("conservative" if hi < a else "ok")
        lines.append(f"| {scope} | {a:g} | {method} | {D} | {K} | {case} | {n:,} | {x} | "
                     f"{x / n:.2e} | {x / n / a:.2f} | {hi:.2e} | {verdict} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=1_000_000, help="draws per single-layer case")
    ap.add_argument("--mean-draws", type=int, default=400_000, help="draws per layer-mean case")
    ap.add_argument("--no-real", action="store_true", help="synthetic spectra only")
    ap.add_argument("--cache", type=Path, default=ROOT / ".ws-cache")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    families: dict[str, dict[str, list[np.ndarray]]] = {"synthetic": synthetic_cases()}
    if not args.no_real and args.cache.exists():
        real = real_cases(args.cache)
        if real is not None:
            families["real"] = real
    rows: list[Row] = []
    for fam, cases in families.items():
        for kind, (layers, bar) in cases.items():
            case = f"{fam} {kind}"
            mid = layers[len(layers) // 2]
            rows += single_layer(mid, args.draws, 1, f"{case} (λ₁ = {_clean(mid)[0]:.2f})")
            print(f"[{time.perf_counter() - t0:6.0f}s] {case}: one layer", flush=True)
            rows += per_layer_mean(layers, args.mean_draws, 2, case)
            print(f"[{time.perf_counter() - t0:6.0f}s] {case}: per-layer mean", flush=True)
            bar = _clean(bar)
            rows += global_mean(bar, args.mean_draws, 4, f"{case} (Ā: λ₁ = {bar[0]:.2f})",
                                len(layers))
            print(f"[{time.perf_counter() - t0:6.0f}s] {case}: global mean", flush=True)
    text = table(rows)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
