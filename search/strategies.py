"""Search strategies behind one interface.

A *mask strategy* proposes layer masks (and says what compute it spent finding them);
the sparse model of each mask is then trained by the shared trainer. A *model strategy*
(the PEFT methods, adapters, head-only, full fine-tuning) builds a model that the same
trainer trains; the prompting strategies (zero-shot, in-context) only score theirs.
Every result goes through the same :class:`ResultRow`. The strategies and the method each
stands for are listed in :data:`search.methods.STRATEGY_METHODS`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spt.backbone import FAMILIES
from spt.errors import UserError
from spt.heads import build_head, head_parameter_count

from . import prompting
from .baselines import PEFT_METHODS, FrozenModel, build_baseline, check_quantized
from .config import RetrainConfig
from .methods import STRATEGY_METHODS
from .pipeline import (
    Prepared,
    SearchResult,
    TrainResult,
    build_sparse,
    evaluate_model,
    per_generator,
    run_search,
    select_from_run,
    train_and_evaluate,
)
from .runs import RunDir
from .schedule import steps_per_epoch
from .selection import LayerMask, Ranking, rank_layers, select_layers

logger = logging.getLogger("spt")


@dataclass
class Compute:
    """What finding a mask cost: optimizer steps (generator and gate steps alike) and wall time."""

    steps: int = 0
    seconds: float = 0.0

    def add(self, steps: int, seconds: float) -> None:
        self.steps += steps
        self.seconds += seconds


@dataclass
class Proposal:
    """A layer mask proposed by a strategy, its search compute, and strategy-specific details."""

    mask: LayerMask
    compute: Compute
    label: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What a strategy may use besides the prepared task."""

    k: int
    workdir: Path
    progress: bool = False
    score_test: bool = False  # exhaustive/optuna: also score test for each trial (the benchmark's oracle)
    run: RunDir | None = None  # the comparison's run directory, whose manifest records what strategies write

    def folder(self, name: str) -> Path:
        """A folder in ``workdir`` for a strategy's files (recorded in the run's manifest)."""
        return self.run.file(name) if self.run is not None else self.workdir / name


def _mask(prep: Prepared, layers: list[int], scores: list[float] | None = None, method: str = "fixed") -> LayerMask:
    """A layer mask over the config's candidate layers holding exactly ``layers``."""
    config, backbone = prep.config, prep.backbone
    candidates = config.prompt.candidates(backbone.num_layers)
    if scores is None:
        scores = [1.0 if c in layers else 0.0 for c in candidates]
    order = sorted(layers) + [c for c in rank_layers(candidates, scores) if c not in layers]
    return select_layers(
        backbone=config.model.backbone, num_layers=backbone.num_layers, candidates=candidates,
        ranking=Ranking(method, scores, [0.0] * len(candidates), order), k=len(layers), budget=None,
        per_generator=per_generator(prep.config, prep.backbone),
        head_params=head_parameter_count(config.head.type, backbone.hidden_size, len(prep.data.labels)),
        prompt_length=config.prompt.length, task=config.task.name, seed=config.seed,
    )


@dataclass
class ResultRow:
    """One trained result of a strategy at one seed: a row of ``compare.csv`` and of the benchmarks."""

    strategy: str
    seed: int
    draw: str
    layers: list[int] | str  # the selected layers, or "-" for a baseline without a layer mask
    dev: float
    test: float
    trainable_params: int
    search_steps: int
    search_seconds: float
    train_steps: int
    train_seconds: float
    note: str = ""
    scores: list[float] | None = None  # the strategy's per-layer scores (gates for spt)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def strategy_results(strategy: Strategy, prep: Prepared, ctx: Context, done: set[str] = frozenset(),
                     on_proposal: Callable[[Proposal], None] | None = None) -> Iterator[ResultRow]:
    """Train every result of ``strategy`` at ``prep``'s seed the same way and yield one row each.

    Mask strategies propose layer masks whose sparse models are trained with the
    ``retrain`` settings; model strategies (PEFT, fine-tuning) build a model trained with
    their own learning rate. Results whose label is in ``done`` are skipped (a resumed
    comparison); ``on_proposal`` sees each mask before its model is trained.
    """
    if strategy.produces_mask:
        for proposal in strategy.propose(prep, ctx):
            if proposal.label in done:
                continue
            if on_proposal is not None:
                on_proposal(proposal)
            yield train_proposal(prep, strategy.name, proposal, ctx)
    elif "" not in done:
        result, note = strategy.outcome(prep, ctx)
        yield _row(strategy.name, prep.config.seed, "", "-", result, prep.config.task.metric, Compute(), note=note)


