"""Small builders for run configs and data files used across the search tests."""

from __future__ import annotations

import random
from pathlib import Path

import yaml

POSITIVE = ["a great film", "really fun and good", "i love this story", "the best movie", "good acting , great plot"]
NEGATIVE = ["a terrible film", "so boring and dull", "i hate this plot", "the worst movie", "bad acting , dull story"]


def write_sentiment_tsv(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for i in range(n):
        label = i % 2
        text = rng.choice(POSITIVE if label else NEGATIVE) + " " + rng.choice(["", "too", "very", "really"])
        lines.append(f"{text.strip()}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(tmp_path: Path, model_dir: Path, n_train: int = 24, **sections) -> Path:
    """A complete run config on a tiny model and generated TSV data; returns its path."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    write_sentiment_tsv(data / "train.tsv", n_train, seed=1)
    write_sentiment_tsv(data / "dev.tsv", 8, seed=2)
    write_sentiment_tsv(data / "test.tsv", 8, seed=3)
    config = {
        "seed": 7,
        "model": {"backbone": str(model_dir), "max_length": 32},
        "prompt": {"length": 3, "bottleneck": 8, "phm_n": 2, "dropout": 0.1},
        "head": {"type": "classifier", "pooling": "cls"},
        "task": {
            "name": "toy", "format": "tsv", "data_dir": str(data), "train": "train.tsv", "dev": "dev.tsv",
            "test": "test.tsv", "text_a": "sentence", "label": "label", "labels": ["0", "1"],
        },
        "search": {"epochs": 2, "batch_size": 4, "eval_batch_size": 8, "checkpoint_every": 2},
        "select": {"k": 2},
        "retrain": {"epochs": 1, "batch_size": 4},
        "runtime": {"progress": False, "threads": 1},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
