"""The jobs users run: search, select, retrain, and all three in a row.

Each stage reads and writes the run directory described in DESIGN.md §3.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from spt.backbone import Backbone, load_backbone
from spt.errors import UserError
from spt.heads import build_head
from spt.model import PromptSupernet, SparsePromptModel
from spt.serialization import load_prompt_model, save_prompt_model

from . import distributed
from .batches import EncodedSplit, encode_split
from .checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from .config import RetrainConfig, RunConfig
from .data import TaskData, load_task
from .runs import RunDir
from .selection import (
    GATES_HEADER,
    LayerMask,
    choose_k,
    final_scores,
    generator_parameters,
    read_gate_history,
    select_layers,
)
from .trainer import OptimSettings, Trainer, TrainState, iterate_from, plain_schedule, search_schedule, steps_per_epoch

logger = logging.getLogger("spt")


# ---------------------------------------------------------------------- shared set-up


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"runtime.device: {name!r} asked for, but CUDA is not available here; use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"runtime.device: {name!r} is not a device; use auto, cpu or cuda[:N]") from None


@lru_cache(maxsize=2)
def cached_backbone(name: str, with_mlm_head: bool) -> Backbone:
    """Backbones are frozen, so jobs in one process (compare, hpo) can share them."""
    return load_backbone(name, with_mlm_head=with_mlm_head)


@dataclass
class Prepared:
    """Everything a stage needs that does not depend on the prompt weights."""

    config: RunConfig
    backbone: Backbone
    data: TaskData
    train: EncodedSplit
    dev: EncodedSplit
    test: EncodedSplit
    device: torch.device

    @property
    def positive_index(self) -> int | None:
        task = self.config.task
        return task.labels.index(task.positive_label) if task.positive_label is not None else None

    def evaluate(self, trainer: Trainer, split: EncodedSplit) -> dict[str, float]:
        return trainer.evaluate(split, self.config.search.eval_batch_size, self.config.task.metric, self.positive_index)


def prepare(config: RunConfig) -> Prepared:
    """Load the backbone and the task data, tokenized once for every stage."""
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    device = resolve_device(distributed.device_for(config.runtime.device))
    backbone = cached_backbone(config.model.backbone, config.head.type == "mlm")
    if config.runtime.compile:
        backbone.compile_layers()
    config.prompt.validate(backbone.num_layers, backbone.hidden_size)
    # Refuse an impossible selection now, not after a search has run.
    choose_k(
        len(config.prompt.candidates(backbone.num_layers)), config.select.k, config.select.budget,
        generator_parameters(backbone.hidden_size, config.prompt.bottleneck, config.prompt.phm_n),
    )
    data = load_task(config.task, config.seed)
    if len(data.train) < 2:
        raise UserError(f"task.train: {len(data.train)} example(s); the search needs at least 2 (D1 and D2)")
    tok, max_len, head = backbone.tokenizer, config.model.max_length, config.head
    return Prepared(
        config, backbone, data,
        encode_split(tok, data.train, max_len, head),
        encode_split(tok, data.dev, max_len, head),
        encode_split(tok, data.test, max_len, head),
        device,
    )


def build_supernet(prep: Prepared) -> PromptSupernet:
    config = prep.config
    torch.manual_seed(config.seed)  # the seed fixes generator, gate and head initialisation
    head = build_head(prep.backbone, config.head, prep.data.labels)
    return PromptSupernet(prep.backbone, config.prompt, head, config.head, prep.data.labels)


def build_sparse(prep: Prepared, layers: list[int]) -> SparsePromptModel:
    config = prep.config
    torch.manual_seed(config.seed)
    head = build_head(prep.backbone, config.head, prep.data.labels)
    return SparsePromptModel(prep.backbone, config.prompt, head, config.head, prep.data.labels, layers)


def _format_gates(alphas: torch.Tensor) -> str:
    return " ".join(f"{a:.2f}" for a in alphas.tolist())


def _ema(previous: float, value: float) -> float:
    """Smoothed loss for the progress bar (NaN values, from an empty shard, are skipped)."""
    if math.isnan(value):
        return previous
    return value if math.isnan(previous) else 0.9 * previous + 0.1 * value


def _progress(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True, leave=True)


# ---------------------------------------------------------------------- search


@dataclass
class SearchResult:
    alphas: list[float]
    steps: int
    seconds: float
    train_examples: int


class _GateLog:
    """``gates.csv``: one row per logged step and candidate layer, flushed as it goes."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None or not path.is_file():
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerow(GATES_HEADER)
        else:  # drop rows logged after the checkpoint: the resumed run logs them again
            with open(path, newline="") as handle:
                rows = [r for r in csv.reader(handle)][1:]
            kept = [r for r in rows if r and int(r[0]) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(GATES_HEADER)
                writer.writerows(kept)
            tmp.replace(path)

    def write(self, step: int, epoch: int, layers: list[int], alphas: torch.Tensor) -> None:
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            for layer, alpha in zip(layers, alphas.tolist()):
                writer.writerow([step, epoch, layer, f"{alpha:.6f}"])


def run_search(prep: Prepared, run: RunDir, progress: bool = True) -> SearchResult:
    """SPT-DARTS search; resumes from ``run``'s checkpoint when there is one."""
    config, s = prep.config, prep.config.search
    model = build_supernet(prep)
    settings = OptimSettings(
        lr=s.lr, weight_decay=s.weight_decay, grad_clip=s.grad_clip, arch_lr=s.arch_lr,
        arch_weight_decay=s.arch_weight_decay, consistency_weight=s.consistency_weight, mask_prob=s.mask_prob,
    )
    trainer = Trainer(model, settings, config.seed, prep.device, config.runtime.precision)
    ckpt_path = run.file(CHECKPOINT_FILE)
    state, elapsed = TrainState(), 0.0
    if ckpt_path.is_file():
        state, extra = load_checkpoint(ckpt_path, trainer)
        elapsed = float(extra.get("seconds", 0.0))
        logger.info("resuming the search from step %d (epoch %d) of %s", state.step, state.epoch, run.path)
    main = distributed.is_main()  # under torchrun only rank 0 writes
    gate_log = _GateLog(run.file("gates.csv"), state.step if ckpt_path.is_file() else None) if main else None
    layers = model.candidate_layers
    if state.step == 0 and main:
        gate_log.write(0, 0, layers, model.alphas())

    n_train = len(prep.train)
    per_search_epoch = steps_per_epoch(n_train, s.batch_size, s.d1_fraction)
    total = s.warmup_epochs * steps_per_epoch(n_train, s.batch_size) + (s.epochs - s.warmup_epochs) * per_search_epoch
    if s.max_steps is not None:
        total = min(total, s.max_steps)

    def schedule(epoch: int):
        return search_schedule(n_train, s.epochs, s.warmup_epochs, s.batch_size, s.d1_fraction, config.seed, epoch)

    logger.info(
        "search: %s on %s, %d candidate layers, %d train examples, %d steps",
        prep.backbone.name, config.task.name, len(layers), n_train, total,
    )
    started = time.perf_counter()
    bar = _progress(total, state.step, "search", progress and main)
    smooth = float("nan")
    for step in iterate_from(schedule, s.epochs, state):
        if state.step >= total:
            break
        stats = trainer.train_omega(prep.train, step.omega, state.step)
        if step.arch is not None:
            stats.update(trainer.train_arch(prep.train, step.arch, state.step))
        state.step += 1
        state.batch_in_epoch = step.index + 1
        epoch_done = step.last
        if epoch_done:
            state.epoch, state.batch_in_epoch = step.epoch + 1, 0
        alphas = model.alphas()
        if main and (state.step % s.log_every == 0 or epoch_done or state.step == total):
            gate_log.write(state.step, step.epoch, layers, alphas)
        if main and (state.step % s.checkpoint_every == 0 or epoch_done):
            save_checkpoint(ckpt_path, trainer, state, {"seconds": elapsed + time.perf_counter() - started})
        smooth = _ema(smooth, stats["loss"])
        bar.set_postfix_str(f"ep {step.epoch + 1}/{s.epochs} loss {smooth:.3f} α {_format_gates(alphas)}")
        bar.update(1)
    bar.close()
    seconds = elapsed + time.perf_counter() - started
    alphas = model.alphas().tolist()
    if main:
        save_prompt_model(model, run.file("supernet"))
        run.mark("search", steps=state.step, seconds=round(seconds, 3), alphas=[round(a, 6) for a in alphas])
        if ckpt_path.is_file():
            ckpt_path.unlink()  # the finished supernet replaces it
    distributed.barrier()
    logger.info("search done in %.1fs: gates %s", seconds, _format_gates(torch.tensor(alphas)))
    return SearchResult(alphas, state.step, seconds, n_train)


# ---------------------------------------------------------------------- selection


def select_from_run(
    run: RunDir, config: RunConfig, k: int | None = None, budget: int | None = None, backbone: Backbone | None = None
) -> LayerMask:
    """Rank the run's gates and build the mask for ``k`` or ``budget`` (default: the config's)."""
    if k is None and budget is None:
        k, budget = config.select.k, config.select.budget
    rows = read_gate_history(run.file("gates.csv"))
    model_config = json.loads(run.file("supernet/prompt_config.json").read_text()) if run.file("supernet/prompt_config.json").is_file() else None
    if model_config is not None:
        num_layers, hidden, candidates = model_config["num_layers"], model_config["hidden_size"], model_config["layers"]
        head_params = _head_params(model_config["head"]["type"], hidden, len(model_config["labels"]))
    else:  # a search still running: read the model facts from the backbone
        backbone = backbone or cached_backbone(config.model.backbone, config.head.type == "mlm")
        num_layers, hidden = backbone.num_layers, backbone.hidden_size
        candidates = config.prompt.candidates(num_layers)
        head_params = _head_params(config.head.type, hidden, len(config.task.labels))
    scores = final_scores(rows, candidates, config.select.average_last)
    return select_layers(
        backbone=config.model.backbone, num_layers=num_layers, candidates=candidates, scores=scores, k=k, budget=budget,
        per_generator=generator_parameters(hidden, config.prompt.bottleneck, config.prompt.phm_n),
        head_params=head_params, prompt_length=config.prompt.length, task=config.task.name, seed=config.seed,
    )


def _head_params(head_type: str, hidden: int, num_labels: int) -> int:
    return 0 if head_type == "mlm" else hidden * num_labels + num_labels


# ---------------------------------------------------------------------- retraining


@dataclass
class RetrainResult:
    dev: dict[str, float]
    test: dict[str, float]
    trainable_params: int
    seconds: float
    steps: int
    best_step: int


def train_and_evaluate(
    prep: Prepared,
    model: torch.nn.Module,
    settings: RetrainConfig,
    *,
    progress: bool = True,
    desc: str = "retrain",
    evaluate_test: bool = True,
    on_eval: Callable[[int, float], None] | None = None,
) -> RetrainResult:
    """Train ``model`` (a sparse prompt model or a baseline with the same interface) on all
    of train, evaluate on dev as set by ``settings``, keep the dev-best weights, score test.

    ``on_eval(step, dev_score)`` is called after each dev evaluation (Optuna pruning hooks in here).
    """
    config, r = prep.config, settings
    optim = OptimSettings(lr=r.lr, weight_decay=r.weight_decay, grad_clip=r.grad_clip)
    trainer = Trainer(model, optim, config.seed, prep.device, config.runtime.precision)
    n_train = len(prep.train)
    total = steps_per_epoch(n_train, r.batch_size) * r.epochs
    metric = config.task.metric
    best: dict[str, Any] = {"score": None, "state": None, "step": 0, "dev": None}
    started = time.perf_counter()
    bar = _progress(total, 0, desc, progress and distributed.is_main())
    step_no, smooth, dev_score = 0, float("nan"), float("nan")
    for step in iterate_from(lambda e: plain_schedule(n_train, r.batch_size, config.seed, e), r.epochs, TrainState()):
        stats = trainer.train_omega(prep.train, step.omega, step_no)
        step_no += 1
        if (r.eval_every and step_no % r.eval_every == 0) or (not r.eval_every and step.last) or step_no == total:
            dev = prep.evaluate(trainer, prep.dev)
            dev_score = dev[metric]
            if best["score"] is None or dev_score > best["score"]:
                state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
                best.update(score=dev_score, step=step_no, dev=dev, state=state)
            if on_eval is not None:
                on_eval(step_no, dev_score)
        smooth = _ema(smooth, stats["loss"])
        bar.set_postfix_str(f"ep {step.epoch + 1}/{r.epochs} loss {smooth:.3f} dev {metric} {dev_score:.4f}")
        bar.update(1)
    bar.close()
    model.load_state_dict(best["state"], strict=False)
    test = prep.evaluate(trainer, prep.test) if evaluate_test else {}
    seconds = time.perf_counter() - started
    return RetrainResult(best["dev"], test, model.num_trainable_parameters(), seconds, step_no, best["step"])


def run_retrain(
    prep: Prepared, mask: LayerMask, run: RunDir, progress: bool = True, supernet_dir: Path | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> RetrainResult:
    """Train the sparse model of ``mask`` on all of train; keep the best dev weights."""
    r = prep.config.retrain
    model = build_sparse(prep, mask.selected_layers)
    if r.init_from_supernet:
        source = supernet_dir or run.file("supernet")
        supernet = load_prompt_model(source, backbone=prep.backbone)
        if not isinstance(supernet, PromptSupernet):
            raise UserError(f"retrain.init_from_supernet: {source} holds no supernet")
        model.load_generators_from(supernet)
    logger.info(
        "retrain: layers %s of %s, %d trainable parameters, %d steps",
        mask.selected_layers, prep.backbone.name, model.num_trainable_parameters(),
        steps_per_epoch(len(prep.train), r.batch_size) * r.epochs,
    )
    result = train_and_evaluate(prep, model, r, progress=progress, on_eval=on_eval)
    if distributed.is_main():
        save_prompt_model(model, run.file("sparse"))
    return result


# ---------------------------------------------------------------------- reports


def write_metrics(run: RunDir, config: RunConfig, mask: LayerMask, result: RetrainResult, search_seconds: float | None) -> dict[str, Any]:
    metrics = {
        "task": config.task.name,
        "metric": config.task.metric,
        "dev": result.dev,
        "test": result.test,
        "trainable_params": result.trainable_params,
        "selected_layers": mask.selected_layers,
        "search_seconds": None if search_seconds is None else round(search_seconds, 3),
        "retrain_seconds": round(result.seconds, 3),
        "retrain_steps": result.steps,
        "best_dev_step": result.best_step,
    }
    tmp = run.file("metrics.json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, run.file("metrics.json"))
    return metrics


def summary_table(config: RunConfig, mask: LayerMask | None, metrics: dict[str, Any] | None, search: dict[str, Any] | None) -> str:
    """A Markdown summary of a run (printed at the end and saved as ``summary.md``)."""
    rows = [("task", config.task.name), ("backbone", config.model.backbone)]
    if mask is not None:
        gates = ", ".join(f"{layer}:{score:.3f}" for layer, score in zip(mask.candidate_layers, mask.scores))
        rows += [("gates (layer:alpha)", gates), ("selected layers", str(mask.selected_layers)), ("K", str(mask.k))]
    if search is not None:
        rows += [("search steps", str(search.get("steps"))), ("search time", f"{search.get('seconds', 0):.1f}s")]
    if metrics is not None:
        m = metrics["metric"]
        rows += [
            (f"dev {m}", f"{metrics['dev'][m]:.4f}"),
            (f"test {m}", f"{metrics['test'][m]:.4f}"),
            ("trainable params", f"{metrics['trainable_params']:,}"),
            ("retrain time", f"{metrics['retrain_seconds']:.1f}s"),
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'':{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)
