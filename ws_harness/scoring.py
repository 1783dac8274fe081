"""The scoring core: bases against one diff's targets → per-layer rows and a summary (no session)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ws_harness import schema
from ws_harness.scores import (
    Score,
    Target,
    activation_target,
    bootstrap_mean_r_act_ci,
    combined_weight_target,
    pct_oracle,
    recovery,
    summarize_layers,
    weight_target,
)

__all__ = ["DiffTargets", "EnergyDraws", "coupled_energy_tables", "score_bases",
           "structured_energy_table"]


@dataclass
class DiffTargets:
    """One diff's targets per layer (SPEC §4) and the base-model references of the secondary scores.

    act: A_act from the EVAL labels; w_oproj, w_downproj: A_T from ΔW_o and ΔW_down;
    w_combined: their balanced concatenation (None where the diff leaves a layer untouched).
    labels [L, n_eval, d]: h(α=+1) − h(α=−1). write_weights: the base [W_o | W_down] per layer
    (structured null); clean_pcs: the top-k clean FIT PCs per layer (specificity). The last two
    come from the base model (A side), not the diff. causal / causal_read: the symmetric d×d
    attribution matrices C_l of SPEC §4.1 (residual writes; read deltas), None where untouched
    (empty: not computed, the linear metrics are then NaN).
    """

    act: list[Target | None]
    w_oproj: list[Target | None]
    w_downproj: list[Target | None]
    w_combined: list[Target | None]
    labels: torch.Tensor
    touched: list[int]
    write_weights: list[torch.Tensor] = field(default_factory=list)
    clean_pcs: list[torch.Tensor] = field(default_factory=list)
    causal: list[torch.Tensor | None] = field(default_factory=list)
    causal_read: list[torch.Tensor | None] = field(default_factory=list)
    # (layer, scope) -> structured-null draws (SPEC §4): given by the caller, who caches them
    # on disk; None: r_w_struct is NaN.
    structured_draws: Callable[[int, str], Any] | None = field(default=None, repr=False)
    _eigen: dict[str, list[torch.Tensor | None]] = field(default_factory=dict, repr=False)
    _structured: dict[tuple[int, str], Any] = field(default_factory=dict, repr=False)

    def structured(self, layer: int, scope: str) -> Any:
        """The structured-null draws of one layer for a per-layer or global basis (memoised)."""
        if self.structured_draws is None or self.w_combined[layer] is None:
            return None
        key = (layer, "global" if scope == "global" else "per_layer")
        if key not in self._structured:
            self._structured[key] = self.structured_draws(*key)
        return self._structured[key]

    def eigenvalues(self, metric: str) -> list[torch.Tensor | None]:
        """Eigenvalues of a linear metric's C_l per layer, computed once per diff (not per basis)."""
        if metric not in self._eigen:
            m = schema.metric(metric)
            mats = [m.target(self, l) for l in range(self.labels.shape[0])]
            self._eigen[metric] = [None if C is None else torch.linalg.eigvalsh(
                (C.double() + C.double().T) / 2) for C in mats]
        return self._eigen[metric]

    @classmethod
    def build(
        cls, labels: torch.Tensor, deltas: dict[tuple[int, str], torch.Tensor],
        touched: Sequence[int], write_weights: Sequence[torch.Tensor] = (),
        clean_pcs: Sequence[torch.Tensor] = (), causal: Sequence[torch.Tensor | None] = (),
        causal_read: Sequence[torch.Tensor | None] = (),
        structured_draws: Callable[[int, str], Any] | None = None,
    ) -> DiffTargets:
        """Targets from labels [L, n, d] and the diff's {(layer, role): ΔW} (roles 'o', 'down')."""
        n_layers = labels.shape[0]
        o = [deltas.get((l, "o")) for l in range(n_layers)]
        down = [deltas.get((l, "down")) for l in range(n_layers)]
        # Layers upstream of every touched parameter have an exactly zero label: no target there.
        return cls(
            act=[activation_target(labels[l]) if bool(labels[l].any()) else None
                 for l in range(n_layers)],
            w_oproj=[weight_target(m) for m in o],
            w_downproj=[weight_target(m) for m in down],
            w_combined=[combined_weight_target([a, b]) for a, b in zip(o, down)],
            labels=labels,
            touched=sorted(touched),
            write_weights=list(write_weights),
            clean_pcs=list(clean_pcs),
            causal=list(causal),
            causal_read=list(causal_read),
            structured_draws=structured_draws,
        )


