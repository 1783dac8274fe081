"""Rankings across seeds (SPEC §6): medians, IQRs, primary rank and ranks beside it, τ, stability."""

from __future__ import annotations

import math

import polars as pl
import pytest

from ws_harness.ranking import aggregate, kendall_taus, per_seed, stable_rank_range, summary_lines
from ws_harness.results import RunResults


def fake_results(scores: dict[str, tuple[str, list[tuple[float, float]]]]) -> RunResults:
    """{name: (axis, [(R_act, R_w_combined) per seed])} → RunResults with seeds s0, s1, …"""
    summaries = []
    for name, (axis, per_seed_scores) in scores.items():
        for i, (r_act, r_w) in enumerate(per_seed_scores):
            summaries.append({
                "diff": f"s{i}", "seed": i, "hypothesis": name, "family": f"fam:{axis}", "axis_kind": axis,
                "scope": "per_layer", "rank": 4.0, "n_layers": 2, "r_act": r_act, "z_act": 1.0,
                "p_act": 0.1, "r_w_combined": r_w, "z_w_combined": 1.0, "p_w_combined": 0.1,
                "r_w_oproj": math.nan, "r_w_downproj": r_w, "pct_oracle_act": 0.1,
                "pct_oracle_w_combined": 0.1, "overlap_w": 0.1, "r_act_ci_lo": r_act * 0.95,
                "r_act_ci_hi": r_act * 1.05, "joint": math.sqrt(r_act * r_w),
                # The primary key is R_causal (read: R_causal_read); here it orders as joint
                # (R_act for read), so the ranking rule is tested on known orders.
                "r_causal": math.sqrt(r_act * r_w), "r_causal_read": r_act,
                "act_w_gap_log2": math.log2(r_act / r_w),
            })
    return RunResults(summaries=summaries, inputs={"rank": 4})


SCORES = {
    # write/mixed: joint decides, not R_act alone
    "lead": ("mixed", [(8.0, 2.0), (9.0, 2.0), (10.0, 2.0)]),       # joint 4, 4.24, 4.47
    "act_only": ("write", [(16.0, 0.5), (12.0, 0.5), (18.0, 0.5)]),  # joint 2.83, 2.45, 3
    "middle": ("mixed", [(2.0, 2.0), (3.0, 3.0), (1.0, 1.0)]),       # joint 2, 3, 1
    "last": ("write", [(0.5, 0.5), (0.6, 0.6), (0.4, 0.4)]),
    # read: ranked apart, by R_act only
    "reader_a": ("read", [(2.0, 9.0), (2.2, 9.0), (1.8, 9.0)]),
    "reader_b": ("read", [(3.0, 0.1), (3.3, 0.1), (2.7, 0.1)]),
    # a ceiling: shown, never ranked
    "oracle": ("ceiling", [(30.0, 60.0)] * 3),
}


def test_ranks_by_joint_with_read_apart_and_ceilings_unranked() -> None:
    table = aggregate(fake_results(SCORES))
    rows = {r["hypothesis"]: r for r in table.iter_rows(named=True)}
    assert table["hypothesis"].to_list() == [
        "lead", "act_only", "middle", "last", "reader_b", "reader_a", "oracle"]
    assert [rows[h]["table"] for h in ("lead", "reader_a", "oracle")] == [
        "write/mixed", "read", "ceiling"]
    assert rows["lead"]["rank_median"] == 1 and rows["act_only"]["rank_median"] == 2
    # read-side: reader_b leads on R_act although reader_a has the (meaningless) higher R_w
    assert rows["reader_b"]["rank_median"] == 1 and rows["reader_a"]["rank_median"] == 2
    assert rows["oracle"]["rank_median"] is None and rows["oracle"]["stable"] is None
    assert rows["oracle"]["r_w_combined_median"] == 60.0


def test_medians_and_iqrs_over_seeds() -> None:
    rows = {r["hypothesis"]: r for r in aggregate(fake_results(SCORES)).iter_rows(named=True)}
    lead = rows["lead"]
    assert lead["r_act_median"] == pytest.approx(9.0)
    assert lead["r_act_iqr"] == pytest.approx(1.0)  # linear quantiles of 8, 9, 10: 8.5 … 9.5
    assert lead["joint_median"] == pytest.approx(math.sqrt(18))
    assert lead["n_seeds"] == 3
    # middle's joint ranks per seed: s0 3rd, s1 2nd (3 > act_only's 2.45), s2 3rd
    assert (rows["middle"]["rank_min"], rows["middle"]["rank_max"]) == (2, 3)
    assert rows["middle"]["rank_median"] == 3
    assert rows["middle"]["rank_iqr"] == pytest.approx(0.5)