def train_proposal(prep: Prepared, strategy: str, proposal: Proposal, ctx: Context,
                   on_eval: Callable[[int, float], None] | None = None) -> ResultRow:
    """Train the sparse model of ``proposal``'s mask with the ``retrain`` settings; its row.

    ``on_eval(step, dev_score)`` sees every dev evaluation (the benchmark keeps the curve).
    """
    model = build_sparse(prep, proposal.mask.selected_layers)
    result = train_and_evaluate(prep, model, prep.config.retrain, progress=ctx.progress, desc=f"{strategy} s{prep.config.seed}",
                                on_eval=on_eval)
    return _row(strategy, prep.config.seed, proposal.label, proposal.mask.selected_layers, result, prep.config.task.metric,
                proposal.compute, scores=proposal.mask.scores)


def fixed_proposal(prep: Prepared, layers: list[int], label: str = "") -> Proposal:
    """A proposal of exactly ``layers`` that cost no search."""
    return Proposal(_mask(prep, layers), Compute(), label=label)


def _row(strategy: str, seed: int, label: str, layers: list[int] | str, result, metric: str, compute: Compute,
         note: str = "", scores: list[float] | None = None) -> ResultRow:
    return ResultRow(
        strategy=strategy, seed=seed, draw=label, layers=layers, dev=round(result.dev[metric], 6),
        test=round(result.test[metric], 6), trainable_params=result.trainable_params, search_steps=compute.steps,
        search_seconds=round(compute.seconds, 3), train_steps=result.steps, train_seconds=round(result.seconds, 3),
        note=note, scores=scores,
    )


def trial_settings(prep: Prepared) -> RetrainConfig:
    """The short sparse training that scores one subset (exhaustive, optuna)."""
    epochs = prep.config.compare.trial_epochs or prep.config.retrain.epochs
    return dataclasses.replace(prep.config.retrain, epochs=epochs)


