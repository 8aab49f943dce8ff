"""What a step asks of a GPU, counted on any device: kernels and host-device syncs.

On a GPU a training step of a small model is bound by kernel launches and by the host
waiting for the device; CPU wall time hides both. :func:`count_ops` runs a function
under ``torch.profiler`` and counts, among the ATen operators it calls,

* **kernels**: operators that compute and call no other computing operator (a view, a
  reshape into a view, an empty allocation or a detach launches nothing and is not
  counted); an operator that is one kernel on a GPU counts once however the CPU carries it
  out: a GEMM, layer norm or flash attention (a library kernel), a reduction, a multi-tensor
  (``_foreach_*``) or fused (``_fused_adamw_``, ``_fused_rms_norm``) operator, dropout; a
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
    "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::mv", "aten::addmv",
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


def count_ops(fn: Callable[[], object]) -> OpCounts:
    """Run ``fn`` once under the profiler and count its kernels and syncs.

    Give ``fn`` batches already made: building a batch on the host is no device work.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    counts = OpCounts()
    for event in prof.events():
        if event.name.startswith("aten::") and not _has_aten_ancestor(event):
            counts._add(event, nested=False)
    return counts


def graph_breaks(fn: Callable[..., object], *args: object) -> int:
    """How many graph breaks ``torch.compile`` meets tracing ``fn(*args)`` (``torch._dynamo.explain``)."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count
