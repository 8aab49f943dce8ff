"""The CUDA path, on a GPU (skipped without one): no host sync in a step, the same numbers as
the CPU, compiled steps with CUDA graphs that train as eager ones, bf16 matmuls, and the
device-side measurements the speed benchmark relies on."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_config

from search.config import RetrainConfig, SearchConfig, load_config
from search.feed import Feed
from search.losses import search_loss
from search.pipeline import build_sparse, build_supernet, prepare
from search.profiling import device_counts
from search.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BATCH = list(range(6))  # right-padded: sentences of different lengths


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _prepare(tmp_path, model_dir, precision="fp32", dropout=0.1):
    sections = {"runtime": {"precision": precision}, "prompt": {"dropout": dropout}, "head": {"dropout": dropout}}
    return prepare(load_config(tiny_config(tmp_path, model_dir, **sections)))


def _trainer(prep, model, precision="fp32", settings=None, **kwargs) -> Trainer:
    return Trainer(model, settings or RetrainConfig(), Feed(model, prep.train, "cuda", precision), seed=1, **kwargs)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_steps_never_make_the_host_wait(tmp_path, tiny_bert, precision):
    prep = _prepare(tmp_path, tiny_bert, precision)
    sparse = _trainer(prep, build_sparse(prep, [0, 2]), precision)
    supernet = _trainer(prep, build_supernet(prep), precision, settings=SearchConfig(), loss=search_loss(1.0, 0.5, 1, 4))
    steps = {"sparse weight step": lambda: sparse.weight_step(BATCH, 0),
             "supernet weight step": lambda: supernet.weight_step(BATCH, 3),
             "gate step": lambda: supernet.architect.step(BATCH, 3)}
    for name, step in steps.items():
        step()  # lazy initialisation (optimizer state) is not a step's cost
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
        try:
            step()
        except RuntimeError as error:
            pytest.fail(f"{name}: {error}")
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_cuda_gives_the_cpus_logits_and_gradients(tmp_path, tiny_bert):
    prep = _prepare(tmp_path, tiny_bert, dropout=0.0)
    model = build_sparse(prep, [0, 2])
    results = {}
    for device in ("cpu", "cuda"):
        trainer = Trainer(model, RetrainConfig(), Feed(model, prep.train, device), seed=1)
        model.zero_grad(set_to_none=True)
        batch, _ = trainer.feed.local_batch(BATCH)
        loss = trainer.loss(model.train(), batch)["loss"]
        loss.backward()
        # (copies: moving the model to the GPU moves its gradients in place)
        results[device] = [t.detach().cpu().clone() for t in [model(batch).logits] + [p.grad for p in model.weight_parameters()]]
    for cpu, cuda in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5)


def test_compiled_steps_with_cuda_graphs_train_as_eager_ones(tmp_path, tiny_bert):
    # Dropout off: compiled code draws its random numbers differently from eager code.
    prep = _prepare(tmp_path, tiny_bert, dropout=0.0)
    model = build_sparse(prep, [0, 2])
    eager = _trainer(prep, copy.deepcopy(model))
    graphed = _trainer(prep, model, compile_step=True)
    batches = [BATCH, [6, 7, 8, 9, 10, 11]] * 3
    # Read only after all steps: a CUDA graph's replay overwrites the memory of its last outputs.
    stats = {name: [t.weight_step(b, s)["loss"] for s, b in enumerate(batches)] for name, t in (("eager", eager), ("graphed", graphed))}
    torch.testing.assert_close(torch.stack(stats["graphed"]), torch.stack(stats["eager"]), rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.model.weight_parameters(), graphed.model.weight_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_bf16_runs_the_backbones_matmuls_in_bf16_on_cuda(tmp_path, tiny_bert):
    from torch.utils._python_dispatch import TorchDispatchMode

    prep = _prepare(tmp_path, tiny_bert, "bf16")
    trainer = _trainer(prep, build_sparse(prep, [0, 2]), "bf16")
    frozen = {p.data_ptr() for p in trainer.model.backbone.base.parameters()}
    seen: list[tuple[str, tuple[torch.dtype, ...]]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            frozen_weight = any(t.data_ptr() in frozen for t in tensors)
            if name.startswith("_scaled_dot_product"):  # queries, keys, values (a backward's logsumexp is fp32)
                seen.append((name, tuple(t.dtype for t in tensors[:3])))
            elif name in ("mm", "addmm", "bmm", "baddbmm") and frozen_weight:
                seen.append((name, tuple(t.dtype for t in tensors)))
            return func(*args, **(kwargs or {}))

    with Record():
        trainer.weight_step(BATCH, 0)
    assert trainer.model.backbone.base.embeddings.word_embeddings.weight.dtype == torch.bfloat16  # stored in bf16
    assert any(name.startswith("_scaled_dot_product") for name, _ in seen) and len(seen) > 10, seen
    assert {dtype for _, dtypes in seen for dtype in dtypes} == {torch.bfloat16}, seen


def test_device_counts_measure_launches_and_syncs():
    x = torch.randn(64, 64, device="cuda")
    x @ x  # cuBLAS initialisation
    assert device_counts(lambda: x @ x).launches == 1
    assert device_counts(lambda: x @ x).syncs == 0
    assert device_counts(lambda: (x @ x).sum().item()).syncs == 1
