"""The mixing equation of docs/method.md §5 in every one of its shortcuts, and the method
variants a plan carries (spt/mixing.py, spt/variants.py, spt/plan.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from spt.config import PromptConfig
from spt.mixing import mix
from spt.plan import make_plan
from spt.variants import AS_GENERATED, ATTENDED, PRESENCE_BIAS, TOKEN_RMS, variants_for


def _paper(slots, fresh, gate, scale, discard):
    """``(1 - lambda g) P^ + g s G``, spelled out (None: P^ = 0, g = 1, s = 1)."""
    g = torch.ones(()) if gate is None else gate
    s = torch.ones(()) if scale is None else scale
    kept = 0 if slots is None else (1 - discard * g) * slots
    return kept + g * s * fresh


@pytest.mark.parametrize(("discard", "with_slots", "gate_kind", "with_scale"),
                         itertools.product((0.0, 1.0), (False, True), ("none", "fixed", "kept", "trained"), (False, True)))
def test_every_shortcut_of_mix_is_the_equation(discard, with_slots, gate_kind, with_scale):
    torch.manual_seed(0)
    slots = torch.randn(3, 2, 4, dtype=torch.float64) if with_slots else None
    fresh = torch.randn(3, 2, 4, dtype=torch.float64)
    scale = torch.rand(3, 1, 1, dtype=torch.float64) + 0.5 if with_scale else None
    gate = None if gate_kind == "none" else torch.rand(3, 1, 1, dtype=torch.float64, requires_grad=gate_kind == "trained")
    keep = 1 - gate if gate_kind == "kept" else None  # made once per pass by mixing_weights
    got = mix(slots, fresh, gate, keep, scale, discard)
    want = _paper(slots, fresh, gate, scale, discard)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if gate_kind == "trained":  # the gate step's lerp: the gate's gradient is the equation's too
        weights = torch.randn_like(want)
        (mine,) = torch.autograd.grad((got * weights).sum(), gate)
        (theirs,) = torch.autograd.grad((want * weights).sum(), gate)
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_variants_are_chosen_from_the_config_and_hard_plans_keep_slots_present():
    assert variants_for(PromptConfig(normalize=False)) == (AS_GENERATED, ATTENDED)
    assert variants_for(PromptConfig(normalize=True, presence_bias=True)) == (TOKEN_RMS, PRESENCE_BIAS)
    assert TOKEN_RMS != AS_GENERATED and PRESENCE_BIAS != ATTENDED
    soft = make_plan(4, [0, 2], [(True,), (True,)], False, 1.0, TOKEN_RMS, PRESENCE_BIAS)
    hard = make_plan(4, [0, 2], [(True,), (True,)], True, 1.0, TOKEN_RMS, PRESENCE_BIAS)
    assert (soft.scale, soft.presence) == (TOKEN_RMS, PRESENCE_BIAS)
    assert (hard.scale, hard.presence) == (TOKEN_RMS, ATTENDED)  # gates of 1: log(pi) = 0, no bias to add
    plain = make_plan(4, [0, 2], [(True,), (True,)], True, 1.0)
    assert (plain.scale, plain.presence) == (AS_GENERATED, ATTENDED)
