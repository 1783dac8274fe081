"""Bases and scores of every hypothesis per diff, cached; claims with Benjamini–Hochberg across the run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ws_harness import __version__
from ws_harness.cache import code_version, worker_order
from ws_harness.hypothesis import Acts, BaseWeights, CeilingContext, FitContext, Hypothesis
from ws_harness.linalg import pca_basis, validate_basis
from ws_harness.scores import (
    Target,
    act_w_gap_log2,
    activation_target,
    benjamini_hochberg,
    bootstrap_mean_r_act_ci,
    combined_weight_target,
    diff_overlap,
    joint_score,
    pct_oracle,
    recovery,
    specificity,
    structured_recovery,
    summarize_layers,
    weight_target,
)

if TYPE_CHECKING:
    from ws_harness.diffs import Diff
    from ws_harness.session import HarnessSession

__all__ = [
    "ALPHA",
    "HypothesisError",
    "DiffTargets",
    "Scoreboard",
    "check_bases",
    "score_bases",
]

ALPHA = 0.01  # SPEC §6: one-sided p < 0.01 after BH
# Claims use the saddlepoint p-value: the moment-matched Beta of SPEC §4 rejects random bases
# 1.4–2.2× too often when one label direction dominates (invariants/test_null_invariants.py).
# The Beta p stays in the tables as p_*_beta.
P_METHOD = "saddlepoint"
STRUCTURED_SAMPLES = 128  # Monte Carlo draws per layer for the structured null
# DiffTargets field -> column suffix in the tables
SUFFIX = {"act": "act", "w_o": "w_oproj", "w_down": "w_downproj", "w_combined": "w_combined"}
ORTHONORMAL_TOL = 1e-4


class HypothesisError(ValueError):
    """A hypothesis's builder raised or returned something that is not a valid basis."""


def check_bases(hyp: Hypothesis, raw: Any, n_layers: int, d: int) -> list[torch.Tensor | None]:
    """Validate a builder's output into one float32 [d, r] basis (or None) per layer."""
    if hyp.scope == "global":
        per_layer = [raw] * n_layers
    elif isinstance(raw, (list, tuple)) and len(raw) == n_layers:
        per_layer = raw
    else:
        raise HypothesisError(
            f"hypothesis {hyp.name!r}: a per-layer builder must give one basis per layer "
            f"({n_layers}), got {type(raw).__name__}"
        )
    out: list[torch.Tensor | None] = []
    for layer, basis in enumerate(per_layer):
        where = f"hypothesis {hyp.name!r}" + ("" if hyp.scope == "global" else f" layer {layer}")
        if basis is None:
            out.append(None)
            continue
        if not isinstance(basis, torch.Tensor):
            raise HypothesisError(f"{where}: builder returned {type(basis).__name__}, not a tensor")
        basis = basis.detach().to(torch.float32)
        try:
            validate_basis(basis, d, name=where, tol=ORTHONORMAL_TOL)
        except (ValueError, TypeError) as exc:
            raise HypothesisError(str(exc)) from None
        out.append(basis.contiguous())
    if all(b is None for b in out):
        raise HypothesisError(f"hypothesis {hyp.name!r}: builder returned no basis at any layer")
    return out


