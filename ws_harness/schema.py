"""The metric and claim schema: every score column, where it applies, how it is shown, and the claim rule.

One :class:`Metric` entry per score. Every list the rest of the harness needs is derived from
:func:`metrics` — table columns (per layer, summary, claims), the ranking's aggregated scores and
rank keys, the terminal table, the snapshot gate's scores, the report's heatmap panels and the
claims an axis kind makes. Adding a metric is one :func:`register` call plus its compute
function (see README, "Adding a metric").

Six kinds of metric:

* ``recovery`` — E(B) = tr(BᵀAB) against a per-layer target A (SPEC §4) with the exact
  random-subspace null: per-layer and summary columns ``r_<stem>``, ``z_<stem>``, ``p_<stem>``
  (saddlepoint p), ``p_<stem>_beta`` (moment-matched Beta, summary only) and
  ``pct_oracle_<stem>``. ``target(targets, layer)`` gives A (a ``scores.Target`` or None).
* ``layer`` — any per-layer number ``per_layer(B, targets, layer)``; the summary is its mean
  over the touched layers where it is finite.
* ``linear`` — linear (attribution) retention (SPEC §4.1): ``target(targets, layer)`` gives a
  symmetric, possibly indefinite d×d matrix C_l; c = Σ_l tr(B_lᵀC_lB_l)/Σ_l tr(C_l) (column
  ``fraction``, e.g. ``c_lin``), R = c / its exact null mean, with ``z_<stem>``, ``p_<stem>``
  and ``pct_oracle_<stem>`` (the Ky Fan optimum: top-k eigenvectors of C_l).
* ``tested`` — a per-layer score with its own null (SPEC §6 claim 4: R_w_struct against the
  structured null, R_act_specific in the complement of the clean PCs):
  ``per_layer(B, targets, layer, scope) -> (r, p)`` and ``summarize(bases, targets, layers,
  scope) -> (mean r, z, p)``; columns ``r_<stem>``, ``p_<stem>`` per layer and ``r_<stem>``,
  ``z_<stem>``, ``p_<stem>`` in the summary (no oracle: it has no Ky Fan optimum).
* ``derived`` — a function ``derive(summary)`` of the other summary columns.
* ``measured`` — measured with the model outside the scoring core (the keep/drop steering
  retention of SPEC §4.1, ``ws_harness.retention``); ``interval`` adds ``<name>_lo``/``_hi``.

The claim rule (SPEC §6): a claim is "``<metric>`` > 1" for the axis kinds the metric lists in
``claim_axes``, tested with one-sided p < ``ALPHA`` after Benjamini–Hochberg over every claim
of the run; "held" means that test passed, never a point estimate above 1.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ws_harness import linalg, scores

if TYPE_CHECKING:
    from torch import Tensor

    from ws_harness.scoring import DiffTargets

__all__ = [
    "ALPHA",
    "AXIS_KINDS",
    "BASIS_ORTHONORMAL_TOL",
    "CI_METRIC",
    "ID_COLUMNS",
    "ORACLE_MIN_R",
    "ORACLE_MIN_Z",
    "ORACLE_PCT_MIN",
    "P_METHOD",
    "SCATTER_AXES",
    "TABLES",
    "ClaimStatus",
    "Metric",
    "metrics",
    "metric",
    "register",
    "unregister",
    "recovery_metrics",
    "measured_metrics",
    "rank_beside",
    "claims_for",
    "claim_metrics",
    "claim_names",
    "oracle_names",
    "holds",
    "classify",
    "table_of",
    "rank_key",
    "gate_scores",
    "score_columns",
    "per_layer_columns",
    "terminal_columns",
    "heatmap_metrics",
    "label",
    "fingerprint",
]

# ---- the claim rule (SPEC §6) ----------------------------------------------------------------

ALPHA = 0.01  # one-sided p < ALPHA after Benjamini–Hochberg across all claims of the run
# Claims use the saddlepoint p-value: the moment-matched Beta of SPEC §4 rejects random bases
# 1.4–2.2× too often when one label direction dominates (invariants/test_null_invariants.py).
# The Beta p stays in the tables as p_*_beta.
P_METHOD = "saddlepoint"
# claim 1: ‖BᵀB − I‖_max in float32; defined in linalg so that modules computing cached
# forward-pass products (attribution, retention) need not import the schema.
BASIS_ORTHONORMAL_TOL = linalg.BASIS_ORTHONORMAL_TOL
# An oracle (a ceiling with oracle_of=metric) sits at its own optimum and beats the null widely.
ORACLE_PCT_MIN = 1 - 1e-4
ORACLE_MIN_R = 2.0
ORACLE_MIN_Z = 5.0

AXIS_KINDS = ("write", "read", "mixed", "ceiling")
TABLES = ("write/mixed", "read", "ceiling")  # ranked apart, never mixed; ceilings not ranked
_TABLE_OF_AXIS = {"write": "write/mixed", "mixed": "write/mixed", "read": "read",
                  "ceiling": "ceiling"}
# Identity columns of every per-layer, summary and claims row: the diff's name and, for diffs
# the harness built, its integer seed (null for loaded files).
ID_COLUMNS = ("diff", "seed", "hypothesis", "family", "axis_kind")
CI_METRIC = "r_act"  # the bootstrap CI over EVAL prompts (r_act_ci_lo/hi) is of this metric
SCATTER_AXES = ("r_act", "r_w_combined")  # the joint scatter (SPEC §7): x, y

ClaimStatus = Literal["held", "refuted", "surprise", "stale"]
MetricKind = Literal["recovery", "linear", "tested", "layer", "derived", "measured"]
Column = Literal["r", "z", "pct_oracle"]


@dataclass(frozen=True)
class Metric:
    """One score: its column name, label, compute function and where it appears.

    name: the value column (``r_act``; recovery metrics must start with ``r_``).
    label: how plots, reports and gate messages call it (``R_act``).
    short: the terminal table's header stem (``act`` → ``R_act``, ``pct_act``, ``z_act``).
    axes: the axis kinds it is computed for (NaN elsewhere).
    claim_axes: axis kinds whose hypotheses claim ``name > 1`` (recovery metrics only).
    gate: the snapshot gate checks its median and seed range.
    ranks: the tables it is the ranking key of.
    terminal: the columns of it the terminal table shows ("r" = the value).
    heatmap: a per-layer panel in layer_heatmap.png (needs per-layer values).
    fraction: linear metrics: the column of the retained fraction itself (``c_lin``).
    scale: how the snapshot gate measures moves: "log" (ratios; R > 0) or "linear" (absolute,
      for scores that can be ≤ 0, such as R_causal).
    rank_beside: the ranking also reports each hypothesis's rank by this metric.
    """

    name: str
    label: str
    kind: MetricKind
    short: str = ""
    target: Callable[[DiffTargets, int], scores.Target | None] | None = None
    per_layer: Callable[[Tensor, DiffTargets, int], float] | None = None
    derive: Callable[[dict[str, Any]], float] | None = None
    # tested metrics: per_layer(B, targets, layer, scope) -> (r, p) and
    # summarize(bases, targets, used layers, scope) -> (mean r, z, p), each with its own null.
    summarize: Callable[..., tuple[float, float, float]] | None = None
    axes: tuple[str, ...] = AXIS_KINDS
    claim_axes: tuple[str, ...] = ()
    gate: bool = False
    ranks: tuple[str, ...] = ()
    terminal: tuple[Column, ...] = ()
    heatmap: bool = False
    fraction: str | None = None
    scale: Literal["log", "linear"] = "log"
    rank_beside: bool = False
    interval: bool = False

    def __post_init__(self) -> None:
        needs = {"recovery": "target", "linear": "target", "tested": "summarize",
                 "layer": "per_layer", "derived": "derive", "measured": None}
        if self.kind not in needs:
            raise ValueError(f"metric {self.name!r}: kind {self.kind!r} is not one of {list(needs)}")
        if needs[self.kind] is not None and getattr(self, needs[self.kind]) is None:
            raise ValueError(f"metric {self.name!r}: a {self.kind} metric needs {needs[self.kind]}=")
        if self.has_p and not self.name.startswith("r_"):
            raise ValueError(f"{self.kind} metric {self.name!r}: its name must start with 'r_'")
        if self.kind == "linear" and not self.fraction:
            raise ValueError(f"linear metric {self.name!r}: name its fraction column (fraction=)")
        if self.claim_axes and not self.has_p:
            raise ValueError(f"metric {self.name!r}: only metrics with a p-value make claims")
        unknown = sorted((set(self.axes) | set(self.claim_axes)) - set(AXIS_KINDS))
        if unknown:
            raise ValueError(f"metric {self.name!r}: unknown axis kinds {unknown}; use {AXIS_KINDS}")
        bad_tables = sorted(set(self.ranks) - set(TABLES))
        if bad_tables:
            raise ValueError(f"metric {self.name!r}: unknown tables {bad_tables}; use {TABLES}")
        if self.heatmap and self.kind in ("derived", "measured"):
            raise ValueError(f"metric {self.name!r}: a derived metric has no per-layer values")

    @property
    def stem(self) -> str:
        return self.name[2:] if self.has_p else self.name

    @property
    def has_null(self) -> bool:
        """Whether it has the exact random-subspace null of SPEC §4/§4.1 (and a Ky Fan oracle)."""
        return self.kind in ("recovery", "linear")

    @property
    def has_p(self) -> bool:
        """Whether it has z and p columns: the exact nulls, or a tested metric's own null."""
        return self.has_null or self.kind == "tested"

    @property
    def z(self) -> str | None:
        return f"z_{self.stem}" if self.has_p else None

    @property
    def p(self) -> str | None:
        return f"p_{self.stem}" if self.has_p else None

    @property
    def p_beta(self) -> str | None:
        return f"p_{self.stem}_beta" if self.kind == "recovery" else None

    @property
    def pct_oracle(self) -> str | None:
        return f"pct_oracle_{self.stem}" if self.has_null else None

    def applies_to(self, axis: str) -> bool:
        return axis in self.axes

    def layer_columns(self) -> list[str]:
        """Its columns in the per-layer table."""
        if self.kind == "recovery":
            return [self.name, self.z, self.p, self.pct_oracle]  # type: ignore[list-item]
        if self.kind == "linear":
            return [self.name, self.fraction]  # type: ignore[list-item]
        if self.kind == "tested":
            return [self.name, self.p]  # type: ignore[list-item]
        return [self.name] if self.kind == "layer" else []

    def summary_columns(self) -> list[str]:
        """Its columns in the summary table."""
        if self.kind == "recovery":
            return [self.name, self.z, self.p, self.p_beta, self.pct_oracle]  # type: ignore[list-item]
        if self.kind == "linear":
            return [self.name, self.fraction, self.z, self.p, self.pct_oracle]  # type: ignore[list-item]
        if self.kind == "tested":
            return [self.name, self.z, self.p]  # type: ignore[list-item]
        if self.interval:
            return [self.name, f"{self.name}_lo", f"{self.name}_hi"]
        return [self.name]