@dataclass(frozen=True)
class EnergyDraws:
    """Stored structured-null draws of one layer: E_j(k) for k = 1..k_max, table [k_max, n].

    What ``nulls.StructuredDraws.energies(k)`` gives, kept as a small table so a cache entry
    holds it (the draws' [n, k_max, k_max] Gram blocks would be 100× larger).
    """

    table: torch.Tensor
    d: int

    @property
    def n(self) -> int:
        return int(self.table.shape[1])

    @property
    def k_max(self) -> int:
        return int(self.table.shape[0])

    def energies(self, k: int) -> torch.Tensor:
        if not 1 <= k <= self.k_max:
            raise ValueError(f"k={k} must be in [1, k_max={self.k_max}]")
        return self.table[k - 1]


def structured_energy_table(target: Target, W: torch.Tensor, k_max: int, n_samples: int,
                            seed: int) -> torch.Tensor:
    """[k_max, n] energies of the structured null for one layer (scores.structured_reference)."""
    from ws_harness.scores import structured_reference

    draws = structured_reference(target, W, k_max, n_samples=n_samples, generator=seed)
    return torch.stack([draws.energies(k) for k in range(1, k_max + 1)])


def coupled_energy_tables(targets: Sequence[Target], Ws: Sequence[torch.Tensor], k_max: int,
                          n_samples: int, seed: int) -> list[torch.Tensor]:
    """The tables of `structured_energy_table` for layers drawn with one shared seed (a global
    basis's null), each chunk of Gaussians drawn once for all of them."""
    from ws_harness.nulls import coupled_structured_energies

    return coupled_structured_energies(Ws, [t.factor for t in targets], k_max, n_samples, seed)


