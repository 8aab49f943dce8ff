"""``spt front``: one search, then the sparse model of its pick for every K retrained: the
accuracy-against-size front of SPT from a single search (``front.csv``, ``front.md``,
``front.png``). An interrupted front resumes from its ``front.csv``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from spt.errors import UserError
from spt.files import write_text_atomic

from .comparison import Chart
from .config import RunConfig
from .pipeline import build_sparse, prepare, run_search, select_from_run, train_and_evaluate
from .runs import RunDir, create_run_dir, open_run_dir

logger = logging.getLogger("spt")
COLUMNS = ["k", "layers", "method", "trainable_params", "dev", "test", "train_seconds"]


def run_front(config: RunConfig, out: str | Path | None, ks: list[int] | None = None, force: bool = False,
              progress: bool = True) -> tuple[RunDir, str, Chart]:
    """Search once (or reuse the finished search in ``out``), retrain the pick for each K; returns
    the run, its table and the picture to draw (``front.png``)."""
    run = open_run_dir(out, config, ["search", "front"], force=force, create=False)
    prep = prepare(config)
    candidates = config.prompt.candidates(prep.backbone.num_layers)
    ks = ks or list(range(1, len(candidates) + 1))
    bad = [k for k in ks if not 1 <= k <= len(candidates)]
    if bad:
        raise UserError("--ks", f"K must be in 1..{len(candidates)} (the candidate layers), got {bad}")
    create_run_dir(run, config)
    if not run.done("search"):
        run_search(prep, run, progress=progress)
    rows = _read(run.file("front.csv"))
    metric = config.task.metric
    for k in ks:
        if any(int(r["k"]) == k for r in rows):
            continue
        mask = select_from_run(run, prep, k=k, progress=progress)
        logger.info("front: K=%d, layers %s", k, mask.selected_layers)
        result = train_and_evaluate(prep, build_sparse(prep, mask.selected_layers), config.retrain, progress=progress, desc=f"K={k}")
        rows.append({"k": k, "layers": " ".join(map(str, mask.selected_layers)), "method": mask.method,
                     "trainable_params": result.trainable_params, "dev": round(result.dev[metric], 6),
                     "test": round(result.test[metric], 6), "train_seconds": round(result.seconds, 1)})
        rows.sort(key=lambda r: int(r["k"]))
        write_text_atomic(run.file("front.csv"), _csv(rows))
    table = "\n".join(["| K | layers | trainable params | dev | test |", "|---|---|---|---|---|"] + [
        f"| {r['k']} | {r['layers']} | {int(r['trainable_params']):,} | {100 * float(r['dev']):.1f} | {100 * float(r['test']):.1f} |"
        for r in rows])
    title = f"{config.task.name} on {config.model.backbone}: SPT's picks for each K from one search ({metric})"
    write_text_atomic(run.file("front.md"), f"# {title}\n\n![front](front.png)\n\n{table}\n")
    run.mark("front", ks=ks)
    return run, table, Chart("fronts", {"spt": rows}, metric, run.file("front.png"), title)


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [dict(zip(COLUMNS, line.split(","))) for line in lines[1:] if line]


def _csv(rows: list[dict[str, Any]]) -> str:
    return "".join(",".join(str(r[c]) for c in COLUMNS) + "\n" for r in [dict(zip(COLUMNS, COLUMNS)), *rows])
