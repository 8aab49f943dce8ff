"""Which examples each step sees: seeded epoch orders and the D1/D2 split of the search.

Every epoch's order comes from ``(seed, epoch)`` and every step reseeds from
``(seed, step)``, so a run resumed from a checkpoint takes exactly the steps an
uninterrupted run takes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct, reproducible seed for each (seed, step, stream)."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(step_seed(seed, epoch, stream=17)).shuffle(order)
    return order


def batch_indices(indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), batch_size):
        yield list(indices[start : start + batch_size])


@dataclass(frozen=True)
class ScheduledStep:
    """One step: a D1 (weight) batch and, in search epochs, a D2 (architecture) batch."""

    epoch: int
    index: int  # position within the epoch
    omega: list[int]
    arch: list[int] | None
    last: bool  # the epoch's final step


def _d1_size(n_train: int, d1_fraction: float) -> int:
    return min(n_train - 1, max(1, round(d1_fraction * n_train)))


def search_schedule(n_train: int, warmup_epochs: int, batch_size: int, d1_fraction: float, seed: int, epoch: int,
                    arch_batches: int = 1) -> list[ScheduledStep]:
    """The steps of one search epoch: warm-up epochs use all of train for the weights only;
    later epochs split a fresh shuffle into D1 (weights) and D2 (gates, ``arch_batches``
    batches at a time), cycling D2 as needed."""
    order = epoch_order(n_train, seed, epoch)
    if epoch < warmup_epochs:
        return _steps(epoch, list(batch_indices(order, batch_size)))
    n1 = _d1_size(n_train, d1_fraction)
    d1_batches = list(batch_indices(order[:n1], batch_size))
    d2_batches = list(batch_indices(order[n1:], batch_size * arch_batches))
    return _steps(epoch, d1_batches, [d2_batches[i % len(d2_batches)] for i in range(len(d1_batches))])


def plain_schedule(n_train: int, batch_size: int, seed: int, epoch: int) -> list[ScheduledStep]:
    """The steps of one training epoch over the whole training set."""
    return _steps(epoch, list(batch_indices(epoch_order(n_train, seed, epoch), batch_size)))


def _steps(epoch: int, omega: list[list[int]], arch: list[list[int]] | None = None) -> list[ScheduledStep]:
    last = len(omega) - 1
    return [ScheduledStep(epoch, i, b, arch[i] if arch else None, i == last) for i, b in enumerate(omega)]


def steps_per_epoch(n_train: int, batch_size: int, d1_fraction: float | None = None) -> int:
    """Steps of a plain epoch, or (``d1_fraction`` given) of a search epoch."""
    n = n_train if d1_fraction is None else _d1_size(n_train, d1_fraction)
    return math.ceil(n / batch_size)


def steps_from(schedule_for_epoch: Callable[[int], list[ScheduledStep]], epochs: int, epoch: int = 0, batch_in_epoch: int = 0) -> Iterator[ScheduledStep]:
    """The steps from ``(epoch, batch_in_epoch)`` on (skipping what a checkpoint already covers)."""
    for e in range(epoch, epochs):
        steps = schedule_for_epoch(e)
        yield from steps[batch_in_epoch if e == epoch else 0 :]


def lr_factor(step: int, total: int, scheduler: str, warmup_ratio: float) -> float:
    """The learning-rate multiplier at ``step`` of ``total``: linear warm-up over
    ``warmup_ratio`` of the steps, then constant, linear decay to 0 or a cosine to 0.
    A pure function of the step, so a resumed run needs no scheduler state."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) if scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