@dataclass
class DiffTargets:
    """One diff's targets per layer (SPEC §4): A_act from EVAL labels, A_T from ΔW_o, ΔW_down."""

    act: list[Target | None]
    w_o: list[Target | None]
    w_down: list[Target | None]
    w_combined: list[Target | None]
    labels: torch.Tensor  # [L, n_eval, d]
    touched: list[int]  # layers where the diff changes something
    # Base-model references for the secondary scores (A side, not the diff):
    write_weights: list[torch.Tensor] = field(default_factory=list)  # [W_o | W_down] per layer
    clean_pcs: list[torch.Tensor] = field(default_factory=list)  # top-k clean FIT PCs per layer

    @classmethod
    def build(
        cls, labels: torch.Tensor, deltas: dict[tuple[int, str], torch.Tensor],
        touched: Sequence[int], write_weights: Sequence[torch.Tensor] = (),
        clean_pcs: Sequence[torch.Tensor] = (),
    ) -> DiffTargets:
        n_layers = labels.shape[0]
        o = [deltas.get((l, "o")) for l in range(n_layers)]
        down = [deltas.get((l, "down")) for l in range(n_layers)]
        # Layers upstream of every touched parameter have an exactly zero label: no target there.
        return cls(
            act=[activation_target(labels[l]) if bool(labels[l].any()) else None
                 for l in range(n_layers)],
            w_o=[weight_target(m) for m in o],
            w_down=[weight_target(m) for m in down],
            w_combined=[combined_weight_target([a, b]) for a, b in zip(o, down)],
            labels=labels,
            touched=sorted(touched),
            write_weights=list(write_weights),
            clean_pcs=list(clean_pcs),
        )


def score_bases(
    hyp: Hypothesis, bases: Sequence[torch.Tensor | None], targets: DiffTargets, seed: str
) -> dict[str, Any]:
    """Per-layer rows and the layer-averaged summary of one hypothesis against one diff."""
    rows = []
    per_metric: dict[str, list] = {m: [] for m in ("act", "w_o", "w_down", "w_combined")}
    touched = set(targets.touched)
    for layer, B in enumerate(bases):
        row: dict[str, Any] = {
            "seed": seed, "hypothesis": hyp.name, "family": hyp.family, "axis_kind": hyp.axis,
            "layer": layer, "touched": layer in touched, "rank": 0 if B is None else B.shape[1],
        }
        for metric in per_metric:
            target = getattr(targets, metric)[layer]
            score = None if B is None else recovery(B, target, p_method=P_METHOD)
            if layer in touched and B is not None:
                per_metric[metric].append((score, target))
            suffix = SUFFIX[metric]
            row[f"r_{suffix}"] = math.nan if score is None else score.r
            row[f"z_{suffix}"] = math.nan if score is None else score.z
            row[f"p_{suffix}"] = math.nan if score is None else score.p
        for metric, suffix in SUFFIX.items():
            target = getattr(targets, metric)[layer]
            row[f"pct_oracle_{suffix}"] = math.nan if B is None else pct_oracle(B, target)
        row["overlap_w"] = math.nan if B is None else diff_overlap(B, targets.w_combined[layer])
        rows.append(row)

    kind = "global" if hyp.scope == "global" else "per_layer"
    summary: dict[str, Any] = {
        "seed": seed, "hypothesis": hyp.name, "family": hyp.family, "axis_kind": hyp.axis,
        "scope": hyp.scope,
        "rank": float(np.mean([r["rank"] for r in rows if r["touched"] and r["rank"] > 0] or [0])),
        "n_layers": len([b for l, b in enumerate(bases) if l in touched and b is not None]),
    }
    for metric, pairs in per_metric.items():
        suffix = SUFFIX[metric]
        if not pairs:
            summary.update({f"r_{suffix}": math.nan, f"z_{suffix}": math.nan,
                            f"p_{suffix}": math.nan, f"p_{suffix}_beta": math.nan})
            continue
        scores, tgts = zip(*pairs)
        # A global basis scored where some layers lack a target (e.g. o untouched) still has
        # one rank; summarize_layers excludes the undefined layers from both mean and null.
        s = summarize_layers(list(scores), list(tgts), kind, p_method=P_METHOD)
        beta = summarize_layers(list(scores), list(tgts), kind, p_method="beta")
        summary.update({f"r_{suffix}": s.mean_r, f"z_{suffix}": s.z, f"p_{suffix}": s.p,
                        f"p_{suffix}_beta": beta.p})
    used = [l for l in targets.touched if bases[l] is not None]
    for key in [f"pct_oracle_{s}" for s in SUFFIX.values()] + ["overlap_w"]:
        vals = [rows[l][key] for l in used if not math.isnan(rows[l][key])]
        summary[key] = float(np.mean(vals)) if vals else math.nan
    if used:
        lo, hi = bootstrap_mean_r_act_ci([bases[l] for l in used], [targets.labels[l] for l in used])
    else:
        lo = hi = math.nan
    summary["r_act_ci_lo"], summary["r_act_ci_hi"] = lo, hi
    summary.update(_secondary_scores(hyp, bases, targets, used))
    summary["joint"] = joint_score(summary["r_act"], summary["r_w_combined"])
    summary["act_w_gap_log2"] = act_w_gap_log2(summary["r_act"], summary["r_w_combined"])
    return {"rows": rows, "summary": summary}


