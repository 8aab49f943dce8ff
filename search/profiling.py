"""What a step asks of a GPU, counted on any device: kernels and host-device syncs.

On a GPU a training step of a small model is bound by kernel launches and by the host
waiting for the device; CPU wall time hides both. :func:`count_ops` runs a function
under ``torch.profiler`` and counts, among the ATen operators it calls,

* **kernels**: leaf operators that compute (a view, a reshape into a view, an empty
  allocation or a detach launches nothing and is not counted); a multi-tensor
  (``_foreach_*``), fused (``_fused_adamw_``) or dropout operator counts once, as on a GPU,
  however the CPU carries it out;
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
    "aten::set_", "aten::result_type", "aten::is_same_size", "aten::to", "aten::_has_compatible_shallow_copy_type",
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


def _fused(event) -> bool:
    return event.name.startswith(FUSED_PREFIXES) or (event.name in ONE_KERNEL_ON_GPU and bool(event.cpu_children))


def _inside_fused(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _fused(parent):
            return True
        parent = parent.cpu_parent
    return False


@dataclass
class OpCounts:
    """Kernels and syncs of one call, with the operator names behind them."""

    kernels: int = 0
    syncs: int = 0
    by_op: Counter = field(default_factory=Counter)
    sync_ops: Counter = field(default_factory=Counter)


def count_ops(fn: Callable[[], object]) -> OpCounts:
    """Run ``fn`` once under the profiler and count its kernels and syncs.

    Give ``fn`` batches already made: building a batch on the host is no device work.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = OpCounts()
    for event in prof.events():
        name = event.name
        if not name.startswith("aten::") or _inside_fused(event):
            continue
        if _fused(event):  # one (multi-tensor) kernel on a GPU; the CPU loops
            counts.kernels += 1
            counts.by_op[name] += 1
            continue
        if name in SYNC_OPS:
            counts.syncs += 1
            counts.sync_ops[name] += 1
        has_aten_child = any(child.name.startswith("aten::") for child in event.cpu_children)
        if not has_aten_child and name not in NO_KERNEL and name not in SYNC_OPS:
            counts.kernels += 1
            counts.by_op[name] += 1
    return counts


def graph_breaks(fn: Callable[..., object], *args: object) -> int:
    """How many graph breaks ``torch.compile`` meets tracing ``fn(*args)`` (``torch._dynamo.explain``)."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count
