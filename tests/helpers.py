"""Small builders for run configs and data files, and process helpers, used across the search tests."""

from __future__ import annotations

import csv
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spt_env() -> dict[str, str]:
    """The environment of an ``spt`` subprocess: this checkout first on the path, no hub."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def spt_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "search", *map(str, args)]


def logged_steps(run_dir: Path, layers: int) -> int:
    """How many steps ``gates.csv`` holds (0 while it does not exist)."""
    try:
        with open(run_dir / "gates.csv", newline="") as handle:
            return max(0, sum(1 for _ in csv.reader(handle)) - 1) // layers
    except FileNotFoundError:
        return 0


def kill_during_search(command: list[str], run_dir: Path, past_step: int, layers: int = 4,
                       while_running: Callable[[subprocess.Popen], None] | None = None, timeout: float = 120) -> None:
    """Start ``command`` (a search into ``run_dir``, fresh or resumed) and SIGKILL it once it
    has logged gates past ``past_step`` and holds a checkpoint; ``while_running(proc)`` is
    called as soon as it holds the run directory's lock."""
    gates, lock = run_dir / "gates.csv", run_dir / ".spt-lock"
    # A resumed search rewrites the history first (a new file); read the old one's inode before
    # the process starts, or a fast machine rewrites it before we look and the kill never comes.
    old_history = gates.stat().st_ino if gates.exists() else None
    proc = subprocess.Popen(command, env=spt_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout

    def wait_for(condition: Callable[[], bool]) -> None:
        while time.time() < deadline and proc.poll() is None and not condition():
            time.sleep(0.005)

    wait_for(lambda: lock.is_file() and f'"pid": {proc.pid},' in lock.read_text())
    if while_running is not None:
        while_running(proc)
    wait_for(lambda: gates.exists() and gates.stat().st_ino != old_history and logged_steps(run_dir, layers) > past_step + 1
             and (run_dir / "checkpoint.safetensors").exists())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "status.json").exists(), "the search finished before it could be killed"


def assert_same_gates(reference: Path, run: Path) -> None:
    """The gate history and the selected layers of ``run`` are those of ``reference`` (to 1e-6)."""
    import pytest

    from search.selection import read_gate_history, read_mask

    ref_rows, new_rows = read_gate_history(reference / "gates.csv"), read_gate_history(run / "gates.csv")
    assert [(r["step"], r["layer"]) for r in new_rows] == [(r["step"], r["layer"]) for r in ref_rows]
    for a, b in zip(ref_rows, new_rows):
        assert a["alpha"] == pytest.approx(b["alpha"], abs=1e-6)
    assert read_mask(reference / "layer_mask.json").selected_layers == read_mask(run / "layer_mask.json").selected_layers


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, args: list[str], fragment: str) -> str:
    """Run ``spt args``: exit 2 and one ``error:`` line holding ``fragment``; returns the line."""
    from search.cli import main

    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    assert fragment in err[0], err[0]
    return err[0]


def interrupt_checkpointer(monkeypatch, file: str, step: int, saved: bool) -> None:
    """Ctrl-C in the checkpointer of ``file`` at ``step``: after saving (``saved``) or before."""
    from search.callbacks import Checkpointer

    original = Checkpointer.on_step_end

    def on_step_end(self, trainer, state, scheduled, stats):
        hit = self.path.name == file and state.step == step
        if hit and not saved:
            raise KeyboardInterrupt
        original(self, trainer, state, scheduled, stats)
        if hit:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "on_step_end", on_step_end)
