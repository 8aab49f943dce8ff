"""What a step asks of a GPU, counted on any device: kernels and host-device syncs.

On a GPU a training step of a small model is bound by kernel launches and by the host
waiting for the device; CPU wall time hides both. :func:`count_ops` runs a function
under ``torch.profiler`` and counts, among the ATen operators it calls,

* **kernels**: operators that compute and call no other computing operator (a view, a
  reshape into a view, an empty allocation or a detach launches nothing and is not
  counted); an operator that is one kernel on a GPU counts once however the CPU carries it
  out: a GEMM, layer norm or flash attention (a library kernel), a reduction, a multi-tensor
  (``_foreach_*``) or fused (``_fused_adamw_``, ``_fused_rms_norm`` and its backward, which
  a CPU build differentiates operator by operator) operator, dropout; a
  Python number cast to a tensor's dtype inside an operator is a kernel argument on a GPU
  and is not counted;
* **syncs**: operators whose result the host must read before going on
  (``.item()``/``bool()``/``int()`` -> ``_local_scalar_dense``, ``nonzero``, ``equal``...),
  each of which makes the host wait for the GPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

NO_KERNEL = frozenset({
    "aten::view", "aten::_reshape_alias", "aten::reshape", "aten::expand", "aten::as_strided", "aten::slice",
    "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::transpose", "aten::t", "aten::permute",
    "aten::detach", "aten::detach_", "aten::alias", "aten::_unsafe_view", "aten::empty", "aten::empty_strided",
    "aten::empty_like", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::numpy_T",
    "aten::split", "aten::unbind", "aten::chunk", "aten::narrow", "aten::_nested_tensor_from_mask_left_aligned",
    "aten::set_", "aten::resize_", "aten::new_empty", "aten::new_empty_strided", "aten::result_type", "aten::is_same_size", "aten::to", "aten::_has_compatible_shallow_copy_type",
    "aten::requires_grad_", "aten::contiguous", "aten::expand_as", "aten::view_as", "aten::flatten", "aten::unflatten",
    "aten::movedim", "aten::diagonal", "aten::_unique", "aten::is_nonzero_", "aten::sym_size", "aten::sym_stride",
    "aten::sym_numel", "aten::size", "aten::stride", "aten::dim", "aten::is_floating_point", "aten::item_",
    # identities when they have no child operator (dropout in eval mode, a cast to the same dtype)
    "aten::dropout", "aten::feature_dropout", "aten::_to_copy_noop",
})
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::masked_select",
                      "aten::unique", "aten::_unique2", "aten::repeat_interleave", "aten::nonzero_static"})


FUSED_PREFIXES = ("aten::_foreach_", "aten::_fused_")
# One kernel on a GPU (native_dropout), several on a CPU (bernoulli_, div_, mul).
ONE_KERNEL_ON_GPU = frozenset({"aten::dropout", "aten::feature_dropout"})
# One library kernel on a GPU (cuBLAS, the layer-norm and flash-attention kernels); on a CPU
# they allocate, zero or copy a bias inside, which is part of the same kernel there.
LIBRARY_KERNELS = frozenset({
    "aten::mm", "aten::bmm", "aten::addmm", "aten::_addmm_activation", "aten::baddbmm", "aten::addbmm", "aten::mv", "aten::addmv",
    "aten::native_layer_norm", "aten::native_layer_norm_backward",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_backward",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_efficient_attention_backward",
    # a reduction is one kernel on a GPU; a CPU first fills the output (sum) or divides after (mean)
    "aten::sum", "aten::mean", "aten::linalg_vector_norm",
})
CASTS = frozenset({"aten::to", "aten::_to_copy"})


def _one_kernel(event) -> bool:
    name = event.name
    if name.startswith(FUSED_PREFIXES) or name in LIBRARY_KERNELS:
        return True
    return name in ONE_KERNEL_ON_GPU and bool(event.cpu_children)


def _scalar_promotion(event) -> bool:
    """A Python number cast to the tensor's dtype inside an operator: a kernel argument on a
    GPU, a 0-dim copy on a CPU."""
    shapes = event.input_shapes
    return event.name in CASTS and bool(shapes) and shapes[0] == []


@dataclass
class OpCounts:
    """Kernels and syncs of one call, with the operator names behind them."""

    kernels: int = 0
    syncs: int = 0
    by_op: Counter = field(default_factory=Counter)
    sync_ops: Counter = field(default_factory=Counter)

    def _add(self, event, nested: bool) -> int:
        """Count ``event``'s subtree; return its kernels."""
        name = event.name
        if _one_kernel(event):  # one (library, fused or multi-tensor) kernel on a GPU; the CPU loops
            self.kernels += 1
            self.by_op[name] += 1
            return 1
        if nested and _scalar_promotion(event):
            return 0
        if name in SYNC_OPS:
            self.syncs += 1
            self.sync_ops[name] += 1
        # a cast's own copy is what it computes: nested only if the cast is
        nested_below = nested if name in CASTS else True
        inside = sum(self._add(child, nested_below) for child in event.cpu_children if child.name.startswith("aten::"))
        if inside or name in NO_KERNEL or name in SYNC_OPS:
            return inside
        self.kernels += 1  # an operator that computes and calls no other computing operator
        self.by_op[name] += 1
        return 1


