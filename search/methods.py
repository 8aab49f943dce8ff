"""The strategies ``spt compare`` runs, by name, with the method each stands for.

Kept apart from :mod:`search.strategies` (which implements them) so that ``spt compare --help``
lists them without loading torch; a test checks that both name the same strategies. (The
selection methods' registry, :data:`search.rankers.RANKERS`, loads no torch itself.)
"""

from __future__ import annotations

STRATEGY_METHODS: dict[str, str] = {
    "spt": "Selective Prompt Tuning: the supernet search, the top-K layers by `select.method` (gates, perturbation, greedy or combined)",
    "first": "a prompt at layer 0 only (prompt tuning)",
    "all": "a prompt at every layer (P-tuning v2 style deep prompts)",
    "middle": "one middle layer (LPT style)",
    "random": "K layers drawn at random (compare.random_draws draws)",
    "exhaustive": "every K-subset trained briefly and scored on dev (the oracle)",
    "optuna": "Optuna sampler over K-subsets, weak trials pruned",
    "peft-prompt": "PEFT prompt tuning (soft tokens at the input)",
    "peft-prefix": "PEFT prefix tuning (keys and values at every layer)",
    "peft-ptuning": "PEFT P-tuning (an MLP prompt encoder; width matched to K generators)",
    "peft-lora": "PEFT LoRA on the attention projections (rank matched to K generators)",
    "adapter": "bottleneck adapters, Houlsby or Pfeiffer (size matched to K generators)",
    "head-only": "the frozen backbone with only the classifier trained (linear probe)",
    "finetune": "every weight trained (the upper reference)",
    "zero-shot": "a template scored by the frozen LM head on label words, nothing trained",
    "in-context": "zero-shot after compare.demonstrations answered training examples",
}


def strategies_help() -> str:
    """One line per strategy: its name and method (for ``spt compare --help``)."""
    width = max(map(len, STRATEGY_METHODS))
    return "\n".join(f"  {name:<{width}}  {method}" for name, method in STRATEGY_METHODS.items())
