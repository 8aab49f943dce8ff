"""``runtime.shard: fsdp``: the frozen backbone's parameters split across torchrun's ranks.

Under ``torchrun`` every rank otherwise holds the whole backbone (:mod:`search.distributed`:
data parallelism). With ``fsdp``, torch's FSDP2 (``torch.distributed.fsdp.fully_shard``)
shards each transformer layer and the rest of the backbone (the root: embeddings, final norm,
LM head, MPNet's position bias) along their first dimension, so each of N ranks holds 1/N of
the backbone, and all-gathers a layer's weights when it runs, freeing them right after (and
gathering them again for the backward pass, where gradients flow through the layer to the
prompts below). Nothing else changes:

* What trains (generators, gates, head) stays whole on every rank, with its gradients averaged
  as under plain torchrun: sharding it would spare next to nothing (a MiniLM-L6 supernet's
  0.31 MB against the backbone's 90.9 MB), and would turn its optimizer states, checkpoints and
  saved models into sharded tensors. As it is, they hold plain tensors, so a model saved from
  a sharded run loads in one process, and a run resumes with or without sharding (only rank 0
  writes, as always).
* The backbone runs layer by layer (:class:`~spt.backbone.Backbone`), not through one
  ``forward``: the calls that read the root's parameters (:meth:`Backbone.root_calls`) and
  the layers' keys-and-values-only pass are registered with FSDP as forward methods, so
  their weights are gathered around them as around a layer's ``forward``.
* Every gather is a collective: every rank must run every forward pass. A rank whose share
  of a global batch is empty runs a stand-in example weighed 0 (:meth:`search.feed.Feed.local_batch`),
  and evaluation gives every rank as many batches as the rank with the most
  (:class:`~search.evaluator.Evaluator`).

Refused, with one line naming the field: ``fsdp`` outside torchrun (or with one process),
with ``runtime.compile: step``, and with a quantized backbone (``model.quantize``).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
from torch import nn

from spt.backbone import SHARDED_KEYS_VALUES_ONLY, Backbone
from spt.errors import UserError

from . import distributed


def check(config) -> None:
    """Refuse a ``runtime.shard`` this run cannot have, before anything is loaded or written."""
    runtime = config.runtime
    if runtime.shard == "none":
        return
    if runtime.compile == "step":
        raise UserError("runtime.shard", "fsdp does not combine with runtime.compile: step (the gathering of each "
                        "sharded layer's weights breaks the compiled step at every layer, and CUDA graphs cannot hold "
                        "it); set runtime.compile: none, or runtime.shard: none")
    quantize = getattr(config.model, "quantize", "none")
    if quantize != "none":
        raise UserError("runtime.shard", f"fsdp cannot split a quantized backbone (model.quantize: {quantize} holds "
                        "bitsandbytes weights, which this sharding does not split); set model.quantize: none, or runtime.shard: none")
    if not distributed.world().active:
        raise UserError("runtime.shard", "fsdp splits the backbone across torchrun's processes, and this is one process; "
                        "run under torchrun with two or more (torchrun --nproc_per_node 2 -m search run CONFIG --out DIR), "
                        "or set runtime.shard: none")


@dataclass(frozen=True)
class Sharding:
    """What each rank holds of a sharded backbone's parameters (bytes, in rank order) and of the whole."""

    held: list[int]
    whole: int

    def describe(self) -> str:
        held = ", ".join(_size(b) for b in self.held)
        return (f"backbone sharded (runtime.shard: fsdp): {_size(self.whole)} of parameters over {len(self.held)} "
                f"ranks, held per rank: {held}")


def shard_backbone(backbone: Backbone, device: torch.device) -> Sharding:
    """Split ``backbone``'s parameters across the ranks (FSDP2, in place): one unit per transformer
    layer, one for the rest. Every rank calls it (it ends in a collective)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if not isinstance(backbone, FSDPModule):  # (a backbone shared by two jobs of one process is sharded once)
        quantized = sorted({str(p.dtype) for p in backbone.parameters() if not p.dtype.is_floating_point})
        if quantized:
            raise UserError("runtime.shard", f"fsdp cannot split a quantized backbone (it holds {', '.join(quantized)} "
                            "weights); set runtime.shard: none")
        backbone._kept_fingerprint = backbone.fingerprint()  # (read from weights no rank holds whole afterwards)
        mesh = init_device_mesh(device.type, (distributed.world().size,))
        for layer in backbone.layers:
            setattr(layer, SHARDED_KEYS_VALUES_ONLY, functools.partial(backbone.runner.keys_values_only, layer))
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
            register_fsdp_forward_method(layer, SHARDED_KEYS_VALUES_ONLY)
        # (reshard_after_forward given: FSDP would otherwise keep the root's weights, the
        # embeddings among them, gathered from its first call on)
        fully_shard(backbone, mesh=mesh, reshard_after_forward=True)
        for name in backbone.root_calls():
            register_fsdp_forward_method(backbone, name)
    held, whole = parameter_bytes(backbone)
    return Sharding(distributed.gather_objects([held]), whole)


def parameter_bytes(module: nn.Module) -> tuple[int, int]:
    """Bytes of ``module``'s parameters this process holds (of a sharded one: its shard, padding
    included, as stored) and bytes of the whole parameters."""
    from torch.distributed.tensor import DTensor

    storages: dict[int, int] = {}
    whole = 0
    for p in module.parameters():
        whole += p.numel() * p.element_size()
        local = p.to_local() if isinstance(p, DTensor) else p
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()), whole


def is_sharded(model: object) -> bool:
    """Whether ``model``'s backbone is split across ranks: then every rank runs every forward pass."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # (never imported: nothing is sharded)
    return fsdp is not None and isinstance(getattr(model, "backbone", None), fsdp.FSDPModule)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
