"""Search quality: SPT's layer pick against the exhaustive oracle and against baselines.

On MiniLM-L6 (6 candidate layers) every K-subset can be trained. For each task this
script trains the oracle (all K-subsets, K = 2 and 3, trained and scored exactly like a
retrained sparse model) and reports side by side, in one run:

* the SPT pick's rank among all subsets (by test score), its gap to the oracle's best,
  and SPT's compute (search steps and wall time) as a fraction of the oracle's;
* SPT against ``first``, ``all``, ``middle``, ``random``, ``optuna`` and the PEFT methods
  at (as near as they allow) equal trainable parameters, mean +- std over seeds.

Targets (DESIGN.md §5): SPT's pick in the oracle's top 15%, within 0.5 points of its best,
at <= 15% of its compute, and ahead of first / all / middle / random.

    python benchmarks/quality.py                      # SST-2 and RTE, 3 seeds (about 2 h on 2 CPU cores)
    python benchmarks/quality.py --quick              # smoke run, a few minutes

Results are cached per (task, seed, strategy) under --out, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from analysis.comparison import aggregate, markdown_table  # noqa: E402
from search.config import load_config  # noqa: E402
from search.pipeline import build_sparse, prepare, train_and_evaluate  # noqa: E402
from search.strategies import STRATEGIES, Context, score_subset  # noqa: E402

TASKS = {
    # SST-2 sentence level: 300 training sentences (seeded sample), 300 dev, the full 1821 test.
    "sst2": ("configs/minilm/sst2.yaml", ["task.max_train=300", "task.max_dev=300", "model.max_length=64"]),
    # RTE (glue_pretrain split): 200 training pairs, the 249 dev pairs, the 277 GLUE dev pairs as test.
    "rte": ("configs/minilm/rte.yaml", ["task.max_train=200", "model.max_length=96"]),
}
COMMON = ["search.epochs=3", "retrain.epochs=3", "search.checkpoint_every=1000", "compare.optuna_trials=10",
          "compare.trial_epochs=1", "compare.random_draws=3", "runtime.progress=false"]
QUICK = ["task.max_train=24", "task.max_dev=16", "task.max_test=32", "search.epochs=1", "retrain.epochs=1",
         "compare.optuna_trials=3", "compare.random_draws=1", "runtime.progress=false"]
BASELINES = ["spt", "first", "all", "middle", "random", "optuna", "peft-prompt", "peft-prefix", "peft-ptuning", "peft-lora"]


def cached(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=1))
    return value


def strategy_rows(prep, name: str, k: int, workdir: Path) -> list[dict]:
    """Train the strategy's result(s) like a retrained model; one row per result."""
    strategy = STRATEGIES[name]
    ctx = Context(k=k, workdir=workdir)
    metric = prep.config.task.metric
    rows = []
    if strategy.produces_mask:
        for proposal in strategy.propose(prep, ctx):
            result = train_and_evaluate(prep, build_sparse(prep, proposal.mask.selected_layers), prep.config.retrain, progress=False)
            rows.append({"strategy": name, "seed": prep.config.seed, "draw": proposal.label,
                         "layers": proposal.mask.selected_layers, "scores": proposal.mask.scores,
                         "dev": result.dev[metric], "test": result.test[metric], "trainable_params": result.trainable_params,
                         "search_steps": proposal.compute.steps, "search_seconds": proposal.compute.seconds,
                         "train_steps": result.steps, "train_seconds": result.seconds, "note": ""})
    else:
        model = strategy.build_model(prep, ctx)
        result = train_and_evaluate(prep, model, strategy.train_settings(prep), progress=False)
        head = sum(p.numel() for p in model.head.parameters())
        rows.append({"strategy": name, "seed": prep.config.seed, "draw": "", "layers": "-", "scores": None,
                     "dev": result.dev[metric], "test": result.test[metric], "trainable_params": result.trainable_params,
                     "search_steps": 0, "search_seconds": 0.0, "train_steps": result.steps, "train_seconds": result.seconds,
                     "note": f"{result.trainable_params - head:,} method params"})
    return rows


def oracle(prep, k: int, cache: Path) -> list[dict]:
    """Every K-subset trained with the retraining settings, scored on dev and test."""
    import itertools

    ctx = Context(k=k, workdir=cache, score_test=True)
    candidates = prep.config.prompt.candidates(prep.backbone.num_layers)
    task, seed = prep.config.task.name, prep.config.seed
    # A strategy's K-subset trained at this seed is the very same training: reuse it.
    known = {}
    for row_file in cache.glob(f"{task}-s{seed}-*.json"):
        for row in json.loads(row_file.read_text()):
            if row["layers"] != "-" and len(row["layers"]) == k:
                known[tuple(row["layers"])] = row
    trials = []
    for subset in itertools.combinations(candidates, k):
        path = cache / f"oracle-{task}-s{seed}-{'-'.join(map(str, subset))}.json"
        if not path.is_file() and subset in known:
            row = known[subset]
            path.write_text(json.dumps({"layers": list(subset), "dev": row["dev"], "test": row["test"], "steps": row["train_steps"],
                                        "seconds": row["train_seconds"], "copied": True}, indent=1))
        # trial_epochs = retrain.epochs: the oracle trains each subset exactly as retraining would.
        trials.append(cached(path, lambda s=subset: score_subset(dataclasses.replace(prep, config=_full_trials(prep.config)), list(s), ctx)))
    return trials


