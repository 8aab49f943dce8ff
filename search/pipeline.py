"""The jobs users run: search, select, retrain, and all three in a row.

Each stage reads and writes the run directory the README describes ("A run directory").
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from spt.backbone import Backbone, load_backbone
from spt.config import PromptConfig
from spt.errors import UserError
from spt.files import write_json_atomic
from spt.heads import build_head, head_parameter_count
from spt.inputs import EncodedSplit, encode_split
from spt.model import PromptSupernet, SparsePromptModel, load_prompt_model
from spt.serialization import save_prompt_model, write_model_card
from spt.trainable import TrainableModel

from . import distributed, sharding
from .callbacks import (
    Checkpointer,
    DevEvaluator,
    FiniteCheck,
    GateHistory,
    MetricHistory,
    Progress,
    StepHistory,
    StepLimit,
    tensorboard_writer,
)
from .checkpoint import CHECKPOINT_FILE, RETRAIN_CHECKPOINT_FILE, load_checkpoint
from .config import RetrainConfig, RunConfig
from .data import TaskData, load_task
from .evaluator import Evaluator
from .feed import Feed, Precision
from .losses import search_loss
from .progress import WorkProgress
from .rankers import RANKERS, Evidence
from .resume import Training, plain_training, search_training
from .runs import RunDir
from .schedule import plain_schedule, search_schedule, steps_from, steps_per_epoch
from .selection import (
    LayerMask,
    Ranking,
    choose_k,
    gate_scores,
    gates_summary,
    generator_parameters,
    read_gate_history,
    select_layers,
    write_mask,
)
from .trainer import Callback, Trainer, TrainState

logger = logging.getLogger("spt")


# ---------------------------------------------------------------------- shared set-up


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("runtime.device", f"{name!r} asked for, but CUDA is not available here; use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError("runtime.device", f"{name!r} is not a device; use auto, cpu or cuda[:N]") from None


@lru_cache(maxsize=2)
def cached_backbone(name: str, with_lm_head: bool, dtype: torch.dtype = torch.float32, quantize: str = "none") -> Backbone:
    """Backbones are frozen, so jobs in one process (compare, hpo) can share them."""
    return load_backbone(name, with_lm_head=with_lm_head, dtype=dtype, quantize=quantize)


def run_backbone(config: RunConfig, with_lm_head: bool) -> Backbone:
    """The frozen backbone of a run (``model.backbone``, with its LM head when asked), stored in
    ``runtime.precision``'s dtype and quantized as ``model.quantize`` says."""
    dtype = Precision(config.runtime.precision).backbone_dtype
    return cached_backbone(config.model.backbone, with_lm_head, dtype, config.model.quantize)


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
    shards: sharding.Sharding | None = None  # what each rank holds of the backbone (runtime.shard: fsdp)

    @property
    def positive_index(self) -> int | None:
        task = self.config.task
        return task.labels.index(task.positive_label) if task.positive_label is not None else None

    def feed(self, model: TrainableModel) -> Feed:
        """``model``'s batches of these splits, on this device, as ``runtime`` says."""
        return Feed.from_runtime(self.config.runtime, self.device, model, self.train)

    def evaluate(self, evaluator: Evaluator, split: EncodedSplit) -> dict[str, float]:
        return evaluator.evaluate(split, self.config.search.eval_batch_size, self.config.task.metric, self.positive_index)


def prepare(config: RunConfig) -> Prepared:
    """Load the backbone and the task data, tokenized once for every stage."""
    sharding.check(config)  # (runtime.shard: fsdp where it cannot run is refused before anything loads)
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    device = resolve_device(distributed.device_for(config.runtime.device))
    backbone = run_backbone(config, config.head.verbalizer)
    config.prompt.validate(backbone.num_layers, backbone.hidden_size)
    backbone.check_length(config.model.max_length, config.prompt.length)
    # Refuse an impossible selection or budget now, not after a search has run.
    search_prompt(config, backbone).validate(backbone.num_layers, backbone.hidden_size)
    choose_k(
        len(config.prompt.candidates(backbone.num_layers)), config.select.k, config.select.budget,
        per_generator(config, backbone),
    )
    data = load_task(config.task, config.seed)
    if len(data.train) < 2:
        raise UserError("task.train", f"{len(data.train)} example(s); the search needs at least 2 (D1 and D2)")
    tok, max_len, head, instruction = backbone.tokenizer, config.model.max_length, config.head, config.task.instruction
    # runtime.shard: fsdp splits the backbone's weights across torchrun's ranks (search.sharding)
    shards = sharding.shard_backbone(backbone, device) if config.runtime.shard == "fsdp" else None
    return Prepared(
        config, backbone, data,
        encode_split(tok, data.train, max_len, head, instruction),
        encode_split(tok, data.dev, max_len, head, instruction),
        encode_split(tok, data.test, max_len, head, instruction),
        device, shards,
    )