# ---- the built-in metrics (SPEC §4) ---------------------------------------------------------


def _overlap_w(B: Tensor, targets: DiffTargets, layer: int) -> float:
    return scores.diff_overlap(B, targets.w_combined[layer])


def _structured_layer(B: Tensor, targets: DiffTargets, layer: int,
                      scope: str) -> tuple[float, float]:
    # r_w_struct_l = E/mean_j E_j against draws Q_j = orth((W_lW_lᵀ)^{1/2} Z_j) (SPEC §4), and
    # the Monte Carlo p = (1 + #{E_j ≥ E})/(n + 1) from the same draws.
    draws = targets.structured(layer, scope)
    if draws is None or B.shape[1] > draws.k_max:
        return math.nan, math.nan
    return scores.structured_test(B, targets.w_combined[layer], draws)


def _structured_summary(bases: Sequence[Tensor | None], targets: DiffTargets, used: list[int],
                        scope: str) -> tuple[float, float, float]:
    layers = [l for l in used if targets.w_combined[l] is not None
              and (draws := targets.structured(l, scope)) is not None
              and bases[l].shape[1] <= draws.k_max]  # type: ignore[union-attr]
    if not layers:
        return math.nan, math.nan, math.nan
    mean_r, p = scores.structured_layer_mean([bases[l] for l in layers],
                                             [targets.w_combined[l] for l in layers],
                                             [targets.structured(l, scope) for l in layers])
    return mean_r, math.nan, p  # a Monte Carlo p has no exact z