def _secondary_scores(
    hyp: Hypothesis, bases: Sequence[torch.Tensor | None], targets: DiffTargets, used: list[int]
) -> dict[str, float]:
    """SPEC §4's structured null and specificity, layer means over `used` (write/mixed only).

    r_w_struct: E(B) on the combined weight target over its mean under random subspaces
    orth(W·G) shaped like the layer's base [W_o | W_down] (1 = no better than the weights' own
    span). r_act_specific: R_act after removing the top-k clean FIT PCs from labels and basis,
    scored in the complement with its own null.
    """
    out = {"r_w_struct": math.nan, "r_act_specific": math.nan}
    if hyp.axis not in ("write", "mixed") or not used:
        return out
    if targets.write_weights:
        values = [structured_recovery(bases[l], targets.w_combined[l], targets.write_weights[l],
                                      n_samples=STRUCTURED_SAMPLES, generator=l).r_struct
                  for l in used if targets.w_combined[l] is not None]
        out["r_w_struct"] = float(np.nanmean(values)) if values else math.nan
    if targets.clean_pcs:
        values = [specificity(bases[l], targets.labels[l], targets.clean_pcs[l]).r for l in used]
        values = [v for v in values if not math.isnan(v)]
        out["r_act_specific"] = float(np.mean(values)) if values else math.nan
    return out


