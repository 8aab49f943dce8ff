"""torchrun: 2-process gloo runs give the gates and losses of one process on the same global batch,
with every rank holding the whole backbone (data parallelism) or half of it (``runtime.shard: fsdp``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, interrupt_checkpointer, tiny_config, write_sentiment_tsv

from search.cli import main
from search.selection import read_gate_history
from search.sharding import shard_backbone
from spt.backbone import load_backbone
from spt.errors import UserError
from spt.model import SparsePromptModel

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_bert) -> tuple[Path, Path]:
    """A config and its run in one process: the reference of the torchrun runs.

    Dropout off: each rank draws dropout for its own shard, so with dropout on the runs agree in
    distribution only. Everything else (split, masks, init) is shared. 13 D1 examples in batches of
    4: the last batch of each epoch is one example, and rank 1's share of it is empty; 9 dev examples
    in batches of 4: rank 0 scores 5 (two batches), rank 1 scores 4 (one); the dev passes of
    perturbation selection go through the same sharing. No prompt below layer 1: the states
    entering it are kept per example (search.frozen). The retraining starts from the supernet's
    generators (loaded onto the run's backbone).
    """
    tmp = tmp_path_factory.mktemp("distributed")
    config = tiny_config(tmp, tiny_bert, n_train=26, prompt={"dropout": 0.0, "candidate_layers": [1, 2, 3]}, head={"dropout": 0.0},
                         search={"epochs": 2, "batch_size": 4, "eval_batch_size": 4},
                         select={"method": "perturbation"}, retrain={"epochs": 1, "batch_size": 5, "init_from_supernet": True})
    write_sentiment_tsv(tmp / "data" / "dev.tsv", 9, seed=2)
    assert main(["run", str(config), "--out", str(tmp / "single"), "--quiet"]) == 0
    return config, tmp / "single"


def _torchrun(config: Path, out: Path, *options: str) -> None:
    """``spt run`` in two gloo processes under torchrun (a hanging collective fails at the timeout)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "search", "run", str(config), "--out", str(out), "--quiet", *options],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr  # (no rank aborted at teardown)


def _assert_same_run(single: Path, double: Path) -> None:
    """The gates, dev and test scores of ``double`` are those of ``single``, and only rank 0 wrote."""
    one, two = read_gate_history(single / "gates.csv"), read_gate_history(double / "gates.csv")
    assert [(r["step"], r["layer"]) for r in one] == [(r["step"], r["layer"]) for r in two]
    assert len({r["step"] for r in one}) == 1 + 2 * 4  # 2 epochs of 4 batches (3 of 4 examples, 1 of 1)
    for a, b in zip(one, two):
        assert a["alpha"] == pytest.approx(b["alpha"], abs=1e-5)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (single, double))
    assert m1["selected_layers"] == m2["selected_layers"]
    assert m1["dev"]["accuracy"] == m2["dev"]["accuracy"] and m1["dev"]["loss"] == pytest.approx(m2["dev"]["loss"], abs=1e-5)
    assert m1["test"]["loss"] == pytest.approx(m2["test"]["loss"], abs=1e-5)
    # only rank 0 wrote: one log, one config, no stray files
    assert sorted(p.name for p in double.iterdir()) == sorted(p.name for p in single.iterdir())


def test_two_gloo_processes_match_one_process(one_process):
    config, single = one_process
    double = config.parent / "double"
    _torchrun(config, double)
    _assert_same_run(single, double)


def test_fsdp_halves_each_ranks_backbone_and_matches_one_process(one_process, monkeypatch):
    """``runtime.shard: fsdp``: each rank holds half the backbone's parameter bytes; with activation
    checkpointing, resumed from a one-process checkpoint (checkpoints hold no backbone), the same
    gates and scores; its saved model loads in one process and predicts what the one-process one does."""
    config, single = one_process
    sharded = config.parent / "fsdp"
    with monkeypatch.context() as patch:
        interrupt_checkpointer(patch, "checkpoint.safetensors", step=4, saved=True)
        assert main(["run", str(config), "--out", str(sharded), "--quiet"]) == 130
    _torchrun(config, sharded, "--set", "runtime.shard=fsdp", "--set", "runtime.activation_checkpointing=prompted")
    log = (sharded / "log.txt").read_text()
    assert "resuming the search from step 4" in log
    *held, whole = map(int, re.search(r"backbone parameter bytes held per rank: \[(\d+), (\d+)\] of (\d+)", log).groups())
    assert held == [pytest.approx(whole / 2, rel=0.01)] * 2  # (FSDP pads a shard by a row at most)
    _assert_same_run(single, sharded)

    texts = ["a great film , really fun .", "the worst movie , so boring and dull", ("it is not bad", "i love it")]
    one, two = (SparsePromptModel.from_pretrained(run / "sparse").predict(texts) for run in (single, sharded))
    for a, b in zip(one, two):
        assert a["label"] == b["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_fsdp_is_refused_where_it_cannot_run(tmp_path, tiny_bert, capsys):
    """One line naming runtime.shard and the fix, exit 2, no run directory."""
    config = str(tiny_config(tmp_path, tiny_bert))
    cases = {
        "runtime.shard=fsdp": "this is one process; run under torchrun",
        "runtime.compile=step": "does not combine with runtime.compile: step",
        "model.quantize=int8": "cannot split a quantized backbone",
    }
    for setting, problem in cases.items():
        extra = [] if setting == "runtime.shard=fsdp" else ["--set", setting]
        assert main(["run", config, "--out", str(tmp_path / "run"), "--quiet", "--set", "runtime.shard=fsdp", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: runtime.shard: fsdp") and problem in err[0], err
        assert not (tmp_path / "run").exists()


def test_a_backbone_with_integer_weights_is_not_sharded(tiny_bert):
    """Whatever quantized it (model.quantize is refused before loading), FSDP is not given int weights."""
    backbone = load_backbone(str(tiny_bert))
    dense = backbone.layers[0].output.dense
    dense.weight = torch.nn.Parameter(dense.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(UserError, match=r"runtime.shard: fsdp cannot split a quantized backbone \(it holds torch.int8"):
        shard_backbone(backbone, torch.device("cpu"))