def _specific_layer(B: Tensor, targets: DiffTargets, layer: int,
                    scope: str) -> tuple[float, float]:
    # R_act of B with the top-k clean FIT PCs removed from basis and labels; exact null of a
    # Haar subspace of the complement (saddlepoint p).
    if not targets.clean_pcs:
        return math.nan, math.nan
    s = scores.specificity(B, targets.labels[layer], targets.clean_pcs[layer],
                           p_method="saddlepoint")
    return s.r, s.p


def _specific_summary(bases: Sequence[Tensor | None], targets: DiffTargets, used: list[int],
                      scope: str) -> tuple[float, float, float]:
    if not targets.clean_pcs:
        return math.nan, math.nan, math.nan
    s = scores.specificity_summary([bases[l] for l in used], [targets.labels[l] for l in used],
                                   [targets.clean_pcs[l] for l in used],
                                   "global" if scope == "global" else "per_layer")
    return s.mean_r, s.z, s.p


# Monte Carlo draws per layer for the structured null's p-value: its floor is 1/(n + 1) =
# 2.5e-4, far below the BH thresholds its claims meet; the draws are cached per diff.
STRUCTURED_SAMPLES = 4000
STRUCTURED_MAX_RANK_FACTOR = 2  # draws serve bases up to 2k (unions); wider ones score NaN