def _full_trials(config):
    return dataclasses.replace(config, compare=dataclasses.replace(config.compare, trial_epochs=config.retrain.epochs))


def _seconds(cached_value) -> float:
    """Seconds spent on one cache entry (a strategy's rows or one oracle trial)."""
    rows = cached_value if isinstance(cached_value, list) else [cached_value]
    return sum(r.get("seconds", 0.0) + r.get("search_seconds", 0.0) + r.get("train_seconds", 0.0) for r in rows)


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):  # average ranks of ties
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for m in range(i, j + 1):
                r[order[m]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def rank_of(subset: list[int], trials: list[dict]) -> tuple[int, dict]:
    ordered = sorted(trials, key=lambda t: (-t["test"], -t["dev"], t["layers"]))
    position = next(i for i, t in enumerate(ordered) if t["layers"] == subset)
    return position + 1, ordered[0]


VARIANTS = {
    "default": [],
    "10 search epochs": ["search.epochs=10"],
    "arch_lr 0.2": ["search.arch_lr=0.2"],
    "D1 70%": ["search.d1_fraction=0.7"],
    "no consistency loss": ["search.consistency_weight=0"],
    "plain DARTS gates": ["prompt.reparam_gates=false"],
    "gates averaged over last 10 logs": ["select.average_last=10"],
}


def investigate(task: str, extra: list[str], seed: int, ks: list[int], cache: Path, variants: list[str]) -> list[str]:
    """Where the picks of SPT searches with other settings land in the (cached) oracle."""
    from search.pipeline import run_search, select_from_run
    from search.runs import RunDir

    lines = [f"## {task}: search settings vs the oracle (seed {seed})", "",
             "| variant | gates (layer:alpha) | " + " | ".join(f"K={k} pick, rank / test" for k in ks) + " | search s |",
             "|---|---|" + "---|" * len(ks) + "---|"]
    for name in variants:
        overrides = VARIANTS[name]
        prep = prepare(load_config(REPO / TASKS[task][0], [*extra, *overrides, f"seed={seed}"]))
        folder = f"spt-seed{seed}" if not overrides else f"variant-{name.replace(' ', '_')}"  # default: the benchmark's own search
        run = RunDir(cache / "work" / task / folder)
        run.path.mkdir(parents=True, exist_ok=True)
        if not run.done("search"):
            run_search(prep, run, progress=False)
        seconds = run.status()["search"]["seconds"]
        cells = []
        for k in ks:
            trials = oracle(prep, k, cache)
            mask = select_from_run(run, prep.config, k=k, backbone=prep.backbone)
            rank, _ = rank_of(mask.selected_layers, trials)
            mine = next(t for t in trials if t["layers"] == mask.selected_layers)
            cells.append(f"{mask.selected_layers}: {rank}/{len(trials)}, {100 * mine['test']:.1f}")
        gates = ", ".join(f"{c}:{a:.2f}" for c, a in zip(mask.candidate_layers, mask.scores))
        lines.append(f"| {name} | {gates} | " + " | ".join(cells) + f" | {seconds:.0f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--oracle-seed", type=int, default=42)
    parser.add_argument("--ks", nargs="*", type=int, default=[2, 3], help="oracle K values; none skips the oracle")
    parser.add_argument("--k", type=int, default=3, help="K of the baseline comparison")
    parser.add_argument("--strategies", nargs="+", default=BASELINES)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, one epoch, one seed, K=2 oracle, 4 strategies")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (e.g. 1 to run two tasks side by side)")
    parser.add_argument("--investigate", action="store_true",
                        help="also run SPT searches with other settings and place their picks in the oracle")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="search settings that --investigate tries")
    args = parser.parse_args()
    if args.investigate and not args.ks:
        parser.error("--investigate places picks in the oracle: give --ks (e.g. --ks 2 3)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.ks = [args.oracle_seed], [2]
        args.strategies = [s for s in args.strategies if s in ("spt", "first", "random", "peft-lora")]
        args.out = args.out.rstrip("/") + "-quick"
    out = Path(args.out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = [f"# Search quality on MiniLM-L6\n\nCommand: `python benchmarks/quality.py {shlex.join(sys.argv[1:])}`\n"]
    for task in args.tasks:
        path, overrides = TASKS[task]
        extra = overrides + COMMON + (QUICK if args.quick else [])
        rows = []
        for seed in args.seeds:
            prep = prepare(load_config(REPO / path, [*extra, f"seed={seed}", f"select.k={args.k}"]))
            for name in args.strategies:
                rows += cached(cache / f"{task}-s{seed}-{name}.json", lambda n=name, p=prep, w=cache / "work" / task: strategy_rows(p, n, args.k, w))
        metric = prep.config.task.metric
        # ---- the oracle, at one seed, and where SPT's picks for each K land in it
        prep = prepare(load_config(REPO / path, [*extra, f"seed={args.oracle_seed}", f"select.k={args.k}"]))
        spt = cached(cache / f"{task}-s{args.oracle_seed}-spt.json", lambda p=prep, w=cache / "work" / task: strategy_rows(p, "spt", args.k, w))[0]
        scores, candidates = spt["scores"], prep.config.prompt.candidates(prep.backbone.num_layers)
        lines = [f"## {task}: SPT pick vs the exhaustive oracle (seed {args.oracle_seed})", "",
                 f"SPT gates (layer:alpha): {', '.join(f'{c}:{s:.3f}' for c, s in zip(candidates, scores))}", "",
                 f"| K | subsets | SPT pick | rank | top % | SPT test {metric} | oracle best | best test | gap (points) | SPT compute / oracle (time) | (steps) |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"] if args.ks else []
        for k in args.ks:
            trials = oracle(prep, k, cache)
            pick = sorted(sorted(candidates, key=lambda c: (-scores[candidates.index(c)], c))[:k])
            rank, best = rank_of(pick, trials)
            mine = next(t for t in trials if t["layers"] == pick)
            oracle_seconds = sum(t["seconds"] for t in trials)
            oracle_steps = sum(t["steps"] for t in trials)
            lines.append(
                f"| {k} | {len(trials)} | {pick} | {rank} | {100 * rank / len(trials):.0f}% | {100 * mine['test']:.1f} | "
                f"{best['layers']} | {100 * best['test']:.1f} | {100 * (best['test'] - mine['test']):.1f} | "
                f"{100 * spt['search_seconds'] / oracle_seconds:.1f}% | {100 * spt['search_steps'] / oracle_steps:.1f}% |"
            )
            ordered = sorted(trials, key=lambda t: -t["test"])
            # Diagnostic: do the gates rank layers like the oracle does? A layer's oracle
            # value is the mean test score of the subsets that contain it.
            marginal = [statistics.fmean(t["test"] for t in trials if c in t["layers"]) for c in candidates]
            lines.append("")
            lines.append(f"K={k}: Spearman correlation between SPT gates and the layers' mean oracle test score: "
                         f"{spearman(scores, marginal):+.2f} (oracle layer means: "
                         + ", ".join(f"{c}:{100 * m:.1f}" for c, m in zip(candidates, marginal)) + ")")
            lines.append("")
            lines.append(f"K={k} subsets by test {metric}: " + ", ".join(
                f"{t['layers']} {100 * t['test']:.1f}" for t in ordered))
            lines.append("")
        # ---- baselines at equal K / parameters, mean over seeds
        summary = aggregate([{**r, "layers": str(r["layers"])} for r in rows])
        lines += ["", f"## {task}: strategies at K={args.k}, mean ± std over seeds {args.seeds}", "",
                  markdown_table(summary, metric)]
        spt_test = next(s["test"] for s in summary if s["strategy"] == "spt")
        diffs = [f"{s['strategy']} {100 * (spt_test - s['test']):+.1f}" for s in summary if s["strategy"] != "spt"]
        lines += ["", f"SPT's mean test {metric} minus each strategy's (points): {', '.join(diffs)}."]
        if args.investigate:
            lines += [""] + investigate(task, extra, args.oracle_seed, args.ks, cache, args.variants)
        report.append("\n".join(lines))
        print("\n".join(lines), flush=True)
    # Oracle entries copied from a strategy's identical training are not counted twice.
    values = (json.loads(f.read_text()) for f in cache.glob("*.json"))
    compute = sum(_seconds(v) for v in values if isinstance(v, list) or not v.get("copied"))
    report.append(f"\nWall time of this invocation: {(time.time() - started) / 60:.1f} min. Training and search time behind "
                  f"all cached results under {cache.name}/ (one process each): {compute / 3600:.1f} h.")
    name = "quality.md" if args.tasks == list(TASKS) else f"quality-{'-'.join(args.tasks)}.md"
    (out / name).write_text("\n\n".join(report) + "\n")
    print(f"\nwrote {out / name}")


if __name__ == "__main__":
    main()