def build_supernet(prep: Prepared) -> PromptSupernet:
    config = prep.config
    torch.manual_seed(config.seed)  # the seed fixes generator, gate and head initialisation
    head = build_head(prep.backbone, config.head, prep.data.labels)
    supernet = PromptSupernet(prep.backbone, search_prompt(config, prep.backbone), head, config.head, prep.data.labels,
                              config.model.max_length, config.task.instruction)
    supernet.activation_checkpointing = config.runtime.activation_checkpointing
    return supernet


def per_generator(config: RunConfig, backbone: Backbone) -> int:
    """Trainable parameters of one prompt generator on ``backbone`` (every generator has this size)."""
    return generator_parameters(backbone.hidden_size, config.prompt.bottleneck, config.prompt.phm_n)


def search_prompt(config: RunConfig, backbone: Backbone) -> PromptConfig:
    """The supernet's prompt settings: ``search.budget_params`` becomes the gates' budget,
    counted in generators (every generator has the same size)."""
    if config.search.budget_params is None:
        return config.prompt
    return dataclasses.replace(config.prompt, gate_budget=config.search.budget_params / per_generator(config, backbone))


def build_sparse(prep: Prepared, layers: list[int]) -> SparsePromptModel:
    config = prep.config
    torch.manual_seed(config.seed)
    head = build_head(prep.backbone, config.head, prep.data.labels)
    model = SparsePromptModel(prep.backbone, config.prompt, head, config.head, prep.data.labels, layers,
                              config.model.max_length, config.task.instruction)
    model.activation_checkpointing = config.runtime.activation_checkpointing
    return model


def _format_gates(alphas: torch.Tensor) -> str:
    return " ".join(f"{a:.2f}" for a in alphas.tolist())


def _tensorboard(prep: Prepared, run: RunDir):
    return tensorboard_writer(run.file("tensorboard")) if prep.config.runtime.tensorboard else None


def _step_history(prep: Prepared, run: RunDir, stage: str, every: int) -> StepHistory:
    """``steps.csv`` for ``stage``; its TensorBoard scalars in ``tensorboard/steps-<stage>`` (a
    writer of their own, whose ``purge_step`` on resume hides no other stage's points)."""
    tensorboard = run.file("tensorboard") / f"steps-{stage}" if prep.config.runtime.tensorboard else None
    return StepHistory(run.file("steps.csv"), stage, every, tensorboard)


def _resume(path: Path, trainer: Trainer, callbacks: dict[str, Callback], stage: str,
            identity: dict[str, Any] | None = None, training: Training | None = None) -> TrainState:
    """The state in the checkpoint at ``path`` (restored into ``trainer`` and ``callbacks``), or a
    fresh start; ``training``: what the checkpoint must agree with (its plan and histories)."""
    if not path.is_file():
        return TrainState()
    state = load_checkpoint(path, trainer, callbacks, identity)
    if training is not None:
        training.check(path, state)
    logger.info("resuming the %s from step %d (epoch %d) of %s", stage, state.step, state.epoch, path.parent)
    return state


# ---------------------------------------------------------------------- search


@dataclass
class SearchResult:
    alphas: list[float]
    steps: int
    seconds: float
    train_examples: int