def _has_aten_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _rms_norm_calls(events) -> dict[int, int]:
    """Sequence number of each operator a CPU spells ``_fused_rms_norm`` with -> that call's.

    CUDA runs rms_norm's backward as one ``_fused_rms_norm_backward`` kernel; a CPU build
    has no such kernel and differentiates the spelled-out operators one by one. Their
    backward nodes carry the forward operators' sequence numbers, which ties them to the call.
    """
    calls: dict[int, int] = {}
    for event in events:
        if event.name == "aten::_fused_rms_norm":
            stack = [event]
            while stack:
                op = stack.pop()
                # an operator that computes nothing (a cast to the same dtype) makes no backward
                # node, and its number is the next operator's, maybe outside the call
                if op.sequence_nr >= 0 and _computes(op):
                    calls[op.sequence_nr] = event.sequence_nr
                stack.extend(op.cpu_children)
    return calls


def _computes(event) -> bool:
    if event.name not in NO_KERNEL and not event.cpu_children:
        return True
    return any(_computes(child) for child in event.cpu_children if child.name.startswith("aten::"))


def _backward_node(event):
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("autograd::engine::evaluate_function"):
        parent = parent.cpu_parent
    return parent


def count_ops(fn: Callable[[], object]) -> OpCounts:
    """Run ``fn`` once under the profiler and count its kernels and syncs.

    Give ``fn`` batches already made: building a batch on the host is no device work.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    events = prof.events()
    counts, rms_norm_calls, rms_norm_backwards = OpCounts(), _rms_norm_calls(events), set()
    for event in events:
        if not event.name.startswith("aten::") or _has_aten_ancestor(event):
            continue
        node = _backward_node(event)
        call = None if node is None else rms_norm_calls.get(node.sequence_nr)
        if call is None:
            counts._add(event, nested=False)
        elif call not in rms_norm_backwards:  # the call's whole backward: one kernel on a GPU
            rms_norm_backwards.add(call)
            counts.kernels += 1
            counts.by_op["aten::_fused_rms_norm_backward"] += 1
    return counts


def graph_breaks(fn: Callable[..., object], *args: object) -> int:
    """How many graph breaks ``torch.compile`` meets tracing ``fn(*args)`` (``torch._dynamo.explain``)."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count


@dataclass
class DeviceCounts:
    """What one call launched on a CUDA device and how often the host waited for it, measured."""

    launches: int  # kernels, copies and fills the device ran
    syncs: int  # synchronizing calls, as CUDA's sync debug mode reports them


def device_counts(fn: Callable[[], object]) -> DeviceCounts:
    """Run ``fn`` once on a CUDA device and measure its launches (torch.profiler's device
    activity) and syncs (``torch.cuda.set_sync_debug_mode``): the check of :func:`count_ops`."""
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    launches = sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)
    return DeviceCounts(launches, sum("synchroniz" in str(w.message) for w in caught))