def _mean_defined(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def score_bases(
    bases: Sequence[torch.Tensor | None], targets: DiffTargets, axis: str, scope: str
) -> dict[str, Any]:
    """Per-layer rows and the layer-averaged summary of one basis set against one diff.

    bases: one orthonormal [d, r] basis (or None) per layer; axis: the hypothesis's axis kind
    (which metrics apply); scope: 'per_layer' or 'global' (which null the layer mean uses).
    Every metric of the schema is computed; rows carry layer, touched and rank, the caller adds
    the identity columns. Summaries average over the touched layers that have a basis.
    """
    touched = set(targets.touched)
    used = [l for l in targets.touched if bases[l] is not None]
    kind = "global" if scope == "global" else "per_layer"
    rows: list[dict[str, Any]] = [
        {"layer": l, "touched": l in touched, "rank": 0 if B is None else int(B.shape[1])}
        for l, B in enumerate(bases)
    ]
    summary: dict[str, Any] = {
        "rank": float(np.mean([r["rank"] for r in rows if r["touched"] and r["rank"] > 0] or [0])),
        "n_layers": len(used),
    }
    for m in schema.metrics():
        if m.kind in ("derived", "measured"):
            continue
        applies = m.applies_to(axis)
        if m.kind == "linear":
            _linear(m, bases, targets, rows, summary, used if applies else [], kind)
        elif m.kind == "tested":
            _tested(m, bases, targets, rows, summary, used if applies else [], kind)
        elif m.kind == "recovery":
            per_layer: list[tuple[Score, Target | None]] = []
            for l, B in enumerate(bases):
                target = m.target(targets, l)
                score = None if B is None or not applies else recovery(B, target,
                                                                       p_method=schema.P_METHOD)
                if l in touched and score is not None:
                    per_layer.append((score, target))
                rows[l][m.name] = math.nan if score is None else score.r
                rows[l][m.z] = math.nan if score is None else score.z
                rows[l][m.p] = math.nan if score is None else score.p
                rows[l][m.pct_oracle] = (math.nan if B is None or not applies
                                         else pct_oracle(B, target))
            summary.update(_summarize(m, per_layer, kind))
            summary[defined_layers_column(m.name)] = sum(t is not None for _, t in per_layer)
            summary[m.pct_oracle] = _mean_defined([rows[l][m.pct_oracle] for l in used])
        else:
            for l, B in enumerate(bases):
                # Layer metrics are defined where the diff acts (labels upstream of it are 0).
                defined = applies and B is not None and l in touched
                rows[l][m.name] = m.per_layer(B, targets, l) if defined else math.nan
            summary[m.name] = _mean_defined([rows[l][m.name] for l in used])
    for m in schema.measured_metrics():  # filled in by the measured phase, where it ran
        summary.update({c: math.nan for c in m.summary_columns()})
    ci = schema.CI_METRIC
    if used and ci in summary:
        lo, hi = bootstrap_mean_r_act_ci([bases[l] for l in used], [targets.labels[l] for l in used])
    else:
        lo = hi = math.nan
    summary[f"{ci}_ci_lo"], summary[f"{ci}_ci_hi"] = lo, hi
    for m in schema.metrics():
        if m.kind == "derived":
            summary[m.name] = m.derive(summary) if m.applies_to(axis) else math.nan
    return {"rows": rows, "summary": summary}


def _tested(m: schema.Metric, bases: Sequence[torch.Tensor | None], targets: DiffTargets,
            rows: list[dict[str, Any]], summary: dict[str, Any], used: list[int],
            kind: str) -> None:
    """A metric with its own null (schema kind "tested"): r and p per layer, the summary's
    mean r, z and p from the metric's summarize()."""
    for row in rows:
        row.update({m.name: math.nan, m.p: math.nan})
    defined = []
    for l in used:
        r, p = m.per_layer(bases[l], targets, l, kind)  # type: ignore[misc]
        rows[l].update({m.name: r, m.p: p})
        if not math.isnan(r):
            defined.append(l)
    values = m.summarize(bases, targets, defined, kind) if defined else (math.nan,) * 3  # type: ignore[misc]
    summary.update(dict(zip((m.name, m.z, m.p), values, strict=True)))
    summary[defined_layers_column(m.name)] = len(defined)


def defined_layers_column(metric: str) -> str:
    """The summary column counting the touched layers where `metric` is defined (0: the diff
    gives it nothing to score, e.g. R_causal_read of a diff without read-side deltas, or
    R_causal where the deltas at the basis's layers carry no steering at first order)."""
    return f"n_layers_{metric}"


def _linear(m: schema.Metric, bases: Sequence[torch.Tensor | None], targets: DiffTargets,
            rows: list[dict[str, Any]], summary: dict[str, Any], used: list[int],
            kind: str) -> None:
    """A linear (attribution) metric (SPEC §4.1): c and R per layer, and summed with its null.

    Per layer, c_l = tr(B_lᵀC_lB_l)/tr C_l and R_l = c_l·d/k_l (its null mean is k_l/d); the
    summary is Σ_l tr(B_lᵀC_lB_l)/Σ_l tr C_l with z and p from the exact null.
    """
    from ws_harness.attribution import linear_retention

    for row in rows:
        row.update({m.name: math.nan, m.fraction: math.nan})
    layers = [l for l in used if m.target(targets, l) is not None]
    values = (math.nan,) * 5
    if layers:
        # Untouched layers carry no C; a global basis's null shares one subspace across the rest.
        eigen = targets.eigenvalues(m.name)
        total = linear_retention([bases[l] if l in layers else None for l in range(len(bases))],
                                 [m.target(targets, l) for l in range(len(bases))], kind,
                                 eigenvalues=eigen)
        if total.reason is None:
            values = (total.r, total.c_lin, total.z, total.p, total.pct_oracle)
        d = targets.labels.shape[-1]
        for l in layers:
            c_l = total.c_lin_layers[l]
            rows[l].update({m.name: c_l * d / bases[l].shape[1], m.fraction: c_l})
    summary.update(dict(zip(m.summary_columns(), values, strict=True)))
    # Undefined (no target, or Σ tr C ≤ 0 over the basis's layers): no layer counts.
    summary[defined_layers_column(m.name)] = len(layers) if math.isfinite(values[0]) else 0


def _summarize(m: schema.Metric, pairs: list[tuple[Score, Target | None]], kind: str) -> dict:
    """Layer mean of a recovery metric with its exact null: saddlepoint p (claims) and Beta p."""
    if not pairs:
        return {m.name: math.nan, m.z: math.nan, m.p: math.nan, m.p_beta: math.nan}
    scores, tgts = zip(*pairs)
    # A global basis scored where some layers lack a target (e.g. o untouched) still has one
    # rank; summarize_layers excludes the undefined layers from both mean and null.
    s = summarize_layers(list(scores), list(tgts), kind, p_method=schema.P_METHOD)
    beta = summarize_layers(list(scores), list(tgts), kind, p_method="beta")
    return {m.name: s.mean_r, m.z: s.z, m.p: s.p, m.p_beta: beta.p}
