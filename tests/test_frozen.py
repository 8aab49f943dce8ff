"""The states below a sparse model's first prompt layer, kept per example (search/frozen.py),
and evaluation in batches of similar lengths: the same answers for less work."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import tiny_config

from search.config import RetrainConfig, SearchConfig, load_config
from search.evaluator import Evaluator
from search.feed import Feed
from search.frozen import FrozenStates
from search.pipeline import build_sparse, build_supernet, prepare
from search.profiling import count_ops
from search.trainer import Trainer
from spt.errors import ConfigError
from spt.inputs import collate, longest_first


@pytest.fixture
def prep(tmp_path, tiny_bert):
    return prepare(load_config(tiny_config(tmp_path, tiny_bert)))


def _trainer(prep, layers, cache_mb):
    torch.manual_seed(0)
    model = build_sparse(prep, layers)
    return Trainer(model, RetrainConfig(lr=0.05), Feed(model, prep.train, frozen_cache_mb=cache_mb), seed=1)


def _predict(trainer, split, batch_size):
    return Evaluator(trainer.model, trainer.feed).predict(split, batch_size)


def test_kept_rows_are_each_examples_real_token_states_then_zeros(prep):
    model = build_sparse(prep, [2, 3]).eval()
    kept = FrozenStates.compute(model, prep.train, torch.device("cpu"), contextlib.nullcontext, budget=2**20)
    indices = [0, 5, 3]
    lengths = [len(prep.train.input_ids[i]) for i in indices]
    assert len(set(lengths)) > 1  # a padded batch
    rows = kept.rows(indices, max(lengths) + 2)
    assert rows.shape == (3, max(lengths) + 2, model.backbone.hidden_size)
    for b, i in enumerate(indices):
        alone = model.states_below_prompts(collate(prep.train, [i]))[0]  # (no padding at all)
        torch.testing.assert_close(rows[b, :lengths[b]], alone, atol=1e-6, rtol=1e-6)
        assert rows[b, lengths[b]:].abs().max() == 0


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_a_step_with_kept_states_skips_the_layers_below_the_prompts_and_computes_the_same(tmp_path, tiny_models, tiny_decoders,
                                                                                          family):
    model_dir = {**tiny_models, **tiny_decoders}[family]
    prep = prepare(load_config(tiny_config(tmp_path, model_dir, head={"pooling": "cls" if family == "bert" else "auto"})))
    trainer = _trainer(prep, [2, 3], cache_mb=64)
    model, indices = trainer.model.eval(), [0, 1, 2, 3, 4, 5]
    kept, plain = trainer.feed.batch(prep.train, indices), collate(prep.train, indices, prompt_length=trainer.feed.prompt_length)
    assert kept["frozen_upto"] == 2 and kept["frozen_states"].shape[:2] == plain["input_ids"].shape
    with torch.no_grad():
        torch.testing.assert_close(model(kept).logits, model(plain).logits, atol=1e-6, rtol=1e-6)
    with_kept, without = count_ops(lambda: model(kept)), count_ops(lambda: model(plain))
    below = count_ops(lambda: model.states_below_prompts(plain))  # embeddings and layers 0 and 1
    assert below.kernels > 10 and with_kept.kernels == without.kernels - below.kernels


def test_training_and_evaluation_with_kept_states_equal_them_without(prep):
    runs = {mb: _trainer(prep, [2, 3], cache_mb=mb) for mb in (0, 64)}
    for trainer in runs.values():
        for step in range(4):
            trainer.weight_step([(4 * step + j) % len(prep.train) for j in range(4)], step)
    assert runs[0].feed.frozen_states(prep.train) is None and runs[64].feed.frozen_states(prep.train) is not None
    for a, b in zip(runs[0].model.generators.parameters(), runs[64].model.generators.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    (p0, l0), (p1, l1) = (_predict(t, prep.dev, 4) for t in runs.values())
    assert p0 == p1 and l1 == pytest.approx(l0, abs=1e-5)


def test_states_are_kept_only_for_frozen_layers_below_the_prompts_and_within_the_budget(prep, tmp_path, tiny_bert):
    assert _trainer(prep, [0, 3], cache_mb=64).feed.frozen_states(prep.train) is None  # no layer below the prompts
    assert _trainer(prep, [2, 3], cache_mb=1e-6).feed.frozen_states(prep.train) is None  # over the budget
    # one budget for every split, in the order they are first used: train fits, dev no longer does
    train_bytes = (sum(len(ids) for ids in prep.train.input_ids) + 1) * 32 * 4  # (tiny BERT: 32 wide, fp32)
    trainer = _trainer(prep, [2, 3], cache_mb=(train_bytes + 100) / 2**20)
    assert trainer.feed.frozen_states(prep.train).nbytes == train_bytes and trainer.feed.frozen_states(prep.dev) is None
    assert _trainer(prep, [2, 3], cache_mb=0).feed.frozen_states(prep.train) is None  # off
    supernet = build_supernet(prep)
    assert Feed(supernet, prep.train, frozen_cache_mb=64).frozen_states(prep.train) is None  # (every layer is a candidate)
    with pytest.raises(ConfigError, match=r"runtime.frozen_cache_mb: must be >= 0"):
        load_config(tiny_config(tmp_path, tiny_bert, runtime={"frozen_cache_mb": -1}))


def test_evaluation_batches_longest_first_and_answers_in_the_splits_order(prep):
    order = longest_first(prep.dev, range(len(prep.dev)))
    lengths = [len(prep.dev.input_ids[i]) for i in order]
    assert lengths == sorted(lengths, reverse=True) and sorted(order) == list(range(len(prep.dev)))
    trainer = _trainer(prep, [1, 3], cache_mb=0)
    together, alone = _predict(trainer, prep.dev, 8), _predict(trainer, prep.dev, 1)
    assert together[0] == alone[0] and together[1] == pytest.approx(alone[1], abs=1e-5)
    texts = ["a great film", "so boring and dull , really bad acting and a dull story", "good"]
    model = trainer.model
    model.max_length = 32
    batched = model.predict(texts, batch_size=3)
    assert [r["label"] for r in batched] == [model.predict([t])[0]["label"] for t in texts]
    for r, t in zip(batched, texts):
        assert r["probabilities"]["1"] == pytest.approx(model.predict([t])[0]["probabilities"]["1"], abs=1e-5)


def test_a_supernet_whose_candidates_start_higher_reads_kept_states_under_every_mask(tmp_path, tiny_bert):
    prep = prepare(load_config(tiny_config(tmp_path, tiny_bert, prompt={"candidate_layers": [2, 3], "dropout": 0.0})))
    torch.manual_seed(0)
    model = build_supernet(prep)
    trainer = Trainer(model, SearchConfig(), Feed(model, prep.train, frozen_cache_mb=64), seed=1)
    model, indices = trainer.model.eval(), [0, 1, 2, 3, 4, 5]
    kept, plain = trainer.feed.batch(prep.train, indices), collate(prep.train, indices, prompt_length=trainer.feed.prompt_length)
    assert kept["frozen_upto"] == 2
    with torch.no_grad():
        for mask in (None, [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]):  # [0, 1]: layer 2 runs from the kept states, unprompted
            torch.testing.assert_close(model(kept, mask).logits, model(plain, mask).logits, atol=1e-6, rtol=1e-6)
        for a, b in zip(model.forward_consistency(kept, [0.0, 1.0]), model.forward_consistency(plain, [0.0, 1.0])):
            torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-6)


def test_compiled_steps_reading_kept_states_train_as_eager_ones(tmp_path, tiny_bert):
    # Dropout off: compiled code draws its random numbers differently from eager code.
    prep = prepare(load_config(tiny_config(tmp_path, tiny_bert, prompt={"dropout": 0.0}, head={"dropout": 0.0})))
    trainers = []
    for compile_step, cache_mb in ((False, 0), (True, 64)):
        torch.manual_seed(0)
        model = build_sparse(prep, [2, 3])
        trainers.append(Trainer(model, RetrainConfig(lr=0.05), Feed(model, prep.train, frozen_cache_mb=cache_mb), seed=1,
                                compile_step=compile_step))
        for step in range(4):  # batches of 4 to 7 examples: the compiled step meets several shapes
            trainers[-1].weight_step([(7 * step + j) % len(prep.train) for j in range(4 + step)], step)
    eager, compiled = (t.model.generators.parameters() for t in trainers)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-4)
