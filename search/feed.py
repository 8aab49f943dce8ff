"""Batches for one model, in the precision the run asks for.

:class:`Precision` is the one place that reads ``runtime.precision``: the dtype the frozen
backbone is stored in, the autocast of the forward passes, whether losses are scaled (fp16)
and the fp32 weights of what trains. :class:`Feed` makes a model's batches on its device:
this rank's share of a global batch of the train split (torchrun), any split's examples
collated, with the states below the first prompt layer where they are kept
(:mod:`search.frozen`, ``runtime.frozen_cache_mb``). One feed serves whoever needs batches of
the model: the :class:`~search.trainer.Trainer`, its :class:`~search.architect.Architect` and
the :class:`~search.evaluator.Evaluator`, so the kept states and their budget are shared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from spt.inputs import EncodedSplit, collate
from spt.trainable import TrainableModel

from . import distributed
from .config import RuntimeConfig
from .frozen import FrozenStates
from .sharding import is_sharded

# ``runtime.precision`` -> the dtype of the frozen backbone and of autocast (fp32: no autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """``runtime.precision`` (``fp32``, ``bf16`` or ``fp16``) and what it means for the run."""

    name: str = "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the forward passes autocast to (None: fp32, no autocast); collate gives the
        pooling weights this dtype, what the matmuls that use them run in."""
        return AUTOCAST_DTYPES.get(self.name)

    @property
    def backbone_dtype(self) -> torch.dtype:
        """``bf16``/``fp16``: the frozen backbone is stored in that dtype (no cast per call); what trains stays fp32."""
        return AUTOCAST_DTYPES.get(self.name, torch.float32)

    @property
    def scales_losses(self) -> bool:
        """fp16: the losses are scaled (a ``GradScaler`` per optimizer) so small gradients do not underflow."""
        return self.name == "fp16"

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """bf16 or fp16 autocast; for fp32 nothing (an outer autocast stays in force)."""
        dtype = self.autocast_dtype
        return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """A loss scaler for one optimizer (fp16), None otherwise."""
        return torch.amp.GradScaler(device.type) if self.scales_losses else None

    def keep_fp32(self, params: Iterable[nn.Parameter]) -> None:
        """fp16: store the fp16 ones of ``params`` in fp32 (fp16 training keeps fp32 weights; autocast
        casts them per operation, and a loss scaler refuses to unscale fp16 gradients)."""
        if not self.scales_losses:
            return
        for p in params:
            if p.dtype == torch.float16:
                p.data = p.data.float()


class Feed:
    """The batches of ``model`` (moved to ``device``; under fp16 what trains is kept in fp32).

    ``train`` is the split :meth:`local_batch` draws from (None for a feed that only
    evaluates); ``frozen_cache_mb`` is the memory for the kept states of every split together.
    """

    def __init__(self, model: TrainableModel, train: EncodedSplit | None = None, device: torch.device | str = "cpu",
                 precision: str | Precision = "fp32", frozen_cache_mb: float = 0) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.precision = precision if isinstance(precision, Precision) else Precision(precision)
        self.precision.keep_fp32(model.weight_parameters() + model.architecture_parameters())
        self.train = train
        self.prompt_length: int | None = getattr(model, "prompt_length", None)  # collate pools for the generators
        self.frozen_bytes_left = frozen_cache_mb * 2**20  # (runtime.frozen_cache_mb: for all splits together)
        # runtime.shard: fsdp: every forward pass gathers the backbone's weights from every rank,
        # so every rank runs every pass (search.sharding)
        self.lockstep = is_sharded(model)
        self._frozen: dict[int, tuple[EncodedSplit, FrozenStates | None]] = {}

    @classmethod
    def from_runtime(cls, runtime: RuntimeConfig, device: torch.device | str, model: TrainableModel,
                     train: EncodedSplit | None = None) -> Feed:
        """The feed of ``model`` as the ``runtime`` section says (``precision``, ``frozen_cache_mb``)."""
        return cls(model, train, device, runtime.precision, runtime.frozen_cache_mb)

    def local_batch(self, indices: list[int]) -> tuple[dict[str, torch.Tensor] | None, float]:
        """This rank's share of a global batch of the train split, and the loss weight of that share
        (None for an empty share; in lockstep, the batch's first example weighed 0 instead)."""
        local = distributed.shard(indices)
        if not local and self.lockstep:
            return self.batch(self.train, indices[:1]), 0.0
        batch = self.batch(self.train, local) if local else None
        return batch, distributed.loss_scale(len(local), len(indices))

    def batch(self, split: EncodedSplit, indices: list[int]) -> dict[str, torch.Tensor]:
        """The examples at ``indices`` of ``split`` collated on the device, with the states below
        the first prompt layer where they are kept (:mod:`search.frozen`)."""
        batch = collate(split, indices, self.device, self.prompt_length, self.precision.autocast_dtype)
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

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' autocast on this device (nothing for fp32)."""
        return self.precision.autocast(self.device.type)
