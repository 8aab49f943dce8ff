"""torchrun: a 2-process gloo search gives the gates of one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config

from search.selection import read_gate_history

REPO = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path, tiny_bert):
    # Dropout off: each rank draws dropout for its own shard, so with dropout on the two
    # runs agree in distribution only. Everything else (split, masks, init) is shared.
    config = tiny_config(tmp_path, tiny_bert, n_train=26, prompt={"dropout": 0.0}, head={"dropout": 0.0},
                         search={"epochs": 2, "batch_size": 5}, retrain={"epochs": 1, "batch_size": 5})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "search", "run", str(config), "--out", str(single), "--quiet"],
                   check=True, env=env, capture_output=True)
    double = tmp_path / "double"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
         "-m", "search", "run", str(config), "--out", str(double), "--quiet"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_gate_history(single / "gates.csv"), read_gate_history(double / "gates.csv")
    assert [(r["step"], r["layer"]) for r in one] == [(r["step"], r["layer"]) for r in two]
    assert len({r["step"] for r in one}) == 1 + 2 * 3  # 13 D1 examples in batches of 5 (the last uneven), 2 epochs
    for a, b in zip(one, two):
        assert a["alpha"] == pytest.approx(b["alpha"], abs=1e-5)
    import json

    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (single, double))
    assert m1["dev"]["accuracy"] == m2["dev"]["accuracy"] and m1["dev"]["loss"] == pytest.approx(m2["dev"]["loss"], abs=1e-5)
    assert m1["test"]["loss"] == pytest.approx(m2["test"]["loss"], abs=1e-5)
    # only rank 0 wrote: one log, one config, no stray files
    assert sorted(p.name for p in double.iterdir()) == sorted(p.name for p in single.iterdir())