def test_per_seed_ranks_restart_in_each_table_and_seed() -> None:
    frame = per_seed(fake_results(SCORES))
    s1 = frame.filter(pl.col("diff") == "s1")
    ranks = dict(zip(s1["hypothesis"], s1["rank"], strict=True))
    assert ranks["lead"] == 1 and ranks["middle"] == 2 and ranks["act_only"] == 3
    assert ranks["reader_b"] == 1 and ranks["oracle"] is None


def test_kendall_tau_between_seed_rankings() -> None:
    taus = kendall_taus(fake_results(SCORES))
    wm = {(r["diff_a"], r["diff_b"]): r["tau"]
          for r in taus.filter(pl.col("table") == "write/mixed").iter_rows(named=True)}
    # s0 order: lead, act_only, middle, last; s1 swaps act_only/middle: one discordant pair of 6
    assert wm[("s0", "s1")] == pytest.approx(4 / 6)
    assert wm[("s0", "s2")] == pytest.approx(1.0)
    read = taus.filter(pl.col("table") == "read")
    assert read["tau"].to_list() == pytest.approx([1.0, 1.0, 1.0])
    assert set(taus["table"]) == {"write/mixed", "read"}  # ceilings are not ranked


def test_stability_flag_uses_the_rank_range() -> None:
    assert [stable_rank_range(n) for n in (1, 4, 10, 11, 30, 34)] == [1, 1, 1, 2, 3, 4]
    scores = dict(SCORES)
    # jumps from first to last among 4: range 3 > 1
    scores["jumpy"] = ("mixed", [(100.0, 100.0), (0.1, 0.1), (0.1, 0.1)])
    rows = {r["hypothesis"]: r for r in aggregate(fake_results(scores)).iter_rows(named=True)}
    assert rows["jumpy"]["stable"] is False  # ranks 1, 5, 5
    assert (rows["lead"]["rank_min"], rows["lead"]["rank_max"]) == (1, 2)
    assert rows["lead"]["stable"] is True  # range 1 ≤ max(1, ceil(0.1 · 5))
    assert rows["middle"]["rank_range"] == 2 and rows["middle"]["stable"] is False  # 4, 2, 3


def test_one_seed_leaves_stability_undetermined() -> None:
    one = {name: (axis, values[:1]) for name, (axis, values) in SCORES.items()}
    table = aggregate(fake_results(one))
    assert table["stable"].is_null().all()
    assert kendall_taus(fake_results(one)).is_empty()


def test_summary_lines_show_both_tables_tau_and_stability() -> None:
    scores = dict(SCORES)
    scores["jumpy"] = ("mixed", [(100.0, 100.0), (0.1, 0.1), (0.1, 0.1)])
    results = fake_results(scores)
    results.errors["broken"] = "builder raised"
    text = "\n".join(summary_lines(results))
    assert "--- write/mixed (median over 3 seeds; rank by R_causal) ---" in text
    assert "--- read (median over 3 seeds; rank by R_causal_read) ---" in text
    assert "--- ceiling (median over 3 seeds; not ranked; shown for scale) ---" in text
    assert "Kendall τ between seed rankings: s0~s1" in text
    assert "unstable: " in text and "jumpy (1-5)" in text
    assert "1-5!" in text  # the unstable mark in the range column
    assert "EXCLUDED broken: builder raised" in text
    assert summary_lines(RunResults()) == ["no scores: no hypothesis was scored"]


def test_ranks_by_other_scores_are_reported_beside_the_primary_rank() -> None:
    scores = dict(SCORES)
    # R_causal disagrees with the geometry here: act_only leads causally, lead by joint.
    results = fake_results(scores)
    for row in results.summaries:
        if row["hypothesis"] == "act_only":
            row["r_causal"] = 100.0
    rows = {r["hypothesis"]: r for r in aggregate(results).iter_rows(named=True)}
    assert rows["act_only"]["rank_median"] == 1
    assert rows["lead"]["rank_joint_median"] == 1 and rows["act_only"]["rank_joint_median"] == 2
    assert rows["act_only"]["rank_r_act_median"] == 1  # the highest R_act on every seed
    assert rows["reader_b"]["rank_r_act_median"] == 1 and rows["oracle"]["rank_joint_median"] is None