def run_search(prep: Prepared, run: RunDir, progress: bool = True) -> SearchResult:
    """SPT-DARTS search; resumes from ``run``'s checkpoint when there is one."""
    config, s = prep.config, prep.config.search
    n_train = len(prep.train)
    model = build_supernet(prep)
    layers = model.candidate_layers
    history = run.path if distributed.is_main() else None
    training = search_training(config, n_train, layers, history)
    total = training.plan.total  # (the one count of a search's steps: the resume check reads the same plan)
    trainer = Trainer(model, s, prep.feed(model), config.seed,
                      loss=search_loss(s.consistency_weight, s.mask_prob, config.seed, len(model.candidate_layers)),
                      compile_step=config.runtime.compile == "step", total_steps=total)
    ckpt_path = run.file(CHECKPOINT_FILE)

    def describe(trainer: Trainer, state: TrainState, step, loss: float) -> str:
        return f"ep {step.epoch + 1}/{s.epochs} loss {loss:.3f} α {_format_gates(model.alphas())}"

    callbacks: list[Callback] = [StepLimit(total), FiniteCheck("search", (s.log_every, s.checkpoint_every), total)]
    kept: dict[str, Callback] = {}  # what the checkpoint keeps of the callbacks
    if distributed.is_main():  # under torchrun only rank 0 writes
        kept = {"metrics": MetricHistory(run.file("metrics.csv"), "search", layers, s.epochs, tensorboard=_tensorboard(prep, run)),
                "steps": _step_history(prep, run, "search", s.log_every)}
        callbacks += [GateHistory(run.file("gates.csv"), layers, s.log_every, total), *kept.values(),
                      Checkpointer(ckpt_path, s.checkpoint_every, kept)]
    callbacks.append(Progress(total, "search", describe, enabled=progress and distributed.is_main()))
    state = _resume(ckpt_path, trainer, kept, "search", training=training)
    logger.info("search: %s on %s, %d candidate layers, %d train examples, %d steps",
                prep.backbone.name, config.task.name, len(layers), n_train, total)

    def schedule(epoch: int):
        return search_schedule(n_train, s.warmup, s.batch_size, s.d1_fraction, config.seed, epoch, s.arch_batches)

    state = trainer.fit(steps_from(schedule, s.epochs, state.epoch, state.batch_in_epoch), callbacks, state)
    alphas = model.alphas().tolist()
    if distributed.is_main():
        save_prompt_model(model, run.file("supernet"))
        run.mark("search", steps=state.step, seconds=round(state.seconds, 3), alphas=[round(a, 6) for a in alphas])
        if ckpt_path.is_file():
            ckpt_path.unlink()  # the finished supernet replaces it
    distributed.barrier()
    logger.info("search done in %.1fs: gates %s", state.seconds, _format_gates(torch.tensor(alphas)))
    return SearchResult(alphas, state.step, state.seconds, n_train)


# ---------------------------------------------------------------------- selection


def rank_candidates(run: RunDir, prep: Prepared, method: str | None = None, keep: int | None = None,
                    progress: bool = True) -> Ranking:
    """Rank the candidate layers of the search in ``run`` by ``method`` (default: the config's).

    ``perturbation``, ``greedy`` and ``combined`` evaluate the searched supernet on the
    dev set under layer masks (dev passes only, no training), with a progress bar (a line
    per 10% when output is redirected); ``greedy`` stops after ``keep`` rounds unless
    ``select.full_order``. The ranking's summary says what was measured, in one line.
    """
    config = prep.config
    method = method or config.select.method
    candidates = config.prompt.candidates(prep.backbone.num_layers)
    rows = read_gate_history(run.file("gates.csv"))
    gates = Ranking.by_score("gates", candidates, *gate_scores(rows, candidates, config.select.average_last))
    gates.summary = gates_summary(candidates, gates, config.select.average_last)
    ranker = RANKERS[method]()
    rounds = len(candidates) if config.select.full_order or keep is None else keep
    passes = ranker.dev_passes(len(candidates), rounds)
    if passes == 0:
        return ranker.rank(Evidence(candidates, gates, None, config.seed, rounds))
    supernet = load_prompt_model(run.file("supernet"), backbone=prep.backbone)
    evaluator = Evaluator(supernet, prep.feed(supernet))
    meter = WorkProgress(passes, f"select ({method})", "dev pass", "dev passes", enabled=progress and distributed.is_main())

    def dev_loss(mask: list[float] | None, hard: bool) -> list[float]:
        losses = evaluator.predict(prep.dev, config.search.eval_batch_size, arch_mask=mask, hard_gates=hard)[1]
        meter.advance(f"dev loss {sum(losses) / len(losses):.4f}")
        return losses

    with meter:
        ranking = ranker.rank(Evidence(candidates, gates, dev_loss, config.seed, rounds))
    ranking.summary += f" ({meter.done} dev passes over {len(prep.dev)} examples, {meter.seconds:.0f}s)"
    return ranking


