"""``spt compare``: every strategy's result trained and scored the same way, over seeds.

Rows go to ``compare.csv`` as they finish, so an interrupted comparison resumes where it
stopped; ``compare.md`` (mean +- std per strategy) and ``compare.png`` are written at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from analysis.comparison import aggregate, markdown_table, plot_comparison, read_rows_csv, write_rows_csv
from spt.errors import UserError

from .config import RunConfig
from .pipeline import Prepared, build_sparse, prepare, train_and_evaluate
from .runs import RunDir, create_run_dir, open_run_dir
from .selection import write_mask
from .strategies import Compute, Context, get_strategy

logger = logging.getLogger("spt")


def _for_seed(config: RunConfig, seed: int) -> RunConfig:
    return dataclasses.replace(config, seed=seed)


def _row(strategy: str, seed: int, label: str, layers: Any, result, metric: str, compute, note: str = "") -> dict[str, Any]:
    return {
        "strategy": strategy, "seed": seed, "draw": label, "layers": layers,
        "dev": round(result.dev[metric], 6), "test": round(result.test[metric], 6),
        "trainable_params": result.trainable_params, "search_steps": compute.steps,
        "search_seconds": round(compute.seconds, 3), "train_steps": result.steps,
        "train_seconds": round(result.seconds, 3), "note": note,
    }


def run_compare(config: RunConfig, out: str | Path | None, force: bool = False, progress: bool = True) -> tuple[RunDir, str]:
    """Run ``config.compare.strategies`` for ``config.compare.seeds``; returns the run and its table."""
    cfg = config.compare
    if config.select.k is None:
        raise UserError("select.k: spt compare compares strategies at a fixed K; set select.k (not select.budget)")
    strategies = [get_strategy(name) for name in cfg.strategies]
    if not cfg.seeds:
        raise UserError("--seeds: give at least one seed")
    run = open_run_dir(out, config, ["compare"], force=force, create=False, with_compare=True)
    first = prepare(_for_seed(config, cfg.seeds[0]))
    context = Context(k=config.select.k, workdir=run.path, progress=progress)
    for strategy in strategies:
        strategy.check(first, context)
    create_run_dir(run, config)
    (run.path / "masks").mkdir(exist_ok=True)
    csv_path = run.file("compare.csv")
    rows = read_rows_csv(csv_path) if csv_path.is_file() else []
    done = {(r["strategy"], int(r["seed"]), r["draw"]) for r in rows}
    metric = config.task.metric
    for seed in cfg.seeds:
        prep: Prepared = first if seed == cfg.seeds[0] else prepare(_for_seed(config, seed))
        for strategy in strategies:
            if all((strategy.name, seed, label) in done for label in strategy.labels(prep)):
                continue
            logger.info("compare: %s, seed %d", strategy.name, seed)
            if strategy.produces_mask:
                for proposal in strategy.propose(prep, context):
                    if (strategy.name, seed, proposal.label) in done:
                        continue
                    suffix = f"-{proposal.label}" if proposal.label else ""
                    write_mask(proposal.mask, run.path / "masks" / f"{strategy.name}-seed{seed}{suffix}.json", force=True)
                    model = build_sparse(prep, proposal.mask.selected_layers)
                    result = train_and_evaluate(prep, model, config.retrain, progress=progress, desc=f"{strategy.name} s{seed}")
                    rows.append(_row(strategy.name, seed, proposal.label, proposal.mask.selected_layers, result, metric, proposal.compute))
                    if proposal.details.get("trials"):
                        (run.path / "masks" / f"{strategy.name}-seed{seed}.trials.json").write_text(json.dumps(proposal.details, indent=1))
                    write_rows_csv(rows, csv_path)
            else:
                model = strategy.build_model(prep, context)
                head = sum(p.numel() for p in model.head.parameters())
                note = f"{model.num_trainable_parameters() - head:,} method params"
                result = train_and_evaluate(prep, model, strategy.train_settings(prep), progress=progress, desc=f"{strategy.name} s{seed}")
                rows.append(_row(strategy.name, seed, "", "-", result, metric, Compute(), note))
                write_rows_csv(rows, csv_path)
    summary = aggregate(rows)
    table = markdown_table(summary, metric)
    title = f"{config.task.name} on {config.model.backbone}, K={config.select.k}, seeds {cfg.seeds}"
    run.file("compare.md").write_text(f"# {title}\n\n![comparison](compare.png)\n\n{table}\n")
    plot_comparison(summary, metric, run.file("compare.png"), title)
    run.mark("compare", strategies=cfg.strategies, seeds=cfg.seeds)
    return run, table
