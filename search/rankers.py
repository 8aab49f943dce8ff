"""Selection methods: how the candidate layers of a finished search are ranked.

One registry, :data:`RANKERS` (name -> class), like Optuna's samplers: ``select.method``,
``spt select --method``, the docs and the quality benchmark read its keys. A ranker sees
:class:`Evidence` - the gates as the search left them and, for the methods that need it, a
function that scores the searched supernet on dev under a layer mask - and returns a
:class:`search.selection.Ranking`. A new method is one class here.

This module loads no torch (the CLI lists the names in its help); the arithmetic lives in
:mod:`search.selection` and is imported when a ranker runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .selection import Ranking

# dev_loss(mask, hard): per-example dev losses of the supernet with gates ``mask`` over the
# candidates (None: every gate as searched); ``hard``: the mask itself as gate values.
DevLoss = Callable[[list[float] | None, bool], list[float]]


@dataclass
class Evidence:
    """What a ranker may read: the candidates, their gate ranking, the dev scorer (None for
    rankers that make no dev pass), the seed for bootstraps, and how many greedy rounds."""

    candidates: list[int]
    gates: Ranking
    dev_loss: DevLoss | None
    seed: int
    rounds: int


class Ranker:
    """A selection method: ``rank`` orders the candidates; ``dev_passes`` says how many dev
    passes it makes (0: it reads the gates only), which its progress bar counts."""

    name: ClassVar[str]

    def dev_passes(self, candidates: int, rounds: int) -> int:
        return 0

    def rank(self, evidence: Evidence) -> Ranking:
        raise NotImplementedError


class GatesRanker(Ranker):
    """By the gate ``alpha`` averaged over ``select.average_last`` logged steps."""

    name = "gates"

    def rank(self, evidence: Evidence) -> Ranking:
        return evidence.gates


class PerturbationRanker(Ranker):
    """By how much the supernet's dev loss rises when the layer's prompt is removed."""

    name = "perturbation"

    def dev_passes(self, candidates: int, rounds: int) -> int:
        return 1 + candidates  # every gate, then each layer removed

    def rank(self, evidence: Evidence) -> Ranking:
        from .selection import removal_ranking

        c, loss = evidence.candidates, evidence.dev_loss
        full = loss(None, False)
        without = [loss([float(i != j) for i in c], False) for j in c]
        return removal_ranking(c, full, without, evidence.seed)


class GreedyRanker(Ranker):
    """Layers added one by one, each the one that lowers the dev loss most with the chosen
    ones kept, for ``evidence.rounds`` rounds."""

    name = "greedy"

    def dev_passes(self, candidates: int, rounds: int) -> int:
        return 1 + sum(candidates - r for r in range(rounds))  # no prompt, then each layer left per round

    def rank(self, evidence: Evidence) -> Ranking:
        from .selection import greedy_ranking

        c, loss = evidence.candidates, evidence.dev_loss
        return greedy_ranking(c, lambda chosen: loss([float(i in chosen) for i in c], True), evidence.seed, evidence.rounds)


class CombinedRanker(PerturbationRanker):
    """The mean of a layer's rank by gates and by perturbation."""

    name = "combined"

    def rank(self, evidence: Evidence) -> Ranking:
        from .selection import combined_ranking

        return combined_ranking(evidence.candidates, evidence.gates, super().rank(evidence))


RANKERS: dict[str, type[Ranker]] = {cls.name: cls for cls in (GatesRanker, PerturbationRanker, GreedyRanker, CombinedRanker)}