_WRITE_MIXED = ("write", "mixed")
_REGISTRY: dict[str, Metric] = {}


def register(entry: Metric) -> Metric:
    """Add a metric to the schema (after the built-ins, in registration order); returns it."""
    if not isinstance(entry, Metric):
        raise TypeError(f"register() takes a schema.Metric, got {type(entry).__name__}")
    clash = {c for m in _REGISTRY.values() if m.name != entry.name for c in m.summary_columns()}
    taken = sorted(clash & set(entry.summary_columns()))
    if taken:
        raise ValueError(f"metric {entry.name!r}: columns {taken} already belong to another metric")
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a metric (tests that register a toy metric clean up with this)."""
    _REGISTRY.pop(name, None)


for _entry in (
    # Schema order is display order: the causal score leads the terminal table and the gate.
    Metric("r_causal", "R_causal", "linear", short="causal",
           target=lambda t, l: t.causal[l] if t.causal else None, fraction="c_lin",
           claim_axes=_WRITE_MIXED, gate=True, scale="linear", ranks=("write/mixed", "ceiling"),
           terminal=("r", "z")),
    Metric("r_causal_read", "R_causal_read", "linear", short="c_read",
           target=lambda t, l: t.causal_read[l] if t.causal_read else None,
           fraction="c_lin_read", claim_axes=("read",), gate=True, scale="linear",
           ranks=("read",), terminal=("r",)),
    Metric("c_keep", "c_keep (measured)", "measured", short="keep", interval=True,
           terminal=("r",)),
    Metric("c_drop", "c_drop (measured)", "measured", short="drop", interval=True),
    Metric("c_keep_norm", "c_keep, norm-matched", "measured", short="keep_nm"),
    Metric("keep_percentile", "c_keep percentile among random subspaces", "measured",
           short="keep_pct"),
    Metric("joint", "joint", "derived", short="joint",
           derive=lambda s: scores.joint_score(s["r_act"], s["r_w_combined"]),
           gate=True, rank_beside=True, terminal=("r",)),
    Metric("r_act", "R_act", "recovery", short="act", target=lambda t, l: t.act[l],
           claim_axes=("write", "read", "mixed"), gate=True, rank_beside=True,
           terminal=("r", "pct_oracle", "z"), heatmap=True),
    Metric("r_w_oproj", "R_w_oproj", "recovery", short="w_o", target=lambda t, l: t.w_oproj[l]),
    Metric("r_w_downproj", "R_w_downproj", "recovery", short="w_down",
           target=lambda t, l: t.w_downproj[l]),
    Metric("r_w_combined", "R_w_combined", "recovery", short="w",
           target=lambda t, l: t.w_combined[l], claim_axes=_WRITE_MIXED, gate=True,
           rank_beside=True, terminal=("r", "z"), heatmap=True),
    Metric("overlap_w", "overlap with w_oracle", "layer", short="overlap", per_layer=_overlap_w),
    # SPEC §6 claim 4: beyond the isotropic null (a structured null; the clean PCs removed).
    Metric("r_w_struct", "R_w vs structured null", "tested", short="w_struct",
           per_layer=_structured_layer, summarize=_structured_summary, axes=_WRITE_MIXED,
           claim_axes=_WRITE_MIXED, gate=True),
    Metric("r_act_specific", "R_act specific", "tested", short="act_spec",
           per_layer=_specific_layer, summarize=_specific_summary, axes=_WRITE_MIXED,
           claim_axes=_WRITE_MIXED, gate=True, rank_beside=True),
    Metric("act_w_gap_log2", "log2(R_act/R_w_combined)", "derived", short="gap",
           derive=lambda s: scores.act_w_gap_log2(s["r_act"], s["r_w_combined"])),
):
    register(_entry)


# ---- derived views ---------------------------------------------------------------------------


def metrics() -> tuple[Metric, ...]:
    """Every metric, built-ins first, in schema order."""
    return tuple(_REGISTRY.values())


def metric(name: str) -> Metric:
    """The metric called `name` (its value column)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; the schema has {sorted(_REGISTRY)}") from None


def recovery_metrics() -> tuple[Metric, ...]:
    return tuple(m for m in metrics() if m.kind == "recovery")


def measured_metrics() -> tuple[Metric, ...]:
    return tuple(m for m in metrics() if m.kind == "measured")


