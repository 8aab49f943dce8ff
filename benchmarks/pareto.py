"""Accuracy against size on MiniLM-L6: the exhaustive front against SPT's front from a single
search and against a multi-objective TPE study given the same compute as SPT.

* exhaustive: all 63 non-empty layer subsets, each trained with the task's retraining
  recipe (``quality.py``'s results store: its K=3 oracle is reused); the front of the best
  test score per size - the most any selection could reach;
* SPT: one search (``quality.py``'s search entry for ``--variant``), its ranking by
  ``--method`` cut at K = 1..6, each pick retrained (the same trainings, looked up);
* TPE: Optuna's multi-objective TPE over layer subsets (maximise dev, minimise parameters),
  each trial one training (looked up in the store, its training time counted), stopped
  once it has spent SPT's compute (the search plus its six retrainings); per size, the
  subset with the best dev score.

Fronts are scored by their hypervolume (test score above the majority class, times the
parameter range below a reference 5% above the largest model), as a fraction of the
exhaustive front's, per seed and on average.

    python benchmarks/pareto.py run --tasks sst2-16shot --shard 0/2 --threads 1 &   # the exhaustive trainings
    python benchmarks/pareto.py report --tasks sst2-16shot                          # -> results/pareto/pareto.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import benchmarks.quality as quality  # noqa: E402
from search.selection import rank_layers  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "pareto"


def subsets_of(store: quality.Store, task: str, seed: int) -> dict[str, dict]:
    config = quality.task_config(task, seed, [])
    rows = {}
    for job in quality.jobs_for(task, seed, ["oracle", "exhaustive"]):
        row = store.get(job.key(config))
        if row is not None:
            rows[job.name] = row
    return rows


def hypervolume(points: list[tuple[float, float]], floor: float, ceiling_params: float) -> float:
    """Area dominated by ``(params, score)`` points (fewer params and a higher score are better)
    above ``floor`` and below ``ceiling_params``."""
    area, best = 0.0, floor
    for params, score in sorted(points):
        if score > best and params < ceiling_params:
            area += (ceiling_params - params) * (score - best)
            best = score
    return area


def best_per_size(rows: dict[str, dict], by: str) -> list[tuple[float, float]]:
    sizes: dict[int, dict] = {}
    for name, row in rows.items():
        k = len(name.split("-"))
        if k not in sizes or row[by] > sizes[k][by]:
            sizes[k] = row
    return [(row["trainable_params"], row["test"]) for row in sizes.values()]


def tpe_rows(rows: dict[str, dict], budget: float, seed: int) -> dict[str, dict]:
    """The subsets a multi-objective TPE study trains before it has spent ``budget`` seconds."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.TPESampler(seed=seed))
    trained: dict[str, dict] = {}
    spent = 0.0
    while spent < budget and len(trained) < len(rows):
        trial = study.ask()
        weights = [trial.suggest_float(f"layer_{i}", 0.0, 1.0) for i in range(6)]
        chosen = [i for i, w in enumerate(weights) if w >= 0.5] or [max(range(6), key=weights.__getitem__)]
        name = "-".join(map(str, chosen))
        row = rows[name]
        if name not in trained:
            spent += row["seconds"]
            trained[name] = row
        study.tell(trial, [row["dev"], row["trainable_params"]])
    return trained


def seed_report(store: quality.Store, task: str, seed: int, variant: str, method: str) -> dict[str, float] | None:
    rows = subsets_of(store, task, seed)
    if len(rows) < 63:
        print(f"{task} seed {seed}: {len(rows)}/63 subsets trained; skipped")
        return None
    search = _search(store, task, seed, variant)
    if search is None or method not in search["rankings"]:
        print(f"{task} seed {seed}: no {variant} search; skipped")
        return None
    order = rank_layers(list(range(6)), search["rankings"][method]["scores"])
    picks = {k: "-".join(map(str, sorted(order[:k]))) for k in range(1, 7)}
    spt = [(rows[p]["trainable_params"], rows[p]["test"]) for p in picks.values()]
    spt_compute = search["seconds"] + sum(rows[p]["seconds"] for p in picks.values())
    exhaustive_compute = sum(r["seconds"] for r in rows.values())
    tpe = tpe_rows(rows, spt_compute, seed)
    floor = quality.majority_score(quality.task_config(task, seed, []))
    ceiling = 1.05 * max(r["trainable_params"] for r in rows.values())
    reference = hypervolume(best_per_size(rows, "test"), floor, ceiling)
    return {"spt": hypervolume(spt, floor, ceiling) / reference, "tpe": hypervolume(best_per_size(tpe, "dev"), floor, ceiling) / reference,
            "exhaustive by dev": hypervolume(best_per_size(rows, "dev"), floor, ceiling) / reference,
            "spt compute": spt_compute / exhaustive_compute, "tpe trained": len(tpe)}


BUDGET_VARIANTS = {1: "budget k=1", 2: "budget k=2", 3: "budget"}


