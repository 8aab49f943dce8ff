"""Task metrics (scores in [0, 1] except MCC in [-1, 1]); higher is better for all."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def compute_metrics(
    labels: Sequence[int], predictions: Sequence[int], metric: str, positive_index: int | None = None
) -> dict[str, float]:
    """The primary ``metric`` plus accuracy and macro-F1 for context."""
    scores = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }
    if metric == "f1":
        scores["f1"] = float(f1_score(labels, predictions, pos_label=positive_index, average="binary", zero_division=0))
    elif metric == "mcc":
        scores["mcc"] = float(matthews_corrcoef(labels, predictions))
    return scores
