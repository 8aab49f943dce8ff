"""Data parallelism under ``torchrun`` (gloo on CPU, NCCL on GPUs).

Every rank holds the same model (same seed, same initialisation, broadcast from rank 0
to be sure), draws the same D1/D2 split and the same architecture masks (both derive
from the seed), and takes its share ``batch[rank::world]`` of each global batch. After
each backward pass the gradients are averaged across ranks, as DistributedDataParallel
does, with each rank's loss scaled by its share of the global batch so that uneven last
batches average exactly. Clipping and the optimizer step then see the gradient that one
process on the whole global batch would see. Only rank 0 writes files.

(The gradient all-reduce is done here rather than by wrapping the model in
``torch.nn.parallel.DistributedDataParallel``: the search alternates two optimizers over
disjoint parameter groups and switches ``requires_grad`` between them at every step,
which DDP's reducer does not allow.)
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


_WORLD = World()


def is_main() -> bool:
    return _WORLD.is_main


def world() -> World:
    """This process's place among torchrun's ranks (one rank of one outside torchrun)."""
    return _WORLD


def init_from_env() -> World:
    """Join the process group that ``torchrun`` describes in the environment (once)."""
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or _WORLD.active:
        return _WORLD
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        # Leave the group before the interpreter tears down: a group still alive at exit can
        # abort the process from its communication threads ("terminate called ...").
        atexit.register(_leave)
    _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(_WORLD.local_rank)
    return _WORLD


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish(completed: bool, code: int) -> None:
    """Leave the process group at the end of a command run under torchrun.

    After a command that completed on this rank: wait for every rank, leave the group, flush
    what is open and end the process with ``code`` at once. Interpreter teardown is skipped
    on purpose: gloo's communication threads can abort a process there ("terminate called
    without an active exception", exit -6) although its work is done and written. After a
    failure the other ranks may be gone: no barrier, the group is left and the error takes
    its usual course (message, traceback, exit status)."""
    if not (_WORLD.active and dist.is_initialized()):
        return
    if completed:
        dist.barrier()
    _leave()
    if completed:
        import logging
        import sys

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def device_for(name: str) -> str:
    """Under torchrun on GPUs each rank uses its own device."""
    if _WORLD.active and torch.cuda.is_available() and name in ("auto", "cuda"):
        return f"cuda:{_WORLD.local_rank}"
    return name


def barrier() -> None:
    if _WORLD.active:
        dist.barrier()


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's share of a global batch."""
    return list(indices[_WORLD.rank :: _WORLD.size]) if _WORLD.active else list(indices)


def largest_share(n: int) -> int:
    """How many of ``n`` items the rank with the most gets from :func:`shard` (rank 0's share)."""
    return -(-n // _WORLD.size) if _WORLD.active else n


def loss_scale(local: int, global_: int) -> float:
    """Factor that makes the rank-average of local mean losses the global mean loss."""
    return local * _WORLD.size / global_ if _WORLD.active else 1.0


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` in one flat buffer."""
    if not _WORLD.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= _WORLD.size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def any_rank(flag: torch.Tensor) -> bool:
    """Whether ``flag`` (a boolean tensor) is true on any rank (one host sync)."""
    if not _WORLD.active:
        return bool(flag)
    value = flag.to(torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_parameters(params: Sequence[torch.nn.Parameter]) -> None:
    """Make every rank start from rank 0's values."""
    if not _WORLD.active:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def gather_objects(local: list) -> list:
    """Every rank's list, concatenated in rank order."""
    if not _WORLD.active:
        return local
    parts: list = [None] * _WORLD.size
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]
