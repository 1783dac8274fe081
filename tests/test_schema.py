"""The metric schema: derived lists, validation, and a toy metric added in one entry, end to end."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ws_harness import schema
from ws_harness.hypothesis import CeilingContext
from ws_harness.scoreboard import Scoreboard
from ws_harness.session import HarnessSession

WriteProject = Callable[[pytest.Pytester, Path, list[Path]], Path]  # conftest fixture


# ---- derived views -------------------------------------------------------------------------


def test_claims_per_axis_and_derived_lists_come_from_the_schema() -> None:
    beyond = ("r_w_struct", "r_act_specific")  # SPEC §6 claim 4: beyond the isotropic null
    assert schema.claims_for("write") == ("r_causal", "r_act", "r_w_combined", *beyond)
    assert schema.claims_for("mixed") == ("r_causal", "r_act", "r_w_combined", *beyond)
    assert schema.claims_for("read") == ("r_causal_read", "r_act")
    assert schema.claims_for("ceiling") == ()
    assert schema.gate_scores() == ("r_causal", "r_causal_read", "joint", "r_act", "r_w_combined",
                                    *beyond)
    assert schema.rank_key("write/mixed") == "r_causal"
    assert schema.rank_key("read") == "r_causal_read"
    assert schema.rank_beside() == ("joint", "r_act", "r_w_combined", "r_act_specific")
    cols = schema.per_layer_columns()
    assert cols[:5] == list(schema.ID_COLUMNS)
    for m in schema.recovery_metrics():
        assert {m.name, m.z, m.p, m.pct_oracle} <= set(cols)
    assert [h for _, h in schema.terminal_columns()] == [
        "R_causal", "z_causal", "R_c_read", "keep", "joint", "R_act", "pct_act", "z_act", "R_w",
        "z_w"]
    assert schema.oracle_names() == ("r_causal", "r_causal_read", "r_act", "r_w_oproj",
                                      "r_w_downproj", "r_w_combined")
    causal = schema.metric("r_causal")
    assert causal.summary_columns() == ["r_causal", "c_lin", "z_causal", "p_causal",
                                        "pct_oracle_causal"]
    assert causal.scale == "linear" and schema.metric("r_act").scale == "log"
    assert schema.metric("c_keep").summary_columns() == ["c_keep", "c_keep_lo", "c_keep_hi"]


def test_claim_rule_and_classification() -> None:
    assert schema.holds(1.2, schema.ALPHA / 2) and not schema.holds(1.2, schema.ALPHA)
    assert not schema.holds(0.9, 1e-9)  # a significant deficit is not a held claim
    assert [schema.classify(h, r) for h, r in ((True, False), (False, True), (False, False),
                                               (True, True))] == [
        "held", "refuted", "surprise", "stale"]


def test_bad_metric_entries_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="needs target="):
        schema.Metric("r_x", "R_x", "recovery")
    with pytest.raises(ValueError, match="must start with 'r_'"):
        schema.Metric("x", "x", "recovery", target=lambda t, l: None)
    with pytest.raises(ValueError, match="only metrics with a p-value make claims"):
        schema.Metric("x", "x", "derived", derive=lambda s: 0.0, claim_axes=("write",))
    with pytest.raises(ValueError, match="unknown axis kinds"):
        schema.Metric("r_x", "R_x", "recovery", target=lambda t, l: None, axes=("sideways",))
    with pytest.raises(ValueError, match="already belong"):
        schema.register(schema.Metric("z_act", "clash", "layer", per_layer=lambda B, t, l: 0.0))
    with pytest.raises(ValueError, match="unknown metric 'r_nope'"):
        schema.metric("r_nope")


def test_ceiling_context_has_its_own_memo(tiny: HarnessSession) -> None:
    """A diff-derived memo entry must never reach later non-ceiling builders (and vice versa)."""
    fit = Scoreboard(tiny).fit
    n, d = tiny.arch.n_layers, tiny.arch.d_model
    zeros = torch.zeros(n, 2, d)
    ctx = CeilingContext(fit, zeros, zeros, {})
    fit_value = fit.memo(("probe",), lambda: "from fit")
    assert ctx.memo(("probe",), lambda: "from the diff") == "from the diff"
    assert fit.memo(("probe",), lambda: "rebuilt") == fit_value == "from fit"
    assert ctx.k == fit.k and ctx.clean is fit.clean and ctx.K == fit.K


# ---- a toy metric, one schema entry, through every output ------------------------------------

TOY_CONFTEST = '''
pytest_plugins = ["ws_harness.plugin"]

from ws_harness import schema

# The toy metric: R against the activation target again (so it must equal R_act), claimed for
# mixed-axis hypotheses, gated, shown in the terminal table and the heatmap.
schema.register(schema.Metric(
    "r_toy", "R_toy", "recovery", short="toy", target=lambda targets, layer: targets.act[layer],
    claim_axes=("mixed",), gate=True, terminal=("r",), heatmap=True,
))
'''

ANSWER = '''
"""answer_direction: the unembedding difference W_U[Yes] − W_U[No] (global, rank 1)."""
from ws_harness.hypothesis import global_basis
from ws_harness.linalg import orthonormalize


@global_basis(family="W:unembed", axis="mixed")
def basis(fit):
    yes, no = fit.answer_ids
    return orthonormalize((fit.unembedding[yes] - fit.unembedding[no])[:, None])
'''

WRITE = '''
"""first_write: the top left singular vector of [W_o | W_down] (write axis: no toy claim)."""
from ws_harness.hypothesis import per_layer
from ws_harness.linalg import left_basis


@per_layer(family="W:write", axis="write", refuted=["r_act", "r_w_combined"])
def basis(fit, layer):
    return left_basis(fit.weights(layer).write, 1)
'''


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_a_toy_metric_added_in_one_entry_reaches_every_output(
    pytester: pytest.Pytester, tiny: HarnessSession, tiny_diff_files: list[Path],
    write_tiny_project: WriteProject,
) -> None:
    folder = write_tiny_project(pytester, tiny.config.cache_dir, tiny_diff_files)
    (pytester.path / "conftest.py").write_text(TOY_CONFTEST)
    (folder / "test_answer_direction.py").write_text(ANSWER)
    (folder / "test_first_write.py").write_text(WRITE)

    # 1. Record the snapshot: the toy claim is an item, and it is in the terminal table.
    recorded = pytester.runpytest_subprocess("hypotheses", "-p", "no:cacheprovider", "-rA",
                                             "--ws-update-snapshots")
    recorded.stdout.fnmatch_lines_random([
        "PASSED hypotheses/test_answer_direction.py::answer_direction::r_toy[[]w0[]]",
        "*rank hypothesis*R_toy*",
        "*recorded ranking snapshot*",
    ])
    assert "first_write::r_toy" not in recorded.stdout.str()  # write axis makes no toy claim
    out = pytester.path / "out"
    rows = _csv(out / "per_layer.csv")
    assert {"r_toy", "z_toy", "p_toy", "pct_oracle_toy"} <= set(rows[0])
    for row in rows:  # the same target as R_act: the same numbers
        assert row["r_toy"] == row["r_act"] and row["p_toy"] == row["p_act"]
    summary = _csv(out / "summary.csv")
    assert {"r_toy", "z_toy", "p_toy", "p_toy_beta", "pct_oracle_toy"} <= set(summary[0])
    claims = [r for r in _csv(out / "claims.csv") if r["claim"] == "r_toy"]
    assert sorted((r["hypothesis"], r["diff"]) for r in claims) == [
        ("answer_direction", "w0"), ("answer_direction", "w1")]
    assert all(r["status"] == "held" for r in claims)
    assert "r_toy_median" in _csv(out / "ranking.csv")[0]
    conclusion = (out / "conclusion.md").read_text()
    assert "R_toy > 1: held on seeds" in conclusion
    snapshot = next((pytester.path / "snapshots").glob("ranking__*.json"))
    record = json.loads(snapshot.read_text())
    assert "r_toy" in record["rule"]["scores"]
    assert "r_toy_tol_log2" in record["hypotheses"]["answer_direction"]

    # 2. The gate checks the toy metric: move its recorded value and the gate names it.
    entry = record["hypotheses"]["answer_direction"]
    entry["r_toy"] = entry["r_toy"] * 8
    entry["r_toy_range"] = [v * 8 for v in entry["r_toy_range"]]
    snapshot.write_text(json.dumps(record))
    gated = pytester.runpytest_subprocess("hypotheses", "-p", "no:cacheprovider", "-k",
                                          "ws_ranking")
    gated.assert_outcomes(failed=1)
    gated.stdout.fnmatch_lines(["*answer_direction (write/mixed*", "*R_toy * → *"])


def test_registering_a_metric_extends_the_derived_lists() -> None:
    """Registering at runtime extends the derived lists; unregistering restores them."""
    before = schema.per_layer_columns()
    toy = schema.register(schema.Metric("toy_layer", "toy", "layer",
                                        per_layer=lambda B, t, l: float(l)))
    try:
        assert schema.per_layer_columns() == before + ["toy_layer"]
        assert "toy_layer" in schema.score_columns()
        assert schema.fingerprint()["toy_layer"][0] == "layer"
    finally:
        schema.unregister(toy.name)
    assert schema.per_layer_columns() == before
