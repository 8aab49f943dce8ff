"""Same options, same numbers: today's code against values stored before the refactor and
speed work (``tests/reference/``, made by ``tests/reference/make_reference.py`` at 0c9a67b)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from search.cli import main
from search.selection import read_gate_history

REFERENCE = Path(__file__).resolve().parent / "reference"
sys.path.insert(0, str(REFERENCE))

from make_reference import model_cases, write_search_inputs  # noqa: E402


def test_a_seeded_search_reaches_the_stored_gates(tmp_path, reference_bert):
    """Without dropout (with it, the generators now run for every example of the consistency
    batch and zero the gate where a layer is masked, so dropout draws other random numbers)."""
    config = write_search_inputs(tmp_path, reference_bert, 0.0)
    assert yaml.safe_load(config.read_text())["search"]["lr"] == 1e-3  # every setting spelled out
    run = tmp_path / "run"
    assert main(["search", str(config), "--out", str(run), "--quiet"]) == 0
    expected, got = read_gate_history(REFERENCE / "search-gates-nodropout.csv"), read_gate_history(run / "gates.csv")
    assert [(r["step"], r["epoch"], r["layer"]) for r in got] == [(r["step"], r["epoch"], r["layer"]) for r in expected]
    assert len({r["step"] for r in got}) == 19  # step 0 and 18 search steps
    for a, b in zip(expected, got):
        assert b["alpha"] == pytest.approx(a["alpha"], abs=2e-6), (a, b)


def test_logits_and_gradients_equal_the_stored_reference(reference_bert):
    stored = load_file(str(REFERENCE / "model-reference.safetensors"))
    now = model_cases(reference_bert)
    assert set(stored) <= set(now)
    for name in set(now) - set(stored):  # a generator the pass did not use: no gradient then, a zero one now
        assert ".grad.generators." in name and not now[name].any(), name
    for name, value in stored.items():
        torch.testing.assert_close(now[name], value, atol=1e-5, rtol=1e-5, msg=name)
