"""The quality benchmark's noise-resistant selectors and its leave-one-task-out judgement (issue 26):
each selector's equation on hand-made scores, and a held-out task never choosing its own recipe."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import benchmarks.quality as quality  # noqa: E402

SUBSETS = ["0-1-2", "0-1-3", "1-2-3", "3-4-5"]


def report(task: str, tests: dict[str, float], devs: dict[str, float] | None = None, picks: dict[str, str] | None = None) -> quality.TaskReport:
    """A one-seed report whose oracle holds ``SUBSETS``' test (and dev) scores; ``picks``: strategy -> subset."""
    r = quality.TaskReport(task, "accuracy", [13], 0.5, {s: {13: tests[s]} for s in SUBSETS}, {13: (400, 40.0)},
                           {s: {13: (devs or tests)[s]} for s in SUBSETS}, uniform=list(SUBSETS))
    r.strategies["random (expectation)"] = {13: sum(tests.values()) / len(tests)}
    r.strategies[quality.LAST] = {13: tests["3-4-5"]}
    for name, subset in (picks or {}).items():
        r.picks[name] = {13: {"layers": [int(x) for x in subset.split("-")], "scores": [0.0] * 6, "uncertain": False,
                              "steps": 10, "seconds": 2.0}}
        r.strategies[name] = {13: tests[subset]}
    return r


def test_a_dev_checked_pick_keeps_the_best_dev_score_among_the_searchs_top_subsets_and_pays_their_training():
    r = report("t", dict.fromkeys(SUBSETS, 0.6), devs={"0-1-2": 0.70, "0-1-3": 0.75, "1-2-3": 0.90, "3-4-5": 0.95})
    entry = {"layers": [0, 1, 2], "scores": [0.9, 0.8, 0.5, 0.6, 0.1, 0.0], "steps": 10, "seconds": 2.0}
    # top 2 by summed score: 0-1-2 (2.2), 0-1-3 (2.3) -> 0-1-3 first; 1-2-3 (1.9) is third, 3-4-5 (0.7) last
    two = quality.dev_checked(r, entry, 13, 2)
    assert two["layers"] == [0, 1, 3]
    assert (two["steps"], two["seconds"]) == (10 + 100, 2.0 + 10.0)  # one more training of the 4 (400 steps, 40 s)
    assert quality.dev_checked(r, entry, 13, 3)["layers"] == [1, 2, 3]
    tied = report("t", dict.fromkeys(SUBSETS, 0.6), devs=dict.fromkeys(SUBSETS, 0.8))
    assert quality.dev_checked(tied, entry, 13, 2)["layers"] == [0, 1, 3]  # a tie keeps the search's order
    assert quality.dev_checked(tied, entry, 13, 2)["uncertain"] is True


def test_perturbation_evidence_counts_by_its_reliability():
    gates = {"scores": [0.9, 0.8, 0.7, 0.3, 0.2, 0.1], "layers": [0, 1, 2]}
    strong = [-0.5, -0.4, -0.3, 0.3, 0.4, 0.5]  # says the opposite of the gates
    noisy = {"scores": strong, "spread": [10.0] * 6, "steps": 5, "seconds": 1.0}
    clean = {"scores": strong, "spread": [0.0] * 6, "steps": 5, "seconds": 1.0}
    assert quality.prior_plus_evidence(gates, noisy)["layers"] == [0, 1, 2]  # reliability ~0.002: the prior stands
    both = quality.prior_plus_evidence(gates, clean)  # reliability 1: z-scores summed
    z_gates, z_pert = quality._z(gates["scores"]), quality._z(strong)
    assert both["scores"] == [round(g + p, 6) for g, p in zip(z_gates, z_pert)]
    assert both["uncertain"] is False


def test_an_ensemble_rank_averages_and_is_uncertain_when_its_searches_disagree():
    a = {"layers": [0, 1, 2], "scores": [6, 5, 4, 3, 2, 1], "steps": 10, "seconds": 2.0}
    b = {"layers": [2, 3, 4], "scores": [1, 2, 6, 5, 4, 0], "steps": 12, "seconds": 3.0}
    out = quality.ensemble([a, b])
    assert out["scores"] == [4.0, 4.0, 5.0, 4.0, 3.0, 1.0]  # ranks 6..1 and 2, 3, 6, 5, 4, 1
    assert out["layers"] == [0, 1, 2]  # layer 2 (5), then 0, 1, 3 tie at 4: the lowest indices
    assert (out["steps"], out["seconds"], out["uncertain"]) == (22, 5.0, True)
    assert quality.ensemble([a, a])["uncertain"] is False


def test_leave_one_task_out_never_chooses_a_recipe_by_the_held_out_tasks_own_scores():
    tests = {"0-1-2": 0.50, "0-1-3": 0.60, "1-2-3": 0.70, "3-4-5": 0.80}
    # "spt: a" is best on t1 and t2; "spt: b" only on t3, by far (a mean over all tasks would prefer b)
    reports = [report("t1", tests, picks={"spt: a": "3-4-5", "spt: b": "0-1-2"}),
               report("t2", tests, picks={"spt: a": "3-4-5", "spt: b": "0-1-2"}),
               report("t3", {**tests, "0-1-2": 2.0}, picks={"spt: a": "3-4-5", "spt: b": "0-1-2"})]
    chosen = quality.loto_choices(reports)
    assert chosen["t3"] == "spt: a"  # +0.15 on t1 and t2 (level with the last-3 rule's subset: ties go by name)
    assert chosen["t1"] == chosen["t2"] == "spt: b"  # b: -0.15 and +0.975 on t3; a: +0.15 and -0.225
    lines = quality.loto_section(reports, {r.task: {n: {} for n in r.strategies} for r in reports})
    assert lines[0] == "## Leave-one-task-out judgement"
    row = next(line for line in lines if line.startswith("| t3 |"))
    assert row.split(" | ")[2] == "-22.5"  # a's 3-4-5 (0.80) minus t3's random (1.025), in points


def test_successive_halving_prunes_by_optunas_rungs_and_pays_only_the_evaluations_it_ran():
    r = report("t", dict.fromkeys(SUBSETS, 0.6), devs={"0-1-3": 0.70, "0-1-2": 0.80, "1-2-3": 0.90, "3-4-5": 0.95})
    # the search's order: 0-1-3 (2.3), 0-1-2 (2.2), 1-2-3 (1.9), 3-4-5 (0.7); rungs after 1 and 3 evaluations
    r.oracle_curve = {"0-1-3": {13: [0.5, 0.6, 0.7]}, "0-1-2": {13: [0.6, 0.6, 0.8]},
                      "1-2-3": {13: [0.4, 0.9, 0.9]},  # below the best at rung 1 (of 3 values): pruned after one
                      "3-4-5": {13: [0.9, 0.5, 0.55]}}  # best at rung 1, last of three at rung 3: pruned there
    entry = {"layers": [0, 1, 3], "scores": [0.9, 0.8, 0.5, 0.6, 0.1, 0.0], "steps": 10, "seconds": 2.0}
    out = quality.successive_halving(r, entry, 13, m=4)
    assert out["layers"] == [0, 1, 2]  # the completed trials' dev-best scores: 0.7 and 0.8
    assert out["trained"] == round(10 / 3, 2)  # 3 + 3 + 1 + 3 evaluations of 3 each
    assert out["steps"] == 10 + 100 * (10 / 3 - 1)  # the kept subset's own run is the retraining
    assert out["uncertain"] is False
    assert quality.successive_halving(r, entry, 13, m=1)["layers"] == [0, 1, 3]  # alone, never pruned
