"""One trainer for the supernet search, the sparse model and every baseline.

:meth:`Trainer.fit` runs a schedule of steps. Each step updates the weights ``omega``
(generators and head, or a baseline's parameters) on a D1 batch; in search epochs the
model's :class:`~search.architect.Architect` then updates the gate logits on a D2 batch.
What happens around the steps (gate history, checkpoints, dev evaluation and best
weights, progress, metric history, stopping) is done by callbacks
(:mod:`search.callbacks`).

Every step reseeds torch from ``(seed, step)`` (see :mod:`search.schedule`), so a run
resumed from a checkpoint takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from spt.inputs import EncodedSplit, collate, longest_first
from spt.trainable import TrainableModel

from . import distributed
from .architect import Architect, compiled
from .config import RetrainConfig, SearchConfig
from .frozen import FrozenStates
from .losses import TaskLoss, task_loss
from .metrics import compute_metrics
from .schedule import ScheduledStep, batch_indices, lr_factor, step_seed

# ``runtime.precision`` -> the dtype of the frozen backbone and of autocast (fp32: no autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def keep_fp32(params: Iterable[nn.Parameter]) -> None:
    """Store the fp16 ones of ``params`` in fp32 (fp16 training keeps fp32 weights; autocast
    casts them per operation, and a loss scaler refuses to unscale fp16 gradients)."""
    for p in params:
        if p.dtype == torch.float16:
            p.data = p.data.float()


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> None:
    """Scale the gradients of ``params`` by ``min(1, max_norm / norm)``, ``norm`` their joint 2-norm.

    What ``nn.utils.clip_grad_norm_`` does (less its 1e-6 added to the norm), in six kernels
    where it takes eight: the norm over the per-tensor norms, one ``max(1, norm / max_norm)``,
    one multi-tensor division. Gradients of several devices or dtypes go to torch's function.
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if len({(g.device, g.dtype) for g in grads}) > 1 or any(g.is_sparse for g in grads):
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_div_(grads, (norm / max_norm).clamp_min(1.0))