def _search(store: quality.Store, task: str, seed: int, variant: str) -> dict | None:
    job = quality.Job(task, seed, "search", variant)
    return store.get(job.key(quality.job_config(job)))


def budget_ablation(store: quality.Store, task: str, seeds: list[int], variant: str, method: str) -> list[str]:
    """Per K: the top-K of a search held at K generators' parameters against the top-K of the
    unconstrained ``variant`` search, each pick scored by the exhaustive store (mean test over seeds)."""
    lines = []
    for k, budget_variant in BUDGET_VARIANTS.items():
        picks: dict[str, list[float]] = {"budget": [], "post-hoc": [], "best": [], "random": []}
        same = 0
        for seed in seeds:
            rows = subsets_of(store, task, seed)
            searches = [_search(store, task, seed, v) for v in (budget_variant, variant)]
            if len(rows) < 63 or any(s is None for s in searches):
                continue
            chosen = ["-".join(map(str, sorted(rank_layers(list(range(6)), s["rankings"][method]["scores"])[:k]))) for s in searches]
            same += chosen[0] == chosen[1]
            sized = [r["test"] for name, r in rows.items() if len(name.split("-")) == k]
            for name, value in (("budget", rows[chosen[0]]["test"]), ("post-hoc", rows[chosen[1]]["test"]),
                                ("best", max(sized)), ("random", statistics.fmean(sized))):
                picks[name].append(100 * value)
        if picks["budget"]:
            mean = {name: statistics.fmean(v) for name, v in picks.items()}
            lines.append(f"| {task} | {k} | {len(picks['budget'])} | {mean['budget']:.1f} | {mean['post-hoc']:.1f} | "
                         f"{same} of {len(picks['budget'])} | {mean['random']:.1f} | {mean['best']:.1f} |")
    return lines


def report(store: quality.Store, tasks: list[str], seeds: list[int], variant: str, method: str) -> str:
    lines = ["# Accuracy against size: SPT's single-search front, TPE and the exhaustive front (MiniLM-L6)", "",
             f"`python benchmarks/pareto.py report` (SPT: search variant `{variant}`, selection `{method}`). "
             "Hypervolume as a fraction of the exhaustive front's (best test per size); "
             "`exhaustive by dev`: the best-dev subset per size, what selecting by dev reaches.", "",
             "| task | seed | SPT | TPE (same compute) | exhaustive by dev | SPT compute / exhaustive | subsets TPE trained |",
             "|---|---|---|---|---|---|---|"]
    for task in tasks:
        found = [(seed, r) for seed in seeds if (r := seed_report(store, task, seed, variant, method)) is not None]
        for seed, r in found:
            lines.append(f"| {task} | {seed} | {r['spt']:.3f} | {r['tpe']:.3f} | {r['exhaustive by dev']:.3f} | "
                         f"{100 * r['spt compute']:.1f}% | {r['tpe trained']} |")
        if found:
            mean = {k: statistics.fmean(r[k] for _, r in found) for k in ("spt", "tpe", "exhaustive by dev", "spt compute")}
            lines.append(f"| {task} | mean | {mean['spt']:.3f} | {mean['tpe']:.3f} | {mean['exhaustive by dev']:.3f} | "
                         f"{100 * mean['spt compute']:.1f}% | |")
    ablation = [line for task in tasks for line in budget_ablation(store, task, seeds, variant, method)]
    if ablation:
        lines += ["", "## Budget-aware gates against picking K after the search", "",
                  f"Test score (mean over seeds) of the top-K by `{method}` from a search whose gates are held at K "
                  f"generators' parameters (`search.budget_params`), and from the unconstrained `{variant}` search; "
                  "`random`: the mean of all K-subsets; `best`: the best K-subset at each seed (by test).", "",
                  "| task | K | seeds | budget-aware search | post-hoc top-K | same pick | random | best |",
                  "|---|---|---|---|---|---|---|---|", *ablation]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "report"])
    parser.add_argument("--tasks", nargs="+", default=["sst2-16shot"])
    parser.add_argument("--seeds", nargs="+", type=int, default=quality.SEEDS)
    parser.add_argument("--variant", default="honest")
    parser.add_argument("--method", default="gates")
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quality-out", type=Path, default=quality.OUT, help="the quality benchmark's folder (its results.jsonl)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    store = quality.Store(args.quality_out / "results.jsonl")
    if args.action == "report":
        text = report(store, args.tasks, args.seeds, args.variant, args.method)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "pareto.md").write_text(text)
        print(text)
        return
    index, count = (int(x) for x in args.shard.split("/"))
    jobs = [job for task in args.tasks for seed in args.seeds
            for job in [*quality.jobs_for(task, seed, ["spt"], list(BUDGET_VARIANTS.values())),
                        *quality.jobs_for(task, seed, ["exhaustive"])]]
    for number, job in enumerate(jobs):
        if number % count == index:
            quality.run_job(job, store, False, args.quality_out / "work")


if __name__ == "__main__":
    main()