def select_from_run(run: RunDir, prep: Prepared, k: int | None = None, budget: int | None = None,
                    method: str | None = None, progress: bool = True) -> LayerMask:
    """The layer mask of the search in ``run`` for ``k`` or ``budget`` (default: the config's)."""
    config, backbone = prep.config, prep.backbone
    if k is None and budget is None:
        k, budget = config.select.k, config.select.budget
    candidates = config.prompt.candidates(backbone.num_layers)
    generator = per_generator(config, backbone)
    ranking = rank_candidates(run, prep, method, choose_k(len(candidates), k, budget, generator), progress)
    mask = select_layers(
        backbone=config.model.backbone, num_layers=backbone.num_layers, candidates=candidates,
        ranking=ranking, k=k, budget=budget, per_generator=generator,
        head_params=head_parameter_count(config.head.type, backbone.hidden_size, len(config.task.labels)),
        prompt_length=config.prompt.length, task=config.task.name, seed=config.seed,
    )
    logger.info("select (%s): layers %s kept; %s", mask.method, mask.selected_layers, ranking.summary)
    if mask.uncertain:
        logger.warning("layer choice is uncertain for this task: by %s, the layers ranked %d and %d differ by less than "
                       "their spread (see scores and spread in the layer mask)", mask.method, mask.k, mask.k + 1)
    return mask


# ---------------------------------------------------------------------- training a model


@dataclass
class TrainResult:
    """What training one model gave: dev (best) and test scores, size and cost."""

    dev: dict[str, float]
    test: dict[str, float]
    trainable_params: int
    seconds: float
    steps: int
    best_step: int


def train_and_evaluate(
    prep: Prepared,
    model: TrainableModel,
    settings: RetrainConfig,
    *,
    progress: bool = True,
    desc: str = "retrain",
    evaluate_test: bool = True,
    on_eval: Callable[[int, float], None] | None = None,
    run: RunDir | None = None,
    checkpoint: Path | None = None,
) -> TrainResult:
    """Train ``model`` (a sparse prompt model or a baseline) on all of train, evaluate on
    dev as ``settings`` say, keep the dev-best weights and score them on test.

    ``on_eval(step, dev_score)`` is called after each dev evaluation (Optuna pruning hooks in
    here); with ``run``, per-epoch metrics go to its ``metrics.csv`` (and TensorBoard) and
    the losses of every step to its ``steps.csv``. With ``checkpoint``, a resumable
    checkpoint is saved there at each dev evaluation and each epoch end, and a training
    that finds one there resumes from it (the caller deletes it once the result is saved).
    """
    config, r = prep.config, settings
    n_train = len(prep.train)
    training = plain_training(desc, r, n_train, run.path if run is not None and distributed.is_main() else None)
    total = training.plan.total
    feed = prep.feed(model)  # (one for the steps and the evaluations: they share the kept states)
    trainer = Trainer(model, r, feed, config.seed, compile_step=config.runtime.compile == "step", total_steps=total)
    evaluator = Evaluator(model, feed)
    callbacks, kept, dev = _retrain_callbacks(prep, evaluator, r, total, desc, progress, on_eval, run)
    if checkpoint is not None:
        identity = {"stage": desc, "layers": getattr(model, "layers", None)}
        if distributed.is_main():
            callbacks.insert(-1, Checkpointer(checkpoint, r.eval_every, kept, identity))  # (after what it keeps)
        state = _resume(checkpoint, trainer, kept, "retraining" if desc == "retrain" else desc, identity, training)
    else:
        state = TrainState()
    steps = steps_from(lambda e: plain_schedule(n_train, r.batch_size, config.seed, e), r.epochs, state.epoch, state.batch_in_epoch)
    state = trainer.fit(steps, callbacks, state)
    test = prep.evaluate(evaluator, prep.test) if evaluate_test else {}
    return TrainResult(dev.best["dev"], test, model.num_trainable_parameters(), state.seconds, state.step, dev.best["step"])