@dataclass
class TrainState:
    """Where training stands: enough to resume exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seconds: float = 0.0  # training time so far, across resumptions
    stop: bool = False  # set by a callback to end training early

    def advance(self, step: ScheduledStep) -> None:
        self.step += 1
        self.batch_in_epoch = step.index + 1
        if step.last:
            self.epoch, self.batch_in_epoch = step.epoch + 1, 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Callback:
    """Hooks around :meth:`Trainer.fit`; ``stats`` hold detached tensors (read them only when needed).

    A callback whose state a resumed run needs (the dev-best weights, an epoch's loss sums)
    returns it from :meth:`checkpoint_state`, which the checkpoint saves and hands back to
    :meth:`restore` before a resumed fit starts.
    """

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None: ...

    def on_step_end(self, trainer: Trainer, state: TrainState, step: ScheduledStep, stats: dict[str, torch.Tensor]) -> None: ...

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None: ...

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-able values to save in a checkpoint (default: nothing)."""
        return {}, {}

    def restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        """Take back what :meth:`checkpoint_state` returned, from a checkpoint."""


class Trainer:
    """The model, its weight optimizer, its architect (supernets) and the step functions.

    ``settings`` is the config section that trains the model (``search`` or ``retrain``,
    or a copy with another learning rate for a baseline): ``lr``, ``weight_decay`` and
    ``grad_clip`` are read from it, and a supernet's architect reads the ``arch_*`` fields.
    """

    def __init__(
        self, model: TrainableModel, settings: SearchConfig | RetrainConfig, train: EncodedSplit, seed: int,
        device: torch.device | str = "cpu", precision: str = "fp32", loss: TaskLoss = task_loss,
        fused_optimizer: bool | None = None, compile_step: bool = False, total_steps: int | None = None,
        frozen_cache_mb: float = 0,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.settings = settings
        self.train_split = train
        self.seed = seed
        self.precision = precision
        self.loss = loss
        self.compile_step = compile_step
        self.compute_loss = compiled(loss, self.device) if compile_step and loss.compilable else loss
        self.prompt_length: int | None = getattr(model, "prompt_length", None)  # collate pools for the generators
        self.weights = model.weight_parameters()
        if precision == "fp16":
            keep_fp32(self.weights + model.architecture_parameters())
        # Fused on GPUs: one kernel for all parameters. (The CPU keeps the reference implementation,
        # whose rounding the stored reference results were made with.)
        fused = self.device.type == "cuda" if fused_optimizer is None else fused_optimizer
        # (None for a model with nothing to train, which is only evaluated.)
        self.optimizer = torch.optim.AdamW(self.weights, lr=settings.lr, weight_decay=settings.weight_decay,
                                           fused=fused) if self.weights else None
        self.architect = Architect(self, settings) if model.architecture_parameters() else None
        # fp16: a loss scaler per optimizer, each with its own scale: a gate step between two
        # accumulated weight batches must not rescale the weight gradients waiting there.
        self.scalers: dict[str, torch.amp.GradScaler] = (
            {name: torch.amp.GradScaler(self.device.type) for name in self.optimizers()} if precision == "fp16" else {})
        self.total_steps = total_steps  # for learning-rate schedules
        self.accumulate = settings.gradient_accumulation_steps
        self.frozen_bytes_left = frozen_cache_mb * 2**20  # (runtime.frozen_cache_mb: for all splits together)
        self._frozen: dict[int, tuple[EncodedSplit, FrozenStates | None]] = {}
        distributed.broadcast_parameters(self.weights + (self.architect.params if self.architect else []))

    # ------------------------------------------------------------------ the loop

    def fit(self, steps: Iterable[ScheduledStep], callbacks: list[Callback], state: TrainState | None = None) -> TrainState:
        """Run ``steps`` from ``state`` (a fresh start by default); the bi-level loop of SPT-DARTS."""
        state = state or TrainState()
        for callback in callbacks:
            callback.on_fit_start(self, state)
        for step in steps:
            if state.stop:
                break
            started = time.perf_counter()
            self.schedule_learning_rates(state.step)
            update = (state.step + 1) % self.accumulate == 0 or step.last
            stats = self.weight_step(step.omega, state.step, update)
            if step.arch is not None and self.architect is not None:
                stats.update(self.architect.step(step.arch, state.step))
            state.advance(step)
            state.seconds += time.perf_counter() - started
            for callback in callbacks:
                callback.on_step_end(self, state, step, stats)
        for callback in callbacks:
            callback.on_fit_end(self, state)
        return state

    # ------------------------------------------------------------------ steps

    def schedule_learning_rates(self, step: int) -> None:
        """Set the weights' and the gates' learning rates for ``step`` (``lr_scheduler``, ``warmup_ratio``)."""
        s = self.settings
        if self.total_steps is None or (s.lr_scheduler == "constant" and s.warmup_ratio == 0):
            return
        factor = lr_factor(step, self.total_steps, s.lr_scheduler, s.warmup_ratio)
        optimizers = [(self.optimizer, s.lr)] + ([(self.architect.optimizer, s.arch_lr)] if self.architect else [])
        for optimizer, base in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = base * factor

    def weight_step(self, indices: list[int], step: int, update: bool = True) -> dict[str, torch.Tensor]:
        """The weights' step on the global batch ``indices`` (this rank's share under torchrun):
        gradients of its loss, and (``update``) the optimizer step on what has accumulated."""
        torch.manual_seed(step_seed(self.seed, step, stream=1))
        self.model.train()
        batch, scale = self.local_batch(indices)
        stats: dict[str, torch.Tensor] = {}
        if batch is not None:  # a rank whose share of a small last batch is empty only joins the all-reduce
            inputs = self.loss.inputs(step)
            with self.training(self.weights):
                with self.autocast():
                    terms = self.compute_loss(self.model, batch, *inputs)
                weight = scale / self.accumulate
                loss = terms["loss"] if weight == 1 else terms["loss"] * weight  # (x 1: two kernels for nothing)
                self.scaled(loss, "omega").backward()
            stats = {k: v.detach() for k, v in terms.items()}
        if update:
            self.clip_and_step(self.optimizer, self.weights, self.scalers.get("omega"))
        return stats

    def local_batch(self, indices: list[int]) -> tuple[dict[str, torch.Tensor] | None, float]:
        """This rank's share of a global batch, and the loss weight of that share."""
        local = distributed.shard(indices)
        batch = self.batch(self.train_split, local) if local else None
        return batch, distributed.loss_scale(len(local), len(indices))

    def batch(self, split: EncodedSplit, indices: list[int]) -> dict[str, torch.Tensor]:
        """The examples at ``indices`` of ``split`` collated on the device, with the states below
        the first prompt layer where they are kept (:mod:`search.frozen`)."""
        batch = collate(split, indices, self.device, self.prompt_length, self.weights_dtype)
        frozen = self.frozen_states(split)
        if frozen is not None:
            batch["frozen_states"] = frozen.rows(indices, batch["input_ids"].shape[1])
            batch["frozen_upto"] = frozen.layer
        return batch

    def frozen_states(self, split: EncodedSplit) -> FrozenStates | None:
        """``split``'s states below the lowest layer the model can prompt, computed on first use; None
        for a model without frozen layers below its prompts, or where they exceed what is left of
        ``frozen_cache_mb`` (shared by the splits in the order they are first used: train, dev, test)."""
        if getattr(self.model, "frozen_upto", 0) == 0 or self.frozen_bytes_left <= 0:
            return None
        if id(split) not in self._frozen:  # (the split is kept with its states: its id stays its own)
            kept = FrozenStates.compute(self.model, split, self.device, self.autocast, self.frozen_bytes_left)
            self.frozen_bytes_left -= kept.nbytes if kept is not None else 0
            self._frozen[id(split)] = split, kept
        return self._frozen[id(split)][1]

    @contextlib.contextmanager
    def training(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Weight gradients computed for ``params`` only.

        The caller runs the forward pass under :meth:`autocast` and the backward pass outside
        it: autograd gives each backward operator the dtypes of its forward one, and an
        autocast still in force would cast the gradients of fp32 operators (the generators'
        weight products) to bf16 and back.
        """
        chosen = {id(p) for p in params}
        others = [p for p in self.weights + (self.architect.params if self.architect else []) if id(p) not in chosen]
        for p in others:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in others:
                p.requires_grad_(True)

    @property
    def weights_dtype(self) -> torch.dtype | None:
        """The dtype collate gives the pooling weights: what the matmuls that use them run in."""
        return AUTOCAST_DTYPES.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 or fp16 autocast as ``precision`` says; for fp32 nothing (an outer autocast stays in force)."""
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if dtype is not None:
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def scaled(self, loss: torch.Tensor, optimizer: str) -> torch.Tensor:
        """``loss`` times the loss scale of ``optimizer``'s scaler (fp16), so that small
        gradients do not underflow in the fp16 backward pass; ``loss`` itself otherwise."""
        scaler = self.scalers.get(optimizer)
        return loss if scaler is None else scaler.scale(loss)

    def clip_and_step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                      scaler: torch.amp.GradScaler | None = None) -> None:
        """Average (torchrun), clip and apply the gradients of ``params``; with a ``scaler``
        (fp16), unscale them first, and skip the step where one is inf or nan."""
        distributed.average_gradients(params)  # no-op in a single process
        if scaler is not None and all(p.grad is None for p in params):
            return  # (nothing to apply: the scaler would find no gradient to check)
        if scaler is not None:
            scaler.unscale_(optimizer)  # (clipping sees the true gradients)
        if self.settings.grad_clip > 0:
            clip_gradients(params, self.settings.grad_clip)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)  # skipped where a gradient overflowed; update() then shrinks the scale
            scaler.update()
        if optimizer.defaults.get("fused"):
            # A fused step writes the parameters without bumping their versions, which caches
            # keyed by version (the built PHM weights) rely on.
            torch.autograd.graph.increment_version(params)
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ evaluation

    @torch.inference_mode()
    def predict(self, split: EncodedSplit, batch_size: int, **forward: Any) -> tuple[list[int], list[float]]:
        """Predicted label indices and per-example cross-entropy over ``split``, in order
        (shared out across ranks); ``forward`` goes to the model (e.g. a supernet's ``arch_mask``)."""
        self.model.eval()
        mine = longest_first(split, distributed.shard(range(len(split))))
        local: list[tuple[int, int, float]] = []
        for indices in batch_indices(mine, batch_size):
            batch = self.batch(split, indices)
            with self.autocast():
                logits = self.model(batch, **forward).logits.float()
            losses = nn.functional.cross_entropy(logits, batch["labels"], reduction="none").tolist()
            local.extend(zip(indices, logits.argmax(-1).tolist(), losses))
        results = sorted(distributed.gather_objects(local))
        return [r[1] for r in results], [r[2] for r in results]

    def evaluate(self, split: EncodedSplit, batch_size: int, metric: str, positive_index: int | None = None) -> dict[str, float]:
        predictions, losses = self.predict(split, batch_size)
        loss = sum(losses) / max(1, len(split))
        scores = compute_metrics(split.labels, predictions, metric, positive_index)
        scores["loss"] = loss
        scores["n"] = len(split)
        return scores

    # ------------------------------------------------------------------ state

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers a checkpoint saves, by name."""
        opts = {"omega": self.optimizer} if self.optimizer is not None else {}
        if self.architect is not None:
            opts["arch"] = self.architect.optimizer
        return opts
