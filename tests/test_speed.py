"""What a step asks of a GPU, checked without one: no host-device syncs, no graph breaks,
bf16 matmuls under bf16, and plans decided on the host."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from search.config import RetrainConfig, SearchConfig, load_config
from search.feed import Feed
from search.losses import search_loss
from search.pipeline import build_sparse, build_supernet, prepare
from search.profiling import count_ops, graph_breaks
from search.trainer import Trainer
from spt.inputs import collate
from spt.model import make_plan


def _trainers(tmp_path, model_dir, precision="fp32", pooling="cls"):
    prep = prepare(load_config(tiny_config(tmp_path, model_dir, runtime={"precision": precision}, head={"pooling": pooling})))
    sparse, supernet = build_sparse(prep, [0, 2]), build_supernet(prep)

    def trainer(model, settings, **kwargs):
        return Trainer(model, settings, Feed(model, prep.train, precision=precision), seed=1, fused_optimizer=True, **kwargs)

    return prep, {
        "sparse": trainer(sparse, RetrainConfig()),
        "supernet": trainer(supernet, SearchConfig(), loss=search_loss(1.0, 0.5, 1, 4)),
    }


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_training_steps_never_make_the_host_wait_for_the_device(tmp_path, tiny_models, tiny_decoders, family):
    model_dir = {**tiny_models, **tiny_decoders}[family]
    prep, trainers = _trainers(tmp_path, model_dir, pooling="cls" if family == "bert" else "auto")
    batch = list(range(6))  # right-padded: sentences of different lengths
    assert collate(prep.train, batch)["has_padding"]
    steps = {
        "sparse weight step": lambda: trainers["sparse"].weight_step(batch, 0),
        "supernet weight step (consistency pair)": lambda: trainers["supernet"].weight_step(batch, 3),
        "gate step": lambda: trainers["supernet"].architect.step(batch, 3),
    }
    for name, step in steps.items():
        step()
        counts = count_ops(step)
        assert counts.kernels > 50, name  # the profiler saw the step
        assert counts.syncs == 0, (name, dict(counts.sync_ops))


def test_the_sync_counter_sees_a_sync():
    x = torch.ones(4)
    assert count_ops(lambda: bool((x > 0).all())).syncs == 1
    assert count_ops(lambda: x.nonzero()).syncs == 1


def test_the_kernel_counter_counts_what_a_gpu_launches():
    x = torch.randn(4, 3)
    # one operator, one kernel, though the CPU first casts the Python number (a 0-dim copy)
    assert count_ops(lambda: x * 2.0).kernels == 1
    # a cast the caller asks for is a kernel, even of a 0-dim tensor (a loss cast to fp32)
    assert count_ops(lambda: x.sum().to(torch.float64)).kernels == 2
    # views launch nothing; a fused optimizer step is one kernel however the CPU loops
    assert count_ops(lambda: x.t().unsqueeze(0)[:, :2].reshape(2, 4)).kernels == 0
    assert count_ops(lambda: x.t().reshape(12)).kernels == 1  # (a reshape that must copy)
    # a GEMM, a layer norm, a reduction: one library kernel each, whatever the CPU does inside
    other = torch.randn(3, 5)
    assert count_ops(lambda: x @ other).by_op == {"aten::mm": 1}
    assert count_ops(lambda: torch.nn.functional.layer_norm(x, (3,))).by_op == {"aten::native_layer_norm": 1}
    assert count_ops(lambda: x.mean()).by_op == {"aten::mean": 1}
    # a linear layer's step: addmm; the loss's sum; its seed gradient; two GEMMs and a bias sum back
    linear, inputs = torch.nn.Linear(3, 2), torch.randn(4, 3, requires_grad=True)
    by_op = count_ops(lambda: linear(inputs).sum().backward()).by_op
    assert by_op == {"aten::addmm": 1, "aten::sum": 2, "aten::fill_": 1, "aten::mm": 2}
    # rms_norm: one fused kernel each way on a GPU; a CPU build spells both passes out
    states = torch.randn(4, 6, requires_grad=True)
    by_op = count_ops(lambda: torch.nn.functional.rms_norm(states * 3.0, (6,)).sum().backward()).by_op
    assert by_op == {"aten::mul": 2, "aten::_fused_rms_norm": 1, "aten::_fused_rms_norm_backward": 1,
                     "aten::sum": 1, "aten::fill_": 1}
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    for p in params:
        p.grad = torch.ones(3)
    adamw = torch.optim.AdamW(params, fused=True)
    adamw.step()
    assert count_ops(adamw.step).by_op["aten::_fused_adamw_"] == 1


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_forward_and_loss_compile_without_graph_breaks(tmp_path, tiny_models, tiny_decoders, family):
    model_dir = {**tiny_models, **tiny_decoders}[family]
    prep, trainers = _trainers(tmp_path, model_dir, pooling="cls" if family == "bert" else "auto")
    batch = collate(prep.train, list(range(4)), "cpu", 3)
    sparse, supernet = trainers["sparse"].model, trainers["supernet"].model
    sparse_loss, pair_loss = trainers["sparse"].loss, trainers["supernet"].loss
    assert graph_breaks(lambda b: sparse_loss(sparse, b)["loss"], batch) == 0
    assert graph_breaks(lambda b: pair_loss(supernet, b, [1.0, 0.0, 1.0, 0.0])["loss"], batch) == 0


def test_bf16_runs_every_matmul_on_activations_in_bf16(tmp_path, tiny_bert):
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math"}
    seen: list[tuple[str, torch.dtype, tuple[int, ...], bool]] = []
    in_head = [False]

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name in matmuls:
                first = next(a for a in args if isinstance(a, torch.Tensor))
                seen.append((name, first.dtype, tuple(first.shape), in_head[0]))
            return func(*args, **(kwargs or {}))

    prep, trainers = _trainers(tmp_path, tiny_bert, precision="bf16")
    model = trainers["sparse"].model
    assert model.backbone.base.embeddings.word_embeddings.weight.dtype == torch.bfloat16  # stored in bf16
    assert all(p.dtype == torch.float32 for p in model.weight_parameters())  # fp32 master weights

    def enter(*args):
        in_head[0] = True

    def leave(*args):
        in_head[0] = False

    model.head.register_forward_pre_hook(enter)
    model.head.register_forward_hook(leave)
    model.head.register_full_backward_pre_hook(enter)
    model.head.register_full_backward_hook(leave)
    with Record():
        trainers["sparse"].weight_step(list(range(4)), 0)
    # Two things stay fp32 by design: the product of each generator's PHM factors (a bmm
    # over the generators, from the parameters alone, cast once) and the small trainable
    # classifier (one cast of its input instead of casts of its weights and logits).
    generators = len(model.layers)
    phm = [dtype for name, dtype, shape, head in seen if not head and name == "bmm" and shape[0] == generators]
    head = [dtype for name, dtype, shape, head in seen if head]
    activations = [dtype for name, dtype, shape, head in seen if not head and not (name == "bmm" and shape[0] == generators)]
    assert generators != 4 and len(activations) > 20 and set(activations) == {torch.bfloat16}, sorted(map(str, seen))
    assert set(phm) == {torch.float32} and set(head) == {torch.float32} and len(head) >= 2, sorted(map(str, seen))


def test_plans_are_decided_on_the_host():
    # Sparse model, layers 0 and 2 of 4, replace (lambda 1): layer 1's slot outputs are
    # replaced at layer 2, the last layer's are never read: keys and values only.
    plan = make_plan(4, [0, 2], [(True,), (True,)], hard=True, discard=1.0)
    assert plan.first == 0 and [s.layer for s in plan.layers] == [0, 1, 2, 3]
    assert [s.generator for s in plan.layers] == [0, None, 1, None]
    assert [s.keys_values_only for s in plan.layers] == [False, True, False, True]
    assert [s.new_context for s in plan.layers] == [True, False, False, False]
    assert all(s.rows is None and s.started is None and s.clear is None for s in plan.layers)
    # Add (lambda 0): the slots carry on, so only the last layer skips them.
    assert [s.keys_values_only for s in make_plan(4, [0, 2], [(True,), (True,)], True, 0.0).layers] == [False, False, False, True]
    # A consistency pair: example 0 full, example 1 masked to layer 2 only.
    plan = make_plan(4, [0, 1, 2, 3], [(True, False), (True, False), (True, True), (True, False)], hard=False, discard=1.0)
    steps = {s.layer: s for s in plan.layers}
    assert plan.first == 0 and steps[0].rows == (True, False) and steps[2].rows is None
    assert steps[0].started == (True, False) and steps[2].started is None and steps[2].new_context
    assert steps[2].clear == (True, False)  # example 1 starts at layer 2: its slots start from zero
    assert not any(s.keys_values_only for s in plan.layers[:-1])  # learned gates mix, nothing is skipped


def test_the_generators_relu_runs_inside_the_gemm_with_the_same_gradients():
    from spt.generator import PromptGenerators, adaptive_pool_weights

    torch.manual_seed(0)
    generators = PromptGenerators(2, 16, 8, phm_n=2, activation="relu", dropout=0.0).double()
    hidden, pool = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True), adaptive_pool_weights(torch.ones(3, 5), 4).double()
    fused = generators(1, hidden, pool)
    (down_w, down_b), (up_w, up_b) = generators.down.parts()[1], generators.up.parts()[1]
    spelled = torch.addmm(up_b, torch.relu(torch.addmm(down_b, torch.bmm(pool, hidden).reshape(-1, 16), down_w)), up_w).view(3, 4, 16)
    torch.testing.assert_close(fused, spelled, rtol=1e-12, atol=1e-12)
    params = [hidden, *generators.parameters()]
    weights = torch.randn_like(fused)
    for got, want in zip(torch.autograd.grad((fused * weights).sum(), params), torch.autograd.grad((spelled * weights).sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h: generators(1, h, pool), (hidden,))
    for grad_mode in (True, False):  # training and inference: one fused GEMM, no separate ReLU
        with torch.set_grad_enabled(grad_mode):
            by_op = count_ops(lambda: generators(1, hidden, pool)).by_op
        assert by_op["aten::_addmm_activation"] == 1 and by_op["aten::addmm"] == 1
        assert "aten::clamp_min" not in by_op and "aten::relu" not in by_op


def test_queries_of_a_keys_values_only_layer_are_projected_without_a_copy_in_inference():
    from spt.backbone.layers import project_queries

    projection, hidden = torch.nn.Linear(8, 8), torch.randn(2, 7, 8)
    queries = hidden[:, 3:]  # the token states behind 3 prompt slots: a slice, not contiguous
    trained = project_queries(projection, hidden, queries)
    assert count_ops(lambda: project_queries(projection, hidden, queries)).by_op == {"aten::copy_": 1, "aten::addmm": 1}
    with torch.no_grad():
        served = project_queries(projection, hidden, queries)
        assert count_ops(lambda: project_queries(projection, hidden, queries)).by_op == {"aten::addmm": 1}
    torch.testing.assert_close(served, trained.detach())


def test_gradient_clipping_matches_torch_in_fewer_kernels():
    from search.steps import clip_gradients

    def params(scale: float) -> list[torch.nn.Parameter]:
        torch.manual_seed(0)
        made = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(2, 2))]
        for p in made:
            p.grad = torch.randn_like(p) * scale
        made[2].grad = None  # a parameter without a gradient is left out of the norm
        return made

    for scale in (5.0, 0.01):  # clipped, and below the limit (left exactly as it is)
        ours, torchs = params(scale), params(scale)
        before = [None if p.grad is None else p.grad.clone() for p in ours]
        clip_gradients(ours, 1.0)
        torch.nn.utils.clip_grad_norm_(torchs, 1.0)
        for a, b, g in zip(ours, torchs, before):
            assert (a.grad is None) == (b.grad is None)
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
                if scale < 1:
                    assert torch.equal(a.grad, g)
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params(5.0)[:2]])) > 1.5  # (the case clips)
    clipped = params(5.0)
    counts = count_ops(lambda: clip_gradients(clipped, 1.0))
    reference = params(5.0)
    assert counts.kernels < count_ops(lambda: torch.nn.utils.clip_grad_norm_(reference, 1.0)).kernels
    mixed = params(5.0)  # two dtypes: torch's own function groups them
    mixed[1].data, mixed[1].grad = mixed[1].data.double(), mixed[1].grad.double()
    clip_gradients(mixed, 1.0)
    total = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in mixed[:2]]))
    assert total == pytest.approx(1.0, rel=1e-5)