def score_subset(prep: Prepared, layers: list[int], ctx: Context, on_eval: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train the sparse model of ``layers`` briefly; its dev (and optionally test) score."""
    result = train_and_evaluate(prep, build_sparse(prep, layers), trial_settings(prep), progress=False,
                                evaluate_test=ctx.score_test, on_eval=on_eval)
    metric = prep.config.task.metric
    return {"layers": layers, "dev": result.dev[metric], "test": result.test.get(metric), "steps": result.steps,
            "seconds": result.seconds}


class Strategy:
    """Base class: ``propose`` for mask strategies, ``build_model`` (or ``outcome``) for model strategies."""

    name = ""
    produces_mask = True

    @property
    def method(self) -> str:
        """The method this strategy stands for (``search.methods``)."""
        return STRATEGY_METHODS[self.name]

    def check(self, prep: Prepared, ctx: Context) -> None:
        """Refuse, before any work starts, a setting this strategy cannot run."""

    def labels(self, prep: Prepared) -> list[str]:
        """The labels of the results this strategy produces per seed (``random``: one per draw)."""
        return [""]

    def propose(self, prep: Prepared, ctx: Context) -> list[Proposal]:
        raise NotImplementedError

    def build_model(self, prep: Prepared, ctx: Context):
        raise NotImplementedError

    def train_settings(self, prep: Prepared) -> RetrainConfig:
        return prep.config.retrain

    def outcome(self, prep: Prepared, ctx: Context) -> tuple[TrainResult, str]:
        """A model strategy's result at ``prep``'s seed and its note: the model trained as
        ``train_settings`` say, then scored; the note counts the method's own parameters."""
        model = self.build_model(prep, ctx)
        head = sum(p.numel() for p in model.head.parameters())
        result = train_and_evaluate(prep, model, self.train_settings(prep), progress=ctx.progress,
                                    desc=f"{self.name} s{prep.config.seed}")
        return result, f"{result.trainable_params - head:,} method params"


class SptStrategy(Strategy):
    name = "spt"

    def propose(self, prep: Prepared, ctx: Context) -> list[Proposal]:
        run = RunDir(ctx.folder(f"spt-seed{prep.config.seed}"))
        run.path.mkdir(parents=True, exist_ok=True)
        if run.done("search"):  # an interrupted comparison: the search itself had finished
            done = run.status()["search"]
            result = SearchResult(done["alphas"], done["steps"], done["seconds"], len(prep.train))
        else:
            result = run_search(prep, run, progress=ctx.progress)
        mask = select_from_run(run, prep, k=ctx.k, progress=ctx.progress)
        # A search step is a generator step plus, after the warm-up epochs, a gate step.
        s = prep.config.search
        arch_steps = max(0, result.steps - s.warmup * steps_per_epoch(len(prep.train), s.batch_size))
        return [Proposal(mask, Compute(result.steps + arch_steps, result.seconds), details={"alphas": result.alphas})]


class FixedStrategy(Strategy):
    """A hand-picked layer set: ``first``, ``all`` or ``middle``."""

    def __init__(self, name: str, pick: Callable[[list[int], int], list[int]]) -> None:
        self.name = name
        self._pick = pick

    def propose(self, prep: Prepared, ctx: Context) -> list[Proposal]:
        candidates = prep.config.prompt.candidates(prep.backbone.num_layers)
        return [fixed_proposal(prep, self._pick(candidates, prep.backbone.num_layers))]


class RandomStrategy(Strategy):
    name = "random"

    def labels(self, prep: Prepared) -> list[str]:
        return [f"draw{d}" for d in range(prep.config.compare.random_draws)]

    def propose(self, prep: Prepared, ctx: Context) -> list[Proposal]:
        candidates = prep.config.prompt.candidates(prep.backbone.num_layers)
        proposals = []
        for draw in range(prep.config.compare.random_draws):
            rng = random.Random(prep.config.seed * 1_000 + draw)
            proposals.append(fixed_proposal(prep, sorted(rng.sample(candidates, ctx.k)), label=self.labels(prep)[draw]))
        return proposals


class ExhaustiveStrategy(Strategy):
    name = "exhaustive"

    def check(self, prep: Prepared, ctx: Context) -> None:
        candidates = prep.config.prompt.candidates(prep.backbone.num_layers)
        count = math.comb(len(candidates), ctx.k)
        limit = prep.config.compare.exhaustive_limit
        if count > limit:
            raise UserError(
                f"strategy exhaustive: {count} subsets of {ctx.k} among {len(candidates)} layers exceed "
                f"compare.exhaustive_limit={limit}; raise it with --set compare.exhaustive_limit={count}"
            )

    def propose(self, prep: Prepared, ctx: Context) -> list[Proposal]:
        self.check(prep, ctx)
        candidates = prep.config.prompt.candidates(prep.backbone.num_layers)
        count = math.comb(len(candidates), ctx.k)
        compute, trials = Compute(), []
        for number, subset in enumerate(itertools.combinations(candidates, ctx.k), start=1):
            trial = score_subset(prep, list(subset), ctx)
            compute.add(trial["steps"], trial["seconds"])
            trials.append(trial)
            logger.info("exhaustive %d/%d: layers %s dev %.4f", number, count, list(subset), trial["dev"])
        best = max(trials, key=lambda t: t["dev"])  # first (lowest layers) wins ties
        scores = [max(t["dev"] for t in trials if c in t["layers"]) for c in candidates]
        mask = _mask(prep, best["layers"], [round(s, 6) for s in scores], "exhaustive")
        return [Proposal(mask, compute, details={"trials": trials})]


def make_sampler(name: str, seed: int, field: str = "compare.optuna_sampler"):
    import optuna

    seed %= 2**32  # Optuna's samplers take [0, 2**32); spt hpo adds the process id to the config's seed
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
    }
    if name not in samplers:
        raise UserError(field, f"unknown sampler {name!r}; choose one of {', '.join(samplers)}")
    return samplers[name]()


