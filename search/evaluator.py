"""Scoring a model on a split: predictions, per-example losses and the task's metrics.

An :class:`Evaluator` takes its batches from the model's :class:`~search.feed.Feed` (the one
its trainer uses, where there is one: the kept frozen states are shared) and builds no
optimizer: dev evaluations during training, the dev passes of layer selection and the
scoring of models that are not trained all go through it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spt.inputs import EncodedSplit, longest_first
from spt.trainable import TrainableModel

from . import distributed
from .feed import Feed
from .metrics import compute_metrics
from .schedule import batch_indices


class Evaluator:
    """Predictions and scores of ``model`` on any split, in batches from ``feed``."""

    def __init__(self, model: TrainableModel, feed: Feed) -> None:
        if feed.model is not model:
            raise ValueError("the feed makes the batches of another model")
        self.model, self.feed = model, feed

    @torch.inference_mode()
    def predict(self, split: EncodedSplit, batch_size: int, **forward: Any) -> tuple[list[int], list[float]]:
        """Predicted label indices and per-example cross-entropy over ``split``, in order
        (shared out across ranks); ``forward`` goes to the model (e.g. a supernet's ``arch_mask``)."""
        self.model.eval()
        mine = longest_first(split, distributed.shard(range(len(split))))
        batches = list(batch_indices(mine, batch_size))
        if self.feed.lockstep:  # every rank runs as many passes as the one with the most examples (extra ones: a stand-in)
            batches += [None] * (-(-distributed.largest_share(len(split)) // batch_size) - len(batches))
        local: list[tuple[int, int, float]] = []
        for indices in batches:
            batch = self.feed.batch(split, indices or [0])
            with self.feed.autocast():
                logits = self.model(batch, **forward).logits.float()
            if indices is None:
                continue
            losses = nn.functional.cross_entropy(logits, batch["labels"], reduction="none").tolist()
            local.extend(zip(indices, logits.argmax(-1).tolist(), losses))
        results = sorted(distributed.gather_objects(local))
        return [r[1] for r in results], [r[2] for r in results]

    def evaluate(self, split: EncodedSplit, batch_size: int, metric: str, positive_index: int | None = None) -> dict[str, float]:
        """``metric`` (and what :func:`~search.metrics.compute_metrics` adds), the mean loss and the
        number of examples of ``split``."""
        predictions, losses = self.predict(split, batch_size)
        loss = sum(losses) / max(1, len(split))
        scores = compute_metrics(split.labels, predictions, metric, positive_index)
        scores["loss"] = loss
        scores["n"] = len(split)
        return scores