class Scoreboard:
    """The run's hypotheses, their bases (once per run) and their scores per diff (once per diff).

    Everything expensive is a cache entry, so xdist workers share it; claim items call
    :meth:`claims`, which needs every hypothesis's summary for Benjamini–Hochberg and computes
    whatever is missing, starting at a worker-specific offset so workers split the work.
    """

    def __init__(self, session: HarnessSession) -> None:
        self.session = session
        self.hypotheses: dict[str, Hypothesis] = {}
        self.errors: dict[str, str] = {}
        self.ran = False  # set when a hypothesis item runs in this process
        self._bases: dict[str, list[torch.Tensor | None]] = {}
        self._targets: dict[str, DiffTargets] = {}
        self._scores: dict[tuple[str, str], dict[str, Any]] = {}

    def register(self, hyp: Hypothesis) -> None:
        if hyp.name in self.hypotheses and self.hypotheses[hyp.name].module != hyp.module:
            raise HypothesisError(
                f"two modules define hypothesis {hyp.name!r}: {self.hypotheses[hyp.name].module} "
                f"and {hyp.module}; rename one file"
            )
        self.hypotheses[hyp.name] = hyp

    # ---- bases -------------------------------------------------------------------------
    @cached_property
    def fit(self) -> FitContext:
        """The A side (SPEC §3): base-weight copies and FIT captures; nothing of any diff."""
        session = self.session
        acts = {}
        for condition in ("clean", "positive", "negative"):
            got = session.capture("fit", condition, "mlp")
            acts[condition] = Acts(got["resid"], got["up_in"], got["up_out"])
        # Plain tensors only: nothing in a FitContext leads back to the session, diffs or labels.
        tokens = {c: session.capture("fit", c, "tokens") for c in ("positive", "negative")}
        probes = session.probes("fit")
        first = int(probes.input_ids[0][probes.attention_mask[0].bool()][0])
        return FitContext(BaseWeights(session.arch), acts, session.config.rank, tokens, first,
                          session.answer_ids)

    def _basis_parts(self, hyp: Hypothesis, seed: str | None) -> dict[str, Any]:
        return self.session.cache_parts(
            hypothesis=hyp.name, scope=hyp.scope, code=code_version(hyp.build),
            k=self.session.config.rank, seed=seed,
        )

    @cached_property
    def diff_names(self) -> list[str]:
        return [name for name, _ in self.session.config.diff_plan()]

    def seed_of(self, diff_name: str) -> int | None:
        return dict(self.session.config.diff_plan()).get(diff_name)

    def run_inputs(self) -> dict[str, Any]:
        """What the run used, exactly enough to reproduce or re-score it elsewhere (inputs.json)."""
        session, cfg = self.session, self.session.config
        behaviour = session.behaviour
        diffs = []
        for name in self.diff_names:
            diff = self.diff(name)
            diffs.append({
                "name": name, "seed": self.seed_of(name), "fingerprint": diff.sha256,
                "source": str(getattr(diff, "source", "")),
                "touched_layers": self.targets(name).touched,
                "keys": sorted(diff.w),
            })
        return {
            "ws_harness_version": __version__,
            "model": {"spec": cfg.model, "fingerprint": session.loaded.fingerprint,
                      "source": session.loaded.source},
            "diff": {"mode": "build" if cfg.builds_diffs else "files", "diffs": diffs},
            "rank": cfg.rank, "broad_rank": self.fit_broad_rank,
            "n_layers": session.arch.n_layers, "d_model": session.arch.d_model,
            "behaviour": {"name": behaviour.name, "source": behaviour.source,
                          "fingerprint": behaviour.fingerprint(),
                          "personas": behaviour.personas,
                          "answer_tokens": behaviour.answer_tokens},
            "prompts": {split: behaviour.probes(split) for split in ("fit", "eval")},
            "rendered_prompts": {split: session.probes(split).texts for split in ("fit", "eval")},
            "hypotheses": sorted(self.hypotheses),
        }

    @property
    def fit_broad_rank(self) -> int:
        return min(64, self.session.arch.d_model // 2)

    def diff(self, name: str) -> Diff:
        """The run's diff called `name` (see HarnessConfig.diff_plan); loaded/built on first use."""
        diffs = dict(zip(self.diff_names, self.session.diffs()))
        if name not in diffs:
            raise ValueError(f"no diff named {name!r} in this run; diffs are {self.diff_names}")
        return diffs[name]

    def bases(self, hyp: Hypothesis, diff_name: str | None = None) -> list[torch.Tensor | None]:
        """Validated bases per layer; ceilings need the diff they are built from."""
        if hyp.is_ceiling and diff_name is None:
            raise ValueError(f"ceiling {hyp.name!r} is built per diff; pass the diff name")
        memo = hyp.name if diff_name is None else f"{hyp.name}@{diff_name}"
        diff = None if diff_name is None else self.diff(diff_name)
        if memo in self._bases:
            return self._bases[memo]
        if hyp.name in self.errors:
            raise HypothesisError(self.errors[hyp.name])
        n_layers, d = self.session.arch.n_layers, self.session.arch.d_model

        def build() -> dict[str, torch.Tensor]:
            ctx = self.fit if diff_name is None else self.ceiling_context(diff_name)
            with self.session.timed("bases"):
                try:
                    with torch.no_grad():
                        if hyp.scope == "global":
                            raw = hyp.build(ctx)
                        else:
                            raw = [hyp.build(ctx, layer) for layer in range(n_layers)]
                except HypothesisError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any builder failure is the hypothesis's
                    raise HypothesisError(
                        f"hypothesis {hyp.name!r}: builder raised {type(exc).__name__}: {exc}"
                    ) from exc
            checked = check_bases(hyp, raw, n_layers, d)
            if hyp.scope == "global":
                return {"global": checked[0]}
            return {f"layer{l}": b for l, b in enumerate(checked) if b is not None}

        try:
            stored = self.session.cache.get_or_build_tensors(
                "basis", self._basis_parts(hyp, None if diff is None else diff.sha256), build,
                producer=hyp.build,
            )
        except HypothesisError as exc:
            self.errors[hyp.name] = str(exc)
            raise
        if "global" in stored:
            bases = [stored["global"]] * n_layers
        else:
            bases = [stored.get(f"layer{l}") for l in range(n_layers)]
        self._bases[memo] = bases
        return bases

    def ceiling_context(self, diff_name: str) -> CeilingContext:
        diff = self.diff(diff_name)
        labels = self.session.labels(diff)
        return CeilingContext(self.fit, labels["eval"], labels["fit"], self.deltas(diff))

    # ---- scores ------------------------------------------------------------------------
    def deltas(self, diff: Diff) -> dict[tuple[int, str], torch.Tensor]:
        """{(layer, role): ΔW} for every parameter of the seven roles the diff touches."""
        arch = self.session.arch
        out = {}
        for name, delta in diff.w.items():
            parsed = arch.parse_param_name(name)
            if parsed is not None:
                out[parsed] = delta.float()
        return out

    def targets(self, diff_name: str) -> DiffTargets:
        if diff_name not in self._targets:
            diff = self.diff(diff_name)
            deltas = self.deltas(diff)
            touched = sorted({layer for (layer, _), m in deltas.items() if bool(m.any())})
            arch, k = self.session.arch, self.session.config.rank
            clean = self.session.capture("fit", "clean", "mlp")["resid"]
            self._targets[diff_name] = DiffTargets.build(
                self.session.labels(diff)["eval"], deltas, touched,
                write_weights=[arch.layer(l).write for l in range(arch.n_layers)],
                clean_pcs=[pca_basis(clean[l], k) for l in range(arch.n_layers)],
            )
        return self._targets[diff_name]

    def scores(self, hyp: Hypothesis, diff_name: str) -> dict[str, Any]:
        """{'rows': per-layer dicts, 'summary': dict} for one hypothesis and one diff (cached)."""
        key = (hyp.name, diff_name)
        if key not in self._scores:
            diff = self.diff(diff_name)
            parts = self._basis_parts(hyp, diff.sha256)
            parts["diff"] = diff.sha256

            def build() -> dict[str, Any]:
                bases = self.bases(hyp, diff_name if hyp.is_ceiling else None)
                with self.session.timed("scores"):
                    return score_bases(hyp, bases, self.targets(diff_name), diff_name)

            self._scores[key] = self.session.cache.get_or_build_json(
                "scores", parts, build, producer=score_bases
            )
        return self._scores[key]

    def all_scores(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Scores of every registered, buildable hypothesis for every diff."""
        jobs = [(n, d) for n in sorted(self.hypotheses) for d in self.diff_names]
        out = {}
        for name, diff_name in worker_order(jobs):
            if name in self.errors:
                continue
            try:
                out[(name, diff_name)] = self.scores(self.hypotheses[name], diff_name)
            except HypothesisError:
                continue
        return dict(sorted(out.items()))

    @cached_property
    def claims(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """(hypothesis, diff name, claim) → value, raw p, BH-adjusted p, holds, expected refuted.

        BH runs over every claim of every non-ceiling hypothesis in the run (SPEC §6).
        """
        entries = []
        for (name, diff_name), result in self.all_scores().items():
            hyp = self.hypotheses[name]
            for claim in hyp.claims():
                s = result["summary"]
                entries.append((name, diff_name, claim, s[claim], s[claim.replace("r_", "p_", 1)],
                                s[claim.replace("r_", "z_", 1)]))
        adjusted = benjamini_hochberg([e[4] for e in entries]) if entries else []
        out = {}
        for (name, diff_name, claim, value, p, z), p_adj in zip(entries, adjusted):
            holds = bool(value > 1.0 and p_adj < ALPHA)
            out[(name, diff_name, claim)] = {
                "value": value, "z": z, "p": p, "p_adj": float(p_adj), "holds": holds,
            }
        return out