class OptunaStrategy(Strategy):
    """Black-box search over K-subsets: each trial scores one subset with a short training.

    A trial suggests a weight per candidate layer and keeps the top-K: a relaxation every
    sampler handles. Subsets already scored are answered from a cache, so no subset is
    trained twice; intermediate dev scores feed the pruner.
    """

    name = "optuna"

    def check(self, prep: Prepared, ctx: Context) -> None:
        make_sampler(prep.config.compare.optuna_sampler, 0)

    def propose(self, prep: Prepared, ctx: Context) -> list[Proposal]:
        import optuna

        cfg = prep.config.compare
        candidates = prep.config.prompt.candidates(prep.backbone.num_layers)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0) if cfg.optuna_pruner == "median" else optuna.pruners.NopPruner()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=make_sampler(cfg.optuna_sampler, prep.config.seed), pruner=pruner)
        compute, scored, pruned = Compute(), {}, 0

        def objective(trial: optuna.Trial) -> float:
            nonlocal pruned
            weights = [trial.suggest_float(f"layer_{c}", 0.0, 1.0) for c in candidates]
            subset = tuple(sorted(c for _, c in sorted(zip(weights, candidates), key=lambda t: (-t[0], t[1]))[: ctx.k]))
            trial.set_user_attr("layers", list(subset))
            if subset in scored:
                return scored[subset]["dev"]
            started = time.perf_counter()
            steps_done = {"n": 0}

            def report(step: int, dev: float) -> None:
                steps_done["n"] = step
                trial.report(dev, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            try:
                result = score_subset(prep, list(subset), ctx, on_eval=report)
            except optuna.TrialPruned:
                pruned += 1
                compute.add(steps_done["n"], time.perf_counter() - started)
                raise
            compute.add(result["steps"], result["seconds"])
            scored[subset] = result
            return result["dev"]

        study.optimize(objective, n_trials=cfg.optuna_trials)
        if not scored:
            raise UserError("strategy optuna", "every trial was pruned; raise compare.optuna_trials or set compare.optuna_pruner: none")
        best = max(scored.values(), key=lambda t: t["dev"])
        scores = [round(max([t["dev"] for t in scored.values() if c in t["layers"]] + [0.0]), 6) for c in candidates]
        mask = _mask(prep, best["layers"], scores, "optuna")
        return [Proposal(mask, compute, details={"trials": list(scored.values()), "pruned": pruned})]


class BaselineStrategy(Strategy):
    """A PEFT method, bottleneck adapters or full fine-tuning, trained like the sparse model."""

    produces_mask = False

    def __init__(self, name: str) -> None:
        self.name = name

    def check(self, prep: Prepared, ctx: Context) -> None:
        if prep.config.head.type != "classifier":
            raise UserError(f"strategy {self.name}", "baselines use the classifier head; set head.type: classifier")
        if self.name == "peft-prefix" and not FAMILIES[prep.backbone.config.model_type].peft_prefix:
            raise UserError(
                f"strategy peft-prefix: PEFT prefix tuning cannot serve {prep.backbone.config.model_type} backbones "
                f"({prep.backbone.name}): the attention's relative position bias does not cover prefix keys; "
                "leave peft-prefix out for this backbone"
            )
        check_quantized(self.name, prep.config.model.quantize)
        if self.name in PEFT_METHODS:
            try:
                import peft  # noqa: F401
            except ImportError:
                raise UserError(f"strategy {self.name}", "needs the peft package: pip install 'peft>=0.13' (the peft extra of spt-search)") from None

    def build_model(self, prep: Prepared, ctx: Context):
        config = prep.config
        self.check(prep, ctx)
        return build_baseline(
            self.name, config.model.backbone, len(prep.data.labels), config.head.pooling_for(prep.backbone.is_decoder),
            config.head.dropout, config.prompt.length, target_params=ctx.k * per_generator(prep.config, prep.backbone),
            lora_r=config.compare.lora_r, ptuning_hidden=config.compare.ptuning_hidden,
            adapter_kind=config.compare.adapter_kind, adapter_size=config.compare.adapter_size,
            quantize=config.model.quantize,
        )

    def train_settings(self, prep: Prepared) -> RetrainConfig:
        lr = prep.config.compare.finetune_lr if self.name == "finetune" else prep.config.compare.peft_lr
        return dataclasses.replace(prep.config.retrain, lr=lr)


class HeadOnlyStrategy(BaselineStrategy):
    """The frozen backbone with only the classifier head trained (a linear probe)."""

    def __init__(self) -> None:
        super().__init__("head-only")

    def build_model(self, prep: Prepared, ctx: Context) -> FrozenModel:
        self.check(prep, ctx)
        torch.manual_seed(prep.config.seed)
        return FrozenModel(prep.backbone, build_head(prep.backbone, prep.config.head, prep.data.labels))


class PromptingStrategy(Strategy):
    """Zero-shot (no demonstrations) or in-context prompting: a frozen LM scored, nothing trained."""

    produces_mask = False

    def __init__(self, name: str, in_context: bool) -> None:
        self.name = name
        self.in_context = in_context

    def check(self, prep: Prepared, ctx: Context) -> None:
        prompting.verbalizer_config(prep, prompting.lm_backbone(prep, self.name), self.name)

    def outcome(self, prep: Prepared, ctx: Context) -> tuple[TrainResult, str]:
        count = prep.config.compare.demonstrations if self.in_context else 0
        scored, model = prompting.prompted(prep, self.name, count)
        return evaluate_model(scored, model), prompting.demonstrations_note(scored, count)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        SptStrategy(),
        FixedStrategy("first", lambda cands, L: [cands[0]]),
        FixedStrategy("all", lambda cands, L: list(cands)),
        FixedStrategy("middle", lambda cands, L: [min(cands, key=lambda c: (abs(c - L // 2), c))]),
        RandomStrategy(),
        ExhaustiveStrategy(),
        OptunaStrategy(),
        *[BaselineStrategy(name) for name in (*PEFT_METHODS, "adapter")],
        HeadOnlyStrategy(),
        BaselineStrategy("finetune"),
        PromptingStrategy("zero-shot", in_context=False),
        PromptingStrategy("in-context", in_context=True),
    ]
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise UserError("--strategies", f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
