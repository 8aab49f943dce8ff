"""The run configuration: one YAML file, sections as documented dataclasses.

Relative paths in a config file are relative to that file's folder; relative paths given
with ``--set`` are relative to the working directory. The resolved config (every default
filled in, every path absolute) is what a run directory records in ``config.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from spt.backbone.quantize import MODES as QUANTIZE_MODES
from spt.config import HeadConfig, PromptConfig, config_from_dict
from spt.errors import ConfigError, UserError
from spt.files import read_text
from spt.typed import Section

from .options import SEED_LIMIT, valid_seed
from .rankers import RANKERS
from .storage import mask_url

METRICS = ("accuracy", "macro_f1", "f1", "mcc")
FORMATS = ("tsv", "csv", "jsonl", "json", "label_text", "hf")


@dataclass
class ModelConfig(Section):
    """The frozen backbone.

    Attributes:
        backbone: a local model directory, an alias (``minilm-l6``, ``mpnet-base``) or a hub id.
        max_length: tokens per example (text pairs are truncated longest-first).
        quantize: ``none`` (default), ``int8``, ``nf4`` or ``fp4``: hold the linear weights of the
            backbone's transformer layers in 8 bits (LLM.int8(), inputs multiplied in int8 too)
            or 4 bits (QLoRA's NormalFloat or float codes, one scale per 64 weights,
            dequantized to the backbone's dtype for each call), through bitsandbytes on a CPU
            or a CUDA GPU (the ``quant`` extra). Embeddings, norms and the LM head keep the
            backbone's dtype (``runtime.precision``); generators, gates and head train in fp32.
            It changes what the backbone computes, so it is part of a run's identity; a saved
            prompt model records it and quantizes its backbone again when loaded. Not offered for
            GPT-2 (fused Conv1D projections); the baseline ``finetune`` cannot train it.
    """

    backbone: str = "minilm-l6"
    max_length: int = 128
    quantize: str = "none"

    SECTION: ClassVar[str] = "model"

    def check(self) -> None:
        self.require("max_length", self.max_length >= 8, "at least 8")
        self.one_of("quantize", QUANTIZE_MODES)


@dataclass
class TaskConfig(Section):
    """Where the task's data is and how to read it.

    Attributes:
        name: short task name used in run names, masks and reports.
        format: ``tsv``, ``csv``, ``jsonl``, ``json`` (a list of records or an id -> record
            mapping), ``label_text`` (``label<space>text`` lines) or ``hf`` (a Hugging Face
            ``datasets`` dataset, see ``hf``).
        data_dir: folder the split paths are relative to.
        train, dev, test: split files. ``dev`` may be null: ``dev_fraction`` of train is held out.
            A split may also be a mapping ``{path: ..., format: ..., text_a: ..., text_b: ...,
            label: ..., header: ..., columns: ...}`` when its file is laid out differently.
        header: tsv/csv only: the first row names the columns.
        columns: tsv/csv without header: names of the columns, in order (else ``"0"``, ``"1"``...).
        text_a, text_b: a field name, or a template over fields such as ``"{premise} {question}"``.
        instruction: text placed before every input, for every strategy (null: none): a line
            that opens text_a (segment A) for a classifier head, and that precedes the
            template (and any in-context demonstrations) for a verbalizer. Truncation cuts the
            input, never the instruction.
        label: the label field.
        labels: the label set, in order (values as written in the files; booleans as
            ``true``/``false``).
        metric: ``accuracy``, ``macro_f1``, ``f1`` (of ``positive_label``) or ``mcc``.
        positive_label: the positive class for ``f1``.
        max_train, max_dev, max_test: keep at most this many examples (seeded sample).
        shots_per_label: a seeded k-shot training set: this many examples of each label
            (null: all); with ``dev`` null the dev set is another k per label from the rest.
        dev_fraction: share of train held out as dev when ``dev`` is null (and no ``shots_per_label``).
        hf: for ``format: hf``: ``{path: glue, name: sst2, splits: {train: train, dev: validation,
            test: validation}}`` - a hub dataset, or a builder such as ``json``/``csv`` with
            ``data_files: {train: ..., validation: ...}``.
    """

    name: str = "task"
    format: str = "tsv"
    data_dir: str | None = None
    train: str | dict[str, Any] | None = None
    dev: str | dict[str, Any] | None = None
    test: str | dict[str, Any] | None = None
    header: bool = True
    columns: list[str] | None = None
    text_a: str = "sentence"
    text_b: str | None = None
    instruction: str | None = None
    label: str = "label"
    labels: list[str] = field(default_factory=list)
    metric: str = "accuracy"
    positive_label: str | None = None
    max_train: int | None = None
    max_dev: int | None = None
    max_test: int | None = None
    shots_per_label: int | None = None
    dev_fraction: float = 0.1
    hf: dict[str, Any] | None = None

    SECTION: ClassVar[str] = "task"

    def check(self) -> None:
        self.one_of("metric", METRICS, "metric")
        self.require("dev_fraction", 0 < self.dev_fraction < 1, "in (0, 1)")
        self.positive("max_train", "max_dev", "max_test", "shots_per_label")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("task.labels", f"has duplicates: {self.labels}")


SCHEDULERS = ("constant", "linear", "cosine")
OBJECTIVES = {"dev": "maximize", "params": "minimize", "step_ms": "minimize"}


MAX_EPOCHS = 100_000  # a training plans its steps epoch by epoch: far beyond any real run, short of exhausting memory


def _check_epochs(section: Section) -> None:
    section.require("epochs", section.epochs <= MAX_EPOCHS, f"at most {MAX_EPOCHS:,}")


def _check_schedule(section: Section) -> None:
    section.one_of("lr_scheduler", SCHEDULERS, "scheduler")
    section.require("warmup_ratio", 0 <= section.warmup_ratio < 1, "in [0, 1)")


@dataclass
class SearchConfig(Section):
    """The SPT-DARTS supernet search.

    Attributes:
        epochs: passes over the training set (warm-up epochs included).
        warmup_epochs: first epochs that train generators and head only, on all of train,
            before any gate moves (null: a quarter of ``epochs``, rounded down).
        batch_size: examples per step (D1 and D2 batches alike).
        eval_batch_size: examples per evaluation batch.
        d1_fraction: share of the shuffled training set in D1 each epoch (the rest is D2).
        lr, weight_decay: AdamW for generators and head (``omega``).
        lr_scheduler: ``constant``, ``linear`` (decay to 0) or ``cosine`` (to 0), for the
            weights and the gates alike, after ``warmup_ratio`` of the steps of linear warm-up.
        warmup_ratio: share of the steps over which learning rates rise from 0.
        gradient_accumulation_steps: weight updates every this many batches (gradients
            summed, the loss of each batch divided by it); gate steps stay one per batch.
        arch_lr, arch_weight_decay: Adam for the gate logits ``a``.
        arch_betas: Adam's betas for the gate logits; (0.5, 0.999) as in DARTS, whose
            architecture steps forget old gradients faster than the default 0.9.
        arch_dropout: gate steps with dropout on (as the weight steps); false: without it, so a
            gate step's gradient is not dropout noise.
        arch_batches: a gate step sees this many D2 batches at once (its batch is
            ``batch_size * arch_batches`` examples, D2 cycled as needed).
        consistency_weight: ``beta`` of the architecture-consistency MSE (0 turns it off).
        mask_prob: ``p`` of the Bernoulli architecture mask.
        grad_clip: max gradient norm (0: no clipping).
        log_every: write the gates to ``gates.csv`` every this many steps.
        checkpoint_every: save a resumable checkpoint every this many steps (and each epoch end).
        max_steps: stop after this many steps (null: run all epochs).
        budget_params: search under a parameter budget: the gates' expected generator
            parameters are held at this many during the search (one global shift of the gate
            logits, solved each step); select with ``select.budget`` for the same budget.
    """

    epochs: int = 5
    warmup_epochs: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    d1_fraction: float = 0.5
    lr: float = 3e-3
    weight_decay: float = 0.01
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    arch_lr: float = 5e-2
    arch_weight_decay: float = 0.0
    arch_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    arch_dropout: bool = False
    arch_batches: int = 2
    consistency_weight: float = 1.0
    mask_prob: float = 0.5
    grad_clip: float = 1.0
    log_every: int = 1
    checkpoint_every: int = 50
    max_steps: int | None = None
    budget_params: int | None = None

    SECTION: ClassVar[str] = "search"

    @property
    def warmup(self) -> int:
        """The warm-up epochs in effect (``warmup_epochs``, or a quarter of ``epochs``)."""
        return self.epochs // 4 if self.warmup_epochs is None else self.warmup_epochs

    def check(self) -> None:
        self.positive("epochs", "batch_size", "eval_batch_size", "lr", "arch_lr", "arch_batches", "log_every", "checkpoint_every",
                      "max_steps", "gradient_accumulation_steps", "budget_params")
        _check_epochs(self)
        _check_schedule(self)
        self.non_negative("weight_decay", "arch_weight_decay", "consistency_weight", "grad_clip")
        if self.warmup_epochs is not None:
            self.require("warmup_epochs", 0 <= self.warmup_epochs < self.epochs, f"in [0, epochs={self.epochs})")
        self.require("d1_fraction", 0 < self.d1_fraction < 1, "in (0, 1)")
        self.require("mask_prob", 0 <= self.mask_prob <= 1, "in [0, 1]")
        self.require("arch_betas", len(self.arch_betas) == 2 and all(0 <= b < 1 for b in self.arch_betas), "two numbers in [0, 1)")


@dataclass
class SelectConfig(Section):
    """Turning the search into a layer mask.

    Attributes:
        k: keep the top-``k`` layers.
        budget: instead of ``k``: keep the largest number of layers whose generators fit in
            this many trainable parameters.
        method: how layers are ranked: ``gates`` (final gate), ``perturbation`` (the rise of
            the supernet's dev loss when the layer's prompt is removed), ``greedy`` (layers
            added one by one, each the one that lowers the dev loss most with the chosen
            ones kept) or ``combined`` (mean rank by gates and perturbation).
        average_last: gates: rank by the mean gate over the last this many logged steps
            (0: over every step logged in the last epoch).
        full_order: greedy: run a round for every candidate layer (the whole order) instead
            of stopping once the K-th layer (or the budget's last) is chosen; the extra rounds
            only order the layers that are not kept.
    """

    k: int | None = 3
    budget: int | None = None
    method: str = "gates"
    average_last: int = 0
    full_order: bool = False

    SECTION: ClassVar[str] = "select"

    def check(self) -> None:
        if (self.k is None) == (self.budget is None):
            raise ConfigError("select.k", "give exactly one of select.k and select.budget (set the other to null)")
        self.positive("k", "budget")
        self.non_negative("average_last")
        self.one_of("method", tuple(RANKERS), "method")


@dataclass
class RetrainConfig(Section):
    """Training the sparse model on the whole training set.

    Attributes:
        epochs, batch_size, lr, weight_decay, grad_clip: as in ``search``.
        lr_scheduler, warmup_ratio, gradient_accumulation_steps: as in ``search``.
        eval_every: evaluate on dev every this many steps (0: at each epoch end); the best
            dev score's weights are kept.
        patience: stop after this many dev evaluations without a better score (null: never).
        init_from_supernet: start from the supernet's generator and head weights.
    """

    epochs: int = 5
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    eval_every: int = 0
    patience: int | None = None
    init_from_supernet: bool = False

    SECTION: ClassVar[str] = "retrain"

    def check(self) -> None:
        self.positive("epochs", "batch_size", "lr", "gradient_accumulation_steps", "patience")
        _check_epochs(self)
        self.non_negative("weight_decay", "grad_clip", "eval_every")
        _check_schedule(self)


@dataclass
class CompareConfig(Section):
    """Baselines and black-box searches run by ``spt compare`` and the quality benchmark.

    Attributes:
        strategies: strategies compared when ``--strategies`` is not given.
        seeds: seeds when ``--seeds`` is not given.
        random_draws: masks drawn per seed by ``random``.
        exhaustive_limit: ``exhaustive`` refuses more K-subsets than this.
        trial_epochs: epochs of the short sparse training that scores one subset for
            ``exhaustive`` and ``optuna`` (null: ``retrain.epochs``).
        optuna_trials: trials of the ``optuna`` strategy.
        optuna_sampler: ``tpe``, ``random``, ``cmaes``, ``gp`` or ``qmc``.
        optuna_pruner: ``median`` (prune trials below the running median) or ``none``.
        peft_lr: learning rate of the parameter-efficient baselines (PEFT methods,
            ``adapter``, ``head-only``).
        finetune_lr: learning rate of full fine-tuning.
        lora_r: LoRA rank (null: matched to the sparse SPT model's generator parameters).
        ptuning_hidden: P-tuning prompt-encoder width (null: matched likewise).
        adapter_kind: ``houlsby`` (a bottleneck adapter after the attention and after the
            feed-forward sublayer of every layer) or ``pfeiffer`` (after the feed-forward only).
        adapter_size: adapter bottleneck width (null: matched to the sparse SPT model's
            generator parameters, as the LoRA rank is).
        demonstrations: ``in-context``: answered training examples (drawn with the seed)
            placed before each input; those that do not fit ``model.max_length`` are left out.
    """

    strategies: list[str] = field(default_factory=lambda: ["spt", "first", "all", "middle", "random"])
    seeds: list[int] = field(default_factory=lambda: [42])
    random_draws: int = 3
    exhaustive_limit: int = 64
    trial_epochs: int | None = None
    optuna_trials: int = 10
    optuna_sampler: str = "tpe"
    optuna_pruner: str = "median"
    peft_lr: float = 3e-3
    finetune_lr: float = 2e-5
    lora_r: int | None = None
    ptuning_hidden: int | None = None
    adapter_kind: str = "houlsby"
    adapter_size: int | None = None
    demonstrations: int = 4

    SECTION: ClassVar[str] = "compare"

    def check(self) -> None:
        self.positive("random_draws", "exhaustive_limit", "trial_epochs", "optuna_trials", "peft_lr", "finetune_lr",
                      "lora_r", "ptuning_hidden", "adapter_size", "demonstrations")
        self.one_of("optuna_pruner", ("median", "none"))
        self.one_of("adapter_kind", ("houlsby", "pfeiffer"))
        self.require("seeds", all(valid_seed(seed) for seed in self.seeds), f"whole numbers in [0, {SEED_LIMIT - 1}]")


def _default_space() -> dict[str, Any]:
    return {
        "search.lr": {"low": 3e-4, "high": 1e-2, "log": True},
        "search.arch_lr": {"low": 5e-3, "high": 2e-1, "log": True},
        "search.consistency_weight": {"low": 0.0, "high": 2.0},
        "prompt.length": [5, 10, 20],
        "prompt.bottleneck": [32, 64, 128],
        "prompt.phm_n": [1, 2, 4],
        "prompt.discard": [0, 1],
        "select.k": [1, 2, 3, 4],
    }


@dataclass
class HpoConfig(Section):
    """The Optuna study of ``spt hpo`` over the search's hyperparameters.

    Attributes:
        space: ``section.field`` -> a list of choices, or ``{low, high, log, step}`` for a
            number (an int field gets an int). Each trial runs search, selection and
            retraining with the suggested values; its objective is the retrained dev score.
        sampler: ``tpe``, ``random``, ``cmaes``, ``gp`` or ``qmc``.
        pruner: ``median`` (prune on the retraining's dev evaluations) or ``none``.
        storage: an Optuna storage URL shared by the workers: ``sqlite:///file.db``,
            ``postgresql://user@host/db``, or ``journal:/path/file.log`` (a journal file)
            (null: ``sqlite:///<out_dir>/spt-hpo.db``). ``${NAME}`` is replaced by the
            environment variable ``NAME``, and a URL with a user but no password takes
            ``$SPT_STORAGE_PASSWORD``; files and messages show passwords as ``***``.
        study: study name (null: ``<task>-<backbone>``).
        out_dir: where trial run directories go (null: ``runs/hpo-<study>``).
        heartbeat_interval: RDB storages: seconds between a running trial's heartbeats (0: none).
        grace_period: seconds without a heartbeat after which a trial counts as dead, is
            failed and retried (null: twice ``heartbeat_interval``).
        max_retry: how often a dead worker's trial is retried with the same parameters.
        objectives: what a trial reports: ``dev`` (the retrained dev score, maximised),
            ``params`` (trainable parameters) and ``step_ms`` (a training step's time), both
            minimised. More than one makes a multi-objective study (TPE or ``nsga2``, no
            pruning) whose Pareto front is written as ``pareto.md`` and ``pareto.png``.
        mode: ``search``: each trial runs SPT's search, selection and retraining; ``subsets``:
            each trial retrains a layer subset it suggests itself (one yes/no per candidate
            layer, AutoPEFT style), with the suggested values of ``space`` - a black-box
            search to compare SPT's single-search front with.
    """

    space: dict[str, Any] = field(default_factory=_default_space)
    sampler: str = "tpe"
    pruner: str = "median"
    storage: str | None = None
    study: str | None = None
    out_dir: str | None = None
    heartbeat_interval: int = 60
    grace_period: int | None = None
    max_retry: int = 2
    objectives: list[str] = field(default_factory=lambda: ["dev"])
    mode: str = "search"

    SECTION: ClassVar[str] = "hpo"

    def check(self) -> None:
        self.one_of("pruner", ("median", "none"))
        self.one_of("mode", ("search", "subsets"))
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        self.require("objectives", not bad and self.objectives and "dev" in self.objectives and len(set(self.objectives)) == len(self.objectives),
                     f"a list of distinct objectives among {', '.join(OBJECTIVES)} holding dev")
        self.non_negative("heartbeat_interval", "max_retry")
        self.positive("grace_period")


@dataclass
class RuntimeConfig(Section):
    """Where and how to run (not part of a run's identity).

    Attributes:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        threads: torch CPU threads (null: torch's default).
        progress: show progress bars.
        precision: ``fp32`` (default), ``bf16`` or ``fp16``: the frozen backbone stored in that
            dtype and the forward passes under its autocast; what trains (generators, gates,
            head, a baseline's parameters) keeps fp32 weights (on GPUs, and on CPUs whose torch
            autocast supports the dtype, as torch 2.13's does both). ``fp16`` also scales the losses of
            the weight and the gate steps (``torch.amp.GradScaler``, one per optimizer, saved
            in checkpoints) so small gradients do not underflow; a step whose gradients
            overflow is skipped and the scale halved, as the scaler does.
        compile: ``none`` or ``step``: ``torch.compile`` the forward pass and loss of every
            step whose graph is the same each time (the sparse model, the baselines, the
            gate step; the supernet's weight step changes with its sampled mask and stays
            eager); on a GPU with CUDA graphs (``mode="reduce-overhead"``). Compiled code draws
            its own random numbers, so with dropout on a compiled run draws other dropout masks
            than an eager one with the same seed (reproducible within each mode; without
            dropout the two train alike within 1e-4).
        tensorboard: also write the per-epoch metrics and the per-step losses (``steps.csv``)
            as TensorBoard events under ``<run>/tensorboard`` (needs the ``track`` extra:
            ``pip install 'tensorboard>=2.14'``).
        frozen_cache_mb: memory (MB on the device) for keeping, per example, the states below
            the lowest layer that can get a prompt (a sparse model's first prompt layer, a
            supernet's first candidate), which never change: computed once per split, they
            spare every later step and evaluation those layers' forward pass (tokens x hidden
            size x 4 bytes; 2 in bf16 or fp16 on a CPU). Shared by the splits a training uses,
            in the order they are first used (train, dev, test); a split that no longer fits
            is computed layer by layer as usual; 0 turns it off.
        activation_checkpointing: ``none`` (default), ``prompted`` or ``all``: trade compute
            for memory in training (the supernet and the sparse model, not the baselines) with
            ``torch.utils.checkpoint`` (non-reentrant): each prompted layer (from the first
            prompt layer on) keeps only its inputs and recomputes its forward pass in the
            backward pass. ``all`` is the same as ``prompted``: the layers below the first
            prompt run without autograd (or come from kept states), so they keep nothing to
            spare. Gradients are those of ``none`` (within rounding); with dropout on, the
            recomputation draws the same masks (the RNG state is restored).
        shard: ``none`` (default) or ``fsdp``: under ``torchrun``, split the frozen backbone's
            parameters across the ranks with torch's FSDP2 (``fully_shard`` per transformer layer
            and on the rest of the backbone), so each of N ranks holds 1/N of them and gathers a
            layer's weights while it runs; generators, gates and head stay whole on every rank,
            their gradients averaged as without sharding. Same results as ``none`` (within
            rounding); it costs a gather of each layer's weights in every forward pass, and
            another in the backward pass. Refused outside torchrun, with ``runtime.compile:
            step`` and with ``model.quantize``.
    """

    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    precision: str = "fp32"
    compile: str = "none"
    tensorboard: bool = False
    frozen_cache_mb: float = 1024
    activation_checkpointing: str = "none"
    shard: str = "none"

    SECTION: ClassVar[str] = "runtime"

    def check(self) -> None:
        self.positive("threads")
        self.non_negative("frozen_cache_mb")
        self.one_of("precision", ("fp32", "bf16", "fp16"))
        self.one_of("compile", ("none", "step"))
        self.one_of("activation_checkpointing", ("none", "prompted", "all"))
        self.one_of("shard", ("none", "fsdp"))


@dataclass
class RunConfig:
    """Everything a run needs. ``seed`` fixes data splits, masks and initialisation."""

    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    hpo: HpoConfig = field(default_factory=HpoConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that decide a run's result (see :func:`run_identity`)."""
        return run_identity(self.to_dict())

    def validate(self) -> None:
        """Checks across fields and sections (each section checks its own fields when built)."""
        task = self.task
        for split in ("train", "dev", "test"):
            view, _ = split_view(task, split)
            if view.format not in FORMATS:
                where = f"task.{split}.format" if view is not task else "task.format"
                raise ConfigError(where, f"unknown format {view.format!r}; choose one of {list(FORMATS)}")
        if len(task.labels) < 2:
            raise ConfigError("task.labels", f"declare the label set (at least two labels), got {task.labels}")
        if task.metric == "f1" and task.positive_label not in task.labels:
            raise ConfigError("task.positive_label", f"metric f1 needs a positive label from {task.labels}, got {task.positive_label!r}")
        if task.positive_label is not None and task.positive_label not in task.labels:  # (every metric reports it)
            raise ConfigError("task.positive_label", f"must be one of task.labels {task.labels} or null, got {task.positive_label!r}")
        if task.format == "hf":
            if not task.hf or "path" not in task.hf:
                raise ConfigError("task.hf", "format hf needs task.hf.path (and optionally name, splits)")
        elif not task.train:
            raise ConfigError("task.train", "no training file given")
        if not task.test and task.format != "hf":
            raise ConfigError("task.test", "no test file given")
        self.head.validate(task.labels)


SPLIT_FIELDS = ("format", "header", "columns", "text_a", "text_b", "label")


def split_view(task: TaskConfig, split: str) -> tuple[TaskConfig, str | None]:
    """The task settings for one split (with its own overrides) and the split's path."""
    spec = getattr(task, split)
    if not isinstance(spec, dict):
        return task, spec
    unknown = sorted(set(spec) - {"path", *SPLIT_FIELDS})
    if unknown:
        raise ConfigError(f"task.{split}.{unknown[0]}", f"unknown field; a split may set path, {', '.join(SPLIT_FIELDS)}")
    if "path" not in spec:
        raise ConfigError(f"task.{split}.path", "a split given as a mapping needs a path")
    return dataclasses.replace(task, **{k: spec[k] for k in SPLIT_FIELDS if k in spec}), spec["path"]


NOT_IDENTITY = ("runtime", "compare", "hpo")


def run_identity(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the sections that do not change a search/retrain result."""
    return {k: v for k, v in data.items() if k not in NOT_IDENTITY}


SECTIONS = {
    "model": ModelConfig,
    "prompt": PromptConfig,
    "head": HeadConfig,
    "task": TaskConfig,
    "search": SearchConfig,
    "select": SelectConfig,
    "retrain": RetrainConfig,
    "compare": CompareConfig,
    "hpo": HpoConfig,
    "runtime": RuntimeConfig,
}


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["search.epochs=2", "task.labels=[a, b]"]`` -> nested dict (values parsed as YAML;
    text that is not valid YAML is taken as a string)."""
    result: dict[str, Any] = {}
    for item in items or []:
        key, sign, raw = item.partition("=")
        if not sign or "" in key.strip().split("."):  # no '=', or an empty name: '=1', 'search.=1', 'a..b=1'
            raise UserError(f"--set {item!r}", "expected key=value, e.g. --set search.epochs=2")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. a template such as "{text_a} It was {mask}."): a plain string
        parts = key.strip().split(".")
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}", f"{part} is not a section")
        node[parts[-1]] = value
    return result


def check_text(value: Any, field: str, _open: tuple[int, ...] = (), _seen: set[int] | None = None) -> None:
    """Refuse what YAML (and JSON) can hold but no config field can take, before it fails
    later with a traceback: text that is not UTF-8 (a lone surrogate, half of a UTF-16 pair,
    such as ``"\\ud800"``: it fails as a path or in a file), and a value that holds itself (an
    alias such as ``&a [*a]``). A value shared by several aliases is checked once."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(field or "config", f"holds {value[exc.start]!r}, half of a UTF-16 surrogate pair, which is "
                              "not text; write the character itself") from None
        return
    if not isinstance(value, (dict, list)):
        return
    seen = set() if _seen is None else _seen
    if id(value) in _open:
        raise ConfigError(field or "config", "holds itself (a YAML alias inside its own anchor, such as &a [*a])")
    if id(value) in seen:
        return
    seen.add(id(value))
    items = value.items() if isinstance(value, dict) else ((f"[{i}]", item) for i, item in enumerate(value))
    for key, item in items:
        check_text(key, field or "config", (), seen)
        name = key if isinstance(value, list) else (f".{key}" if field else str(key))
        check_text(item, f"{field}{name}", (*_open, id(value)), seen)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("hf", "space"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_path(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _absolutize(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the paths written in one file (or in ``--set``) absolute, relative to ``base``."""
    data = copy.deepcopy(data)
    task = data.get("task")
    if isinstance(task, dict) and task.get("data_dir") is not None:
        task["data_dir"] = _resolve_path(str(task["data_dir"]), base)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("backbone"), str):
        name = model["backbone"]
        if name.startswith((".", "/", "~")) or (base / name).is_dir():
            model["backbone"] = _resolve_path(name, base)
    return data


def build_config(data: dict[str, Any], base_dir: Path, overrides: dict[str, Any] | None = None, cwd: Path | None = None) -> RunConfig:
    """A validated :class:`RunConfig` from parsed YAML ``data`` and ``--set`` overrides."""
    if not isinstance(data, dict):
        raise UserError("config", "the file must hold a YAML mapping of sections (model, task, ...)")
    overrides = overrides or {}
    check_text(data, "")
    check_text(overrides, "")
    unknown = sorted((set(data) | set(overrides)) - set(SECTIONS) - {"seed"})
    if unknown:
        raise ConfigError(unknown[0], f"unknown section; known sections: seed, base, {', '.join(SECTIONS)}")
    # Paths are made absolute before merging, so each is relative to where it was written.
    merged = _merge(_absolutize(data, base_dir), _absolutize(overrides, cwd or Path.cwd()))
    sections = {name: config_from_dict(cls, merged.get(name), name) for name, cls in SECTIONS.items()}
    seed = merged.get("seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError("seed", f"expected an integer, got {seed!r}")
    if not valid_seed(seed):
        raise ConfigError("seed", f"must be in [0, {SEED_LIMIT - 1}] (NumPy's and Optuna's samplers take no other), got {seed}")
    config = RunConfig(seed=seed, **sections)
    task = config.task
    if task.data_dir is None:
        task.data_dir = str(base_dir.resolve())
    if task.format != "hf":
        for split in ("train", "dev", "test"):
            spec = getattr(task, split)
            if isinstance(spec, dict) and spec.get("path") is not None:
                spec["path"] = _resolve_path(str(spec["path"]), Path(task.data_dir))
            elif isinstance(spec, str):
                setattr(task, split, _resolve_path(spec, Path(task.data_dir)))
    config.validate()
    return config


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Path]:
    """Parse a config file and the chain of files it names as ``base`` (merged, paths absolute)."""
    path = path.resolve()
    if path in seen:
        raise UserError("config", f"{path} names itself as a base (cycle through {', '.join(map(str, seen))})")
    if not path.is_file():
        raise UserError("config", f"{path} does not exist")
    try:
        data = yaml.safe_load(read_text(path, "config")) or {}
    except yaml.YAMLError as exc:
        raise UserError("config", f"{path} is not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise UserError("config", f"{path} must hold a YAML mapping of sections (model, task, ...)")
    check_text(data, "")
    base = data.pop("base", None)
    data = _absolutize(data, path.parent)
    if base is None:
        return data, path.parent
    parent, _ = read_config_file(path.parent / str(base), (*seen, path))
    merged = _merge(parent, data)
    task = merged.get("task")
    if isinstance(task, dict) and task.get("data_dir") is None:
        task["data_dir"] = str(path.parent)
    return merged, path.parent


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read (following ``base``), merge ``--set`` overrides into, resolve and validate a config."""
    data, base_dir = read_config_file(Path(path))
    return build_config(data, base_dir, parse_overrides(overrides))


def config_from_run_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a resolved config (from a run directory's ``config.yaml``)."""
    return build_config(data, Path("/"))


def dump_config(config: RunConfig) -> str:
    """The config as YAML, with the storage URL's password masked (``***``)."""
    data = config.to_dict()
    if data["hpo"]["storage"] is not None:
        data["hpo"]["storage"] = mask_url(data["hpo"]["storage"])
    return yaml.safe_dump(data, sort_keys=False)