def rank_beside() -> tuple[str, ...]:
    """Metrics whose per-table rank is reported beside the primary rank."""
    return tuple(m.name for m in metrics() if m.rank_beside)


def claims_for(axis: str) -> tuple[str, ...]:
    """The claims (metric names) a hypothesis of this axis kind makes, in schema order."""
    if axis not in AXIS_KINDS:
        raise ValueError(f"axis {axis!r} is not one of {AXIS_KINDS}")
    return tuple(m.name for m in metrics() if axis in m.claim_axes)


def claim_metrics() -> tuple[Metric, ...]:
    return tuple(m for m in metrics() if m.claim_axes)


def claim_names() -> tuple[str, ...]:
    """Every claim any axis makes (what `refuted=` may name)."""
    return tuple(m.name for m in claim_metrics())


def oracle_names() -> tuple[str, ...]:
    """What a ceiling's `oracle_of=` may name: metrics with a Ky Fan optimum (recovery, linear)."""
    return tuple(m.name for m in metrics() if m.has_null)


def holds(value: float, p_adjusted: float) -> bool:
    """A claim holds when R > 1 and its BH-adjusted one-sided p is below ALPHA."""
    return bool(value > 1.0 and p_adjusted < ALPHA)


def classify(held: bool, recorded_refuted: bool) -> ClaimStatus:
    """held / refuted (a recorded finding, still true) / surprise (fails unrecorded) / stale."""
    if held:
        return "stale" if recorded_refuted else "held"
    return "refuted" if recorded_refuted else "surprise"


def table_of(axis: str) -> str:
    """The ranking table of an axis kind."""
    try:
        return _TABLE_OF_AXIS[axis]
    except KeyError:
        raise ValueError(f"axis {axis!r} is not one of {AXIS_KINDS}") from None


def rank_key(table: str) -> str:
    """The metric a table is ranked (ceilings: ordered) by."""
    for m in metrics():
        if table in m.ranks:
            return m.name
    raise ValueError(f"no metric ranks table {table!r}; set ranks=({table!r},) on one")


def gate_scores() -> tuple[str, ...]:
    """The summary scores the snapshot gate checks, in schema order."""
    return tuple(m.name for m in metrics() if m.gate)


def score_columns() -> list[str]:
    """Summary columns the ranking aggregates (median and IQR over seeds)."""
    cols: list[str] = []
    for m in metrics():
        cols += [c for c in (m.name, m.fraction, m.pct_oracle, m.z) if c is not None]
    return cols


def per_layer_columns() -> list[str]:
    """The per-layer table's leading columns: identity, layer, then every metric's columns."""
    cols = list(ID_COLUMNS) + ["layer", "touched", "rank"]
    for m in metrics():
        cols += m.layer_columns()
    return cols


def terminal_columns() -> list[tuple[str, str]]:
    """(summary column, header) of the terminal ranking table, in schema order."""
    out = []
    for m in metrics():
        short = m.short or m.stem
        for col in m.terminal:
            if col == "r":
                out.append((m.name, f"R_{short}" if m.has_null else short))
            elif col == "pct_oracle" and m.pct_oracle:
                out.append((m.pct_oracle, f"pct_{short}"))
            elif col == "z" and m.z:
                out.append((m.z, f"z_{short}"))
    return out


def heatmap_metrics() -> tuple[Metric, ...]:
    return tuple(m for m in metrics() if m.heatmap)


def label(name: str) -> str:
    """A column's human label (metrics by their label; other columns as they are)."""
    return _REGISTRY[name].label if name in _REGISTRY else name


def fingerprint() -> dict[str, Any]:
    """What of the schema changes computed scores: the metrics and their compute code.

    Part of every score cache key, so registering a metric (or editing its function) never
    returns summaries without it.
    """
    out: dict[str, Any] = {"p_method": P_METHOD, "structured_samples": STRUCTURED_SAMPLES,
                           "structured_max_rank_factor": STRUCTURED_MAX_RANK_FACTOR}
    for m in metrics():
        fns = [f for f in (m.target, m.per_layer, m.summarize, m.derive) if f is not None]
        if fns:  # measured metrics are keyed by their own cache entries
            out[m.name] = [m.kind, list(m.axes), *(_source_hash(f) for f in fns)]
    return out


def _source_hash(fn: Callable[..., Any] | None) -> str:
    # The function's own source (a label or a docstring edit elsewhere in the schema does not
    # invalidate every cached score); its callees are covered by the scoring code's key.
    try:
        text = inspect.getsource(fn)  # type: ignore[arg-type]
    except (OSError, TypeError):
        text = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