def _retrain_callbacks(
    prep: Prepared, evaluator: Evaluator, r: RetrainConfig, total: int, desc: str, progress: bool,
    on_eval: Callable[[int, float], None] | None, run: RunDir | None,
) -> tuple[list[Callback], dict[str, Callback], DevEvaluator]:
    """The callbacks of a training (Progress last), those of them a checkpoint keeps, and the dev evaluator."""
    config, metric = prep.config, prep.config.task.metric
    dev = DevEvaluator(lambda: prep.evaluate(evaluator, prep.dev), metric, r.eval_every, total, on_eval, r.patience)

    def describe(trainer: Trainer, state: TrainState, step, loss: float) -> str:
        return f"ep {step.epoch + 1}/{r.epochs} loss {loss:.3f} dev {metric} {dev.last_score:.4f}"

    kept: dict[str, Callback] = {"dev": dev}  # (every rank evaluates: every rank gets the dev state back)
    if run is not None and distributed.is_main():
        candidates = config.prompt.candidates(prep.backbone.num_layers)
        kept["metrics"] = MetricHistory(run.file("metrics.csv"), desc, candidates, r.epochs, dev, _tensorboard(prep, run))
        kept["steps"] = _step_history(prep, run, desc, 1)
    callbacks: list[Callback] = [FiniteCheck("retrain", (r.eval_every,), total), *kept.values()]
    callbacks.append(Progress(total, desc, describe, enabled=progress and distributed.is_main()))
    return callbacks, kept, dev


def evaluate_model(prep: Prepared, model: TrainableModel) -> TrainResult:
    """Score ``model`` on dev and test as it is, without training (zero-shot, in-context)."""
    evaluator = Evaluator(model, prep.feed(model))  # (no optimizer: nothing is trained)
    return TrainResult(prep.evaluate(evaluator, prep.dev), prep.evaluate(evaluator, prep.test),
                       model.num_trainable_parameters(), 0.0, 0, 0)


def run_retrain(
    prep: Prepared, mask: LayerMask, run: RunDir, progress: bool = True, supernet_dir: Path | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the sparse model of ``mask`` on all of train; keep the best dev weights.

    Resumable: an interrupted retraining goes on from ``retrain_checkpoint.safetensors`` in
    ``run`` (deleted once the sparse model is saved) to the result of an uninterrupted one.
    """
    r = prep.config.retrain
    model = build_sparse(prep, mask.selected_layers)
    if r.init_from_supernet:
        source = supernet_dir or run.file("supernet")
        supernet = load_prompt_model(source, backbone=prep.backbone)
        if not isinstance(supernet, PromptSupernet):
            raise UserError("retrain.init_from_supernet", f"{source} holds no supernet")
        model.load_generators_from(supernet)
    logger.info(
        "retrain: layers %s of %s, %d trainable parameters, %d steps",
        mask.selected_layers, prep.backbone.name, model.num_trainable_parameters(),
        steps_per_epoch(len(prep.train), r.batch_size) * r.epochs,
    )
    checkpoint = run.file(RETRAIN_CHECKPOINT_FILE)
    result = train_and_evaluate(prep, model, r, progress=progress, on_eval=on_eval, run=run, checkpoint=checkpoint)
    if distributed.is_main():
        save_prompt_model(model, run.file("sparse"))
        checkpoint.unlink(missing_ok=True)  # the saved model replaces it
    return result


# ---------------------------------------------------------------------- the whole job


def search_and_select(prep: Prepared, run: RunDir, progress: bool = True) -> LayerMask:
    """Search (unless ``run`` holds a finished search), then select and write ``layer_mask.json``."""
    if not run.done("search"):
        run_search(prep, run, progress=progress)
    mask = select_from_run(run, prep, progress=progress)
    if distributed.is_main():
        write_mask(mask, run.file("layer_mask.json"), force=True)
    return mask


def run_job(prep: Prepared, run: RunDir, progress: bool = True,
            on_eval: Callable[[int, float], None] | None = None) -> tuple[LayerMask, dict[str, Any] | None]:
    """``spt run`` (and each ``spt hpo`` trial): search, select, retrain, write ``metrics.json``."""
    mask = search_and_select(prep, run, progress)
    search = run.status().get("search", {})
    result = run_retrain(prep, mask, run, progress=progress, on_eval=on_eval)
    metrics = None
    if distributed.is_main():
        metrics = write_metrics(run, prep.config, mask, result, search.get("seconds"))
        write_model_card(run.file("sparse"), metrics)
        run.mark("retrain", seconds=round(result.seconds, 3))
    return mask, metrics


# ---------------------------------------------------------------------- reports


def write_metrics(run: RunDir, config: RunConfig, mask: LayerMask, result: TrainResult, search_seconds: float | None) -> dict[str, Any]:
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
    write_json_atomic(run.file("metrics.json"), metrics)
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
