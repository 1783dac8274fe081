"""Bases and scores of every hypothesis per diff, cached; claims with Benjamini–Hochberg across the run."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ws_harness import __version__, guard, retention, schema
from ws_harness.cache import code_version, worker_order
from ws_harness.hypothesis import (
    Acts,
    BaseWeights,
    CeilingContext,
    FitContext,
    Hypothesis,
    HypothesisError,
    broad_rank_for,
    check_bases,
    split_columns,
)
from ws_harness.linalg import pca_basis
from ws_harness.scores import benjamini_hochberg
from ws_harness.scoring import (
    DiffTargets,
    EnergyDraws,
    coupled_energy_tables,
    defined_layers_column,
    score_bases,
    structured_energy_table,
)

if TYPE_CHECKING:
    from ws_harness.diffs import Diff
    from ws_harness.session import HarnessSession

__all__ = ["Scoreboard", "MEASURE_TOP", "MEASURED_CEILINGS", "REFERENCE_DRAWS"]

# Measured retention costs two forwards per variant, so by default only these are measured.
MEASURE_TOP = 2  # write/mixed hypotheses per diff, by c_lin (3 did not fit the phase's budget)
MEASURED_CEILINGS = ("causal_oracle", "block_oracle", "w_oracle")
REFERENCE_DRAWS = 6  # Haar draws per diff for the random-subspace keep reference


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
        self._bases: dict[str, list[torch.Tensor | None]] = {}
        self._targets: dict[str, DiffTargets] = {}
        self._references: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._touched: dict[str, list[int]] = {}
        self._scores: dict[tuple[str, str], dict[str, Any]] = {}
        self._ceiling_contexts: dict[str, CeilingContext] = {}
        self._columns: dict[str, list[dict[str, float]]] = {}
        self._structured: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

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

    @cached_property
    def fit_inputs(self) -> list[str]:
        """Fingerprints (cache keys) of the captures a FitContext is made of."""
        s = self.session
        return [s.capture_key("fit", c, "mlp") for c in ("clean", "positive", "negative")] + [
            s.capture_key("fit", c, "tokens") for c in ("positive", "negative")]

    def _basis_parts(self, hyp: Hypothesis, seed: str | None) -> dict[str, Any]:
        # Keyed by the data the basis is built from (model, captures) as well as by its code.
        return self.session.cache_parts(
            hypothesis=hyp.name, scope=hyp.scope, code=code_version(hyp.build),
            k=self.session.config.rank, seed=seed, inputs=self.fit_inputs,
        )

    @cached_property
    def diff_names(self) -> list[str]:
        return [name for name, _ in self.session.config.diff_plan()]

    def seed_of(self, diff_name: str) -> int | None:
        return dict(self.session.config.diff_plan()).get(diff_name)

    def run_inputs(self) -> dict[str, Any]:
        """What the run used, exactly enough to reproduce or re-score it elsewhere (inputs.json)."""
        from ws_harness.merge import record_settings

        session, cfg = self.session, self.session.config
        behaviour = session.behaviour
        diffs = []
        for name in self.diff_names:
            diff = self.diff(name)
            diffs.append({
                "name": name, "seed": self.seed_of(name), "fingerprint": diff.sha256,
                "source": str(getattr(diff, "source", "")),
                "touched_layers": self.touched(name),
                "keys": sorted(diff.w),
                "causal": self._causal_summary(name),
            })
        return {
            "ws_harness_version": __version__,
            "model": {"spec": cfg.model, "fingerprint": session.identity.fingerprint,
                      "source": session.identity.source},
            "diff": {"mode": ("build" if cfg.builds_diffs else
                              "adapters" if cfg.adapter_diffs else "files"),
                     "adapter_family": cfg.adapter if cfg.builds_diffs else None,
                     "diffs": diffs},
            # Where forwards ran (device type, dtype): both change digits, so merge checks it.
            "forward": {"device": session.placement.torch_device.type,
                        "dtype": session.placement.dtype},
            "rank": cfg.rank, "broad_rank": broad_rank_for(session.shape.d_model),
            "n_layers": session.shape.n_layers, "d_model": session.shape.d_model,
            "behaviour": {"name": behaviour.name, "source": behaviour.source,
                          "fingerprint": behaviour.fingerprint(),
                          "personas": behaviour.personas,
                          "answer_tokens": behaviour.answer_tokens},
            "prompts": {split: behaviour.probes(split) for split in ("fit", "eval")},
            "rendered_prompts": {split: session.probes(split).texts for split in ("fit", "eval")},
            "hypotheses": sorted(self.hypotheses),
            "settings": record_settings(self),  # what decides the numbers (merge checks it)
            # The BH family: this run's hypotheses plus the catalog's uncollected ones.
            "bh_family": sorted({*self.hypotheses, *self.catalog} - set(self.errors)),
        }

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
        n_layers, d = self.session.shape.n_layers, self.session.shape.d_model

        def build() -> dict[str, torch.Tensor]:
            ctx = self.fit if diff_name is None else self.ceiling_context(diff_name)
            before = guard.versions(ctx)
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
                finally:
                    self._check_unedited(hyp, before)
            raw, columns = split_columns(hyp, raw, n_layers)
            checked = check_bases(hyp, raw, n_layers, d)
            limit = self.session.config.rank * hyp.rank_factor
            too_wide = [l for l, b in enumerate(checked) if b is not None and b.shape[1] > limit]
            if too_wide:
                raise HypothesisError(
                    f"hypothesis {hyp.name!r}: basis rank {checked[too_wide[0]].shape[1]} at "
                    f"layer {too_wide[0]} exceeds {limit} (k={self.session.config.rank} × "
                    f"rank_factor={hyp.rank_factor}); return at most {limit} directions"
                )
            extra = {f"column:{name}:layer{l}": torch.tensor(v, dtype=torch.float64)
                     for l, cols in enumerate(columns) for name, v in cols.items()}
            if hyp.scope == "global":
                return {"global": checked[0], **extra}
            return {f"layer{l}": b for l, b in enumerate(checked) if b is not None} | extra

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
        columns: list[dict[str, float]] = [{} for _ in range(n_layers)]
        for key, value in stored.items():
            if key.startswith("column:"):
                _, name, layer = key.split(":")
                columns[int(layer.removeprefix("layer"))][name] = float(value)
        self._bases[memo] = bases
        self._columns[memo] = columns
        return bases

    def columns(self, hyp: Hypothesis, diff_name: str | None = None) -> list[dict[str, float]]:
        """The per-layer columns the builder reported with its bases (split_columns)."""
        self.bases(hyp, diff_name)
        return self._columns[hyp.name if diff_name is None else f"{hyp.name}@{diff_name}"]

    def _check_unedited(self, hyp: Hypothesis, before: dict[str, Any]) -> None:
        """Refuse a builder that edited its context in place; later builders get a fresh one."""
        changed = guard.edited(before)
        if not changed:
            return
        # What the builder saw is corrupt in memory (the cache on disk is not): drop every
        # in-memory copy so the next hypothesis reads clean data again.
        self.__dict__.pop("fit", None)
        self._ceiling_contexts.clear()
        self._targets.clear()
        self._references = None
        self.session.forget_loaded()
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise HypothesisError(
            f"hypothesis {hyp.name!r} ({hyp.file or hyp.module}): its builder modified {shown} "
            "in place; builders must not change what other hypotheses see. Work on a copy "
            "(X = X - X.mean(0), not X -= X.mean(0); or X = X.clone())"
        )

    def ceiling_context(self, diff_name: str) -> CeilingContext:
        """The CeilingContext of one diff (one per diff and process, like the FitContext)."""
        if diff_name not in self._ceiling_contexts:
            diff = self.diff(diff_name)
            labels = self.session.labels(diff)
            self._ceiling_contexts[diff_name] = CeilingContext(
                self.fit, labels["eval"], labels["fit"], self.deltas(diff),
                causal=self.causal_matrices(diff_name, "write"))
        return self._ceiling_contexts[diff_name]

    def causal_matrices(self, diff_name: str, side: str) -> list[torch.Tensor | None]:
        """The attribution matrices C_l of one diff (SPEC §4.1), per layer (None: untouched)."""
        stored = self.session.attribution(self.diff(diff_name))
        return [stored.get(f"{side}{l}") for l in range(self.session.shape.n_layers)]

    # ---- scores ------------------------------------------------------------------------
    def deltas(self, diff: Diff) -> dict[tuple[int, str], torch.Tensor]:
        """{(layer, role): ΔW} for every parameter of the seven roles the diff touches."""
        shape = self.session.shape
        out = {}
        for name, delta in diff.w.items():
            parsed = shape.parse_param_name(name)
            if parsed is not None:
                out[parsed] = delta.float()
        return out

    def touched(self, diff_name: str) -> list[int]:
        """Layers where the diff changes a weight of the seven roles."""
        if diff_name not in self._touched:
            deltas = self.deltas(self.diff(diff_name))
            self._touched[diff_name] = sorted(
                {layer for (layer, _), m in deltas.items() if bool(m.any())})
        return list(self._touched[diff_name])

    def targets(self, diff_name: str) -> DiffTargets:
        """What scores need of one diff; built on first use (reads base weights: the model)."""
        if diff_name not in self._targets:
            diff = self.diff(diff_name)
            deltas = self.deltas(diff)
            touched = self.touched(diff_name)
            write_weights, clean_pcs = self._base_references
            self._targets[diff_name] = DiffTargets.build(
                self.session.labels(diff)["eval"], deltas, touched,
                write_weights=write_weights, clean_pcs=clean_pcs,
                causal=self.causal_matrices(diff_name, "write"),
                causal_read=self.causal_matrices(diff_name, "read"),
                structured_draws=lambda layer, scope: self.structured_draws(
                    diff_name, layer, scope),
            )
        return self._targets[diff_name]

    @property
    def _base_references(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """[W_o | W_down] and the top-k clean FIT PCs per layer: from the base model, so one
        copy serves every diff (each diff's targets held its own: 146 MB each at 135M)."""
        if self._references is None:
            arch, k = self.session.arch, self.session.config.rank
            clean = self.session.capture("fit", "clean", "mlp")["resid"]
            self._references = ([arch.layer(l).write for l in range(arch.n_layers)],
                                [pca_basis(clean[l], k) for l in range(arch.n_layers)])
        return self._references

    def structured_draws(self, diff_name: str, layer: int, scope: str) -> EnergyDraws | None:
        """The structured null of one layer (SPEC §4), one cache entry per diff and scope.

        Seeds: layer l draws with seed l for per-layer bases (independent layers) and every
        layer with seed 0 for global bases (one shared random subspace, as the §4 global null).
        """
        key = (diff_name, scope)
        if key not in self._structured:
            diff = self.diff(diff_name)
            k_max = self.session.config.rank * schema.STRUCTURED_MAX_RANK_FACTOR

            def build() -> dict[str, torch.Tensor]:
                targets = self.targets(diff_name)
                layers = [l for l in targets.touched if targets.w_combined[l] is not None]
                with self.session.timed("structured_null"):
                    if scope == "per_layer":
                        return {f"layer{l}": structured_energy_table(
                            targets.w_combined[l], targets.write_weights[l].double(), k_max,
                            schema.STRUCTURED_SAMPLES, l) for l in layers}
                    tables = coupled_energy_tables(
                        [targets.w_combined[l] for l in layers],
                        [targets.write_weights[l] for l in layers], k_max,
                        schema.STRUCTURED_SAMPLES, 0)
                    return {f"layer{l}": t for l, t in zip(layers, tables, strict=True)}

            self._structured[key] = self.session.cache.get_or_build_tensors(
                "structured_null", self.session.cache_parts(
                    diff=diff.sha256, scope=scope, k_max=k_max, n=schema.STRUCTURED_SAMPLES),
                build, producer=structured_energy_table)
        table = self._structured[key].get(f"layer{layer}")
        return None if table is None else EnergyDraws(table, self.session.shape.d_model)

    def identity(self, hyp: Hypothesis, diff_name: str) -> dict[str, Any]:
        """The identity columns (schema.ID_COLUMNS) of a hypothesis's rows on one diff."""
        return {"diff": diff_name, "seed": self.seed_of(diff_name), "hypothesis": hyp.name,
                "family": hyp.family, "axis_kind": hyp.axis}

    def scores(self, hyp: Hypothesis, diff_name: str) -> dict[str, Any]:
        """{'rows': per-layer dicts, 'summary': dict} for one hypothesis and one diff (cached).

        The cache holds the scoring core's numbers; the identity columns are added here, so
        renaming a diff file does not invalidate its scores.
        """
        key = (hyp.name, diff_name)
        if key not in self._scores:
            diff = self.diff(diff_name)
            parts = self._basis_parts(hyp, diff.sha256)
            parts["diff"] = diff.sha256
            parts["axis"] = hyp.axis
            parts["metrics"] = schema.fingerprint()

            def build() -> dict[str, Any]:
                which = diff_name if hyp.is_ceiling else None
                bases = self.bases(hyp, which)
                with self.session.timed("scores"):
                    core = score_bases(bases, self.targets(diff_name), hyp.axis, hyp.scope)
                for row, columns in zip(core["rows"], self.columns(hyp, which), strict=True):
                    row.update(columns)  # the builder's own per-layer columns
                return core

            core = self.session.cache.get_or_build_json(
                "scores", parts, build, producer=score_bases
            )
            ids = self.identity(hyp, diff_name)
            self._scores[key] = {
                "rows": [{**ids, **row} for row in core["rows"]],
                "summary": {**ids, "scope": hyp.scope, **core["summary"]},
            }
        return self._scores[key]

    def all_scores(self, family: bool = False) -> dict[tuple[str, str], dict[str, Any]]:
        """Scores of every registered, buildable hypothesis for every diff (with `family`: also
        of the catalog's hypotheses this run did not collect, for the BH family)."""
        pool = {**self.catalog, **self.hypotheses} if family else self.hypotheses
        # Diff by diff: a worker holds one diff's targets at a time (≈ 0.3 GB each at 135M).
        jobs = [(n, d) for d in self.diff_names for n in sorted(pool)]
        out = {}
        previous = None
        for name, diff_name in worker_order(jobs):
            if previous is not None and diff_name != previous:
                self._targets.pop(previous, None)  # rebuilt (from cached parts) if needed again
            previous = diff_name
            if name in self.errors:
                continue
            try:
                out[(name, diff_name)] = self.scores(pool[name], diff_name)
            except HypothesisError:
                continue
        return dict(sorted(out.items()))

    @cached_property
    def catalog(self) -> dict[str, Hypothesis]:
        """The hypotheses of the catalog folders (those of the collected files) that this run
        did not collect: a run of one file is judged in the same BH family as the full sweep."""
        from ws_harness.hypothesis import catalog_hypotheses

        folders = sorted({Path(h.file).parent for h in self.hypotheses.values() if h.file})
        known = {h.file for h in self.hypotheses.values()}
        found, problems = catalog_hypotheses(folders, skip=known)
        for name, message in problems.items():
            self.errors.setdefault(name, message)
        return {n: h for n, h in found.items() if n not in self.hypotheses}

    @cached_property
    def claims(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """(hypothesis, diff name, claim) → value, z, raw p, BH-adjusted p, holds.

        BH runs over every claim of every non-ceiling hypothesis of the catalog (SPEC §6):
        the collected ones and those of `catalog`, so selecting files does not change a
        verdict. Only the collected hypotheses' claims are returned. The rule (which claims,
        ALPHA, holds) is schema's.
        """
        entries = []
        family = {**self.catalog, **self.hypotheses}
        for (name, diff_name), result in self.all_scores(family=True).items():
            s = result["summary"]
            for claim in family[name].claims():
                m = schema.metric(claim)
                entries.append((name, diff_name, claim, s[claim], s[m.p], s[m.z],
                                s.get(defined_layers_column(claim))))
        adjusted = benjamini_hochberg([e[4] for e in entries]) if entries else []
        out = {}
        for (name, diff_name, claim, value, p, z, n_layers), p_adj in zip(entries, adjusted):
            if name not in self.hypotheses:
                continue  # in the family, not in this run
            out[(name, diff_name, claim)] = {
                "value": value, "z": z, "p": p, "p_adj": float(p_adj), "n_layers": n_layers,
                "holds": schema.holds(value, float(p_adj)),
            }
        return out

    # ---- measured retention (SPEC §4.1) ---------------------------------------------------
    def _effects(self, kind: str, parts: dict[str, Any],
                 variants: Callable[[], dict[str, dict]]) -> dict[str, list[float]]:
        """Per-prompt steering effects of named write variants on EVAL prompts, cached as JSON."""
        session = self.session

        def build() -> dict[str, list[float]]:
            with session.timed("retention"):
                got = retention.steering_effects(session.forward_model, session.forward_arch,
                                                 session.probes("eval"), session.answer_ids,
                                                 variants())
            return {name: [float(x) for x in v] for name, v in got.items()}

        return session.cache.get_or_build_json(kind, parts, build,
                                               producer=retention.steering_effects)

    def write_reference(self, diff_name: str) -> dict[str, Any]:
        """The diff's measured references: S(w), S(w_W) and keep of random subspaces at rank k.

        {"full", "write": per-prompt effects; "random": one c_keep per Haar draw;
         "s_w", "s_write", "write_share" = S(w_W)/S(w); "s_linear", "quadrature_error"}.
        """
        diff = self.diff(diff_name)
        deltas = retention.write_part(self.deltas(diff))
        touched = self.touched(diff_name)
        ranks = [self.session.config.rank if l in touched else 0
                 for l in range(self.session.shape.n_layers)]

        def variants() -> dict[str, dict]:
            draws = retention.random_reference(deltas, ranks, REFERENCE_DRAWS, seed=0)
            return {"write": deltas, **{f"random{j}": v for j, v in enumerate(draws)}}

        effects = self._effects("retention_reference", self.session.cache_parts(
            diff=diff.sha256, ranks=ranks, draws=REFERENCE_DRAWS), variants)
        curve = self.session.steering(diff)
        plus, minus = curve.per_prompt[curve.alphas.index(1.0)], curve.per_prompt[
            curve.alphas.index(-1.0)]
        full = [a - b for a, b in zip(plus, minus, strict=True)]
        write = torch.tensor(effects["write"], dtype=torch.float64)
        random = [float(torch.tensor(effects[f"random{j}"]).mean() / write.mean())
                  for j in range(REFERENCE_DRAWS)]
        attribution = self.session.attribution(diff)
        s_w = float(torch.tensor(full, dtype=torch.float64).mean())
        s_linear = float(attribution["s_linear"])
        return {"full": full, "write": effects["write"], "random": random, "s_w": s_w,
                "s_write": float(write.mean()), "write_share": float(write.mean()) / s_w,
                "s_linear": s_linear, "s_measured": float(attribution["s_measured"]),
                "quadrature_error": abs(s_linear - float(attribution["s_measured"]))}

    def _causal_summary(self, diff_name: str) -> dict[str, Any]:
        """Per-diff causal figures for inputs.json and the report (no per-prompt vectors)."""
        if self.session.config.measure == "none":
            attribution = self.session.attribution(self.diff(diff_name))
            return {"s_linear": float(attribution["s_linear"]),
                    "s_measured": float(attribution["s_measured"])}
        ref = self.write_reference(diff_name)
        return {k: v for k, v in ref.items() if k not in ("full", "write")} | {
            "measured": self.measured_selection(diff_name)}

    def measured_summaries(self) -> dict[tuple[str, str], dict[str, float]]:
        """(hypothesis, diff) → measured retention columns, for this run's selection."""
        jobs = [(n, d) for d in self.diff_names for n in self.measured_selection(d)]
        return {job: self.measured(*job) for job in worker_order(sorted(jobs))}

    def measured_selection(self, diff_name: str) -> list[str]:
        """Which hypotheses get measured keep/drop retention on this diff (config `measure`)."""
        mode = self.session.config.measure
        if mode == "none":
            return []
        scored = {name: result["summary"] for (name, d), result in self.all_scores().items()
                  if d == diff_name}
        ceilings = [n for n in scored if self.hypotheses[n].is_ceiling
                    and n in MEASURED_CEILINGS]
        ranked = sorted((n for n, s in scored.items()
                         if self.hypotheses[n].axis in ("write", "mixed")
                         and not math.isnan(s.get("c_lin", math.nan))),
                        key=lambda n: (-scored[n]["c_lin"], n))
        return sorted(ceilings + (ranked if mode == "all" else ranked[:MEASURE_TOP]))

    def measured(self, name: str, diff_name: str) -> dict[str, float]:
        """Measured c_keep, c_drop (bootstrap CIs), norm-matched keep and the random percentile."""
        hyp = self.hypotheses[name]
        diff = self.diff(diff_name)
        bases = self.bases(hyp, diff_name if hyp.is_ceiling else None)
        deltas = retention.write_part(self.deltas(diff))
        ref = self.write_reference(diff_name)

        def variants() -> dict[str, dict]:
            keep = retention.project_writes(deltas, bases, "keep")
            return {"keep": keep, "drop": retention.project_writes(deltas, bases, "drop"),
                    "keep_norm": retention.norm_matched(keep, deltas)}

        parts = self._basis_parts(hyp, diff.sha256)
        parts["diff"] = diff.sha256
        effects = self._effects("retention", parts, variants)
        write = torch.tensor(ref["write"], dtype=torch.float64)
        out: dict[str, float] = {}
        for col, key in (("c_keep", "keep"), ("c_drop", "drop")):
            point, lo, hi = retention.retention_ratio(torch.tensor(effects[key]), write)
            out.update({col: point, f"{col}_lo": lo, f"{col}_hi": hi})
        out["c_keep_norm"] = float(torch.tensor(effects["keep_norm"]).mean() / write.mean())
        out["keep_percentile"] = retention.percentile(out["c_keep"], ref["random"])
        return out
