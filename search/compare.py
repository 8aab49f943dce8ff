"""``spt compare``: every strategy's result trained and scored the same way, over seeds.

Rows go to ``compare.csv`` as they finish, so an interrupted comparison resumes where it
stopped; ``compare.md`` (mean +- std per strategy) and ``compare.png`` are written at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from spt.errors import UserError
from spt.files import write_json_atomic, write_text_atomic

from .comparison import Chart, aggregate, markdown_table, read_rows_csv, write_rows_csv
from .config import RunConfig
from .pipeline import Prepared, prepare
from .runs import RunDir, create_run_dir, open_run_dir
from .selection import write_mask
from .strategies import Context, get_strategy, strategy_results

logger = logging.getLogger("spt")


def _for_seed(config: RunConfig, seed: int) -> RunConfig:
    return dataclasses.replace(config, seed=seed)


def run_compare(config: RunConfig, out: str | Path | None, force: bool = False,
                progress: bool = True) -> tuple[RunDir, str, Chart]:
    """Run ``config.compare.strategies`` for ``config.compare.seeds``; returns the run, its table and
    the picture to draw (``compare.png``)."""
    cfg = config.compare
    if config.select.k is None:
        raise UserError("select.k", "spt compare compares strategies at a fixed K; set select.k (not select.budget)")
    strategies = [get_strategy(name) for name in cfg.strategies]
    if not cfg.seeds:
        raise UserError("--seeds", "give at least one seed")
    run = open_run_dir(out, config, ["compare"], force=force, create=False, with_compare=True)
    first = prepare(_for_seed(config, cfg.seeds[0]))
    context = Context(k=config.select.k, workdir=run.path, progress=progress, run=run)
    for strategy in strategies:
        strategy.check(first, context)
    create_run_dir(run, config)
    masks = run.file("masks")
    masks.mkdir(exist_ok=True)
    csv_path = run.file("compare.csv")
    rows = read_rows_csv(csv_path) if csv_path.is_file() else []
    for seed in cfg.seeds:
        prep: Prepared = first if seed == cfg.seeds[0] else prepare(_for_seed(config, seed))
        for strategy in strategies:
            done = {r["draw"] for r in rows if r["strategy"] == strategy.name and int(r["seed"]) == seed}
            if set(strategy.labels(prep)) <= done:
                continue
            logger.info("compare: %s, seed %d", strategy.name, seed)

            def keep(proposal, name=strategy.name, seed=seed) -> None:
                suffix = f"-{proposal.label}" if proposal.label else ""
                write_mask(proposal.mask, masks / f"{name}-seed{seed}{suffix}.json", force=True)
                if proposal.details.get("trials"):
                    write_json_atomic(masks / f"{name}-seed{seed}.trials.json", proposal.details)

            for row in strategy_results(strategy, prep, context, done, on_proposal=keep):
                rows.append(row.to_dict())
                write_rows_csv(rows, csv_path)
    summary = aggregate(rows)
    table = markdown_table(summary, config.task.metric)
    title = f"{config.task.name} on {config.model.backbone}, K={config.select.k}, seeds {cfg.seeds}"
    write_text_atomic(run.file("compare.md"), f"# {title}\n\n![comparison](compare.png)\n\n{table}\n")
    run.mark("compare", strategies=cfg.strategies, seeds=cfg.seeds)
    return run, table, Chart("comparison", summary, config.task.metric, run.file("compare.png"), title)
