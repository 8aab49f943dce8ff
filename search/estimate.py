"""What a search, a retraining and inference will need in memory, known before any weight is
loaded (``spt estimate``).

The backbone is built from its config alone (``config.json``: a model folder, an installed
alias, or a hub id in the local Hugging Face cache) on the meta device, as torch's fake tensors
(shapes, dtypes and a meta storage; no data, no memory), which pose as the device the run will
use. On it the real steps of the run are taken, as the trainer takes them: the supernet's weight
step (the consistency pass: the full and the masked pass as one batch of 2B) and its gate step
(``B x search.arch_batches`` examples), the sparse model's step with ``K`` prompt layers, and an
evaluation batch. A dispatch mode (:class:`LiveMemory`) sees every storage those operations make
and when the last tensor holding it goes, and keeps the peak of what is alive: the weights,
the optimizer state (made by the real optimizer's first step), gradients, what autograd saves
for the backward pass (with activation checkpointing: each prompted layer's inputs, and one
layer's recomputation at a time), and the transients (attention, logits). Each training phase is
run once, with the optimizer state already in place (made by one step of each optimizer).

Precision as the trainer has it (:class:`~search.feed.Precision`): ``fp32``, or ``bf16`` with the
backbone stored in bf16 and the forward passes under autocast (for a CUDA target, the functions
CUDA's autocast runs in fp32 and CPU's in bf16 - layer norms, softmax - run in fp32 here too:
:func:`cuda_autocast`). ``int8`` and ``nf4`` (``fp4`` takes the bytes of ``nf4``) are what
``model.quantize`` holds, as analytic lines over the bf16 estimate: the transformer layers' linear
weights at the bytes per weight bitsandbytes stores (int8: 1 byte and an fp32 scale per output
row; nf4: half a byte, a one-byte scale per block of 64 and an fp32 scale per 256 blocks), plus
one dequantized bf16 weight as a transient.

A CUDA target adds its cuBLAS workspaces (:data:`CUDA_WORKSPACES`). What it does not count: the
CUDA context (outside torch's allocator) and the caching allocator's rounding and fragmentation
(leave headroom: ``--headroom``), the kept states below the first prompt layer (none where the
first candidate is layer 0; at most ``runtime.frozen_cache_mb`` otherwise, added to the weights),
``runtime.compile``'s graphs, and padding: every sequence is ``length`` tokens long (the worst case).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from spt.backbone import Backbone, check_supported
from spt.errors import ConfigError, UserError
from spt.heads import VerbalizerHead, build_head
from spt.hub import ALIASES, HUB_IDS, resolve_model_source
from spt.model import PromptModel, PromptSupernet, SparsePromptModel

from .config import RunConfig

if TYPE_CHECKING:
    from .feed import Feed
    from .trainer import Trainer

STAGES = ("search", "retrain", "inference")
PRECISIONS = ("fp32", "bf16", "int8", "nf4")
CHECKPOINTING = ("none", "prompted")
DEVICES = ("cuda", "cpu")
# A quantized linear layer's bytes (bitsandbytes' layout, see the docstring): per weight, and per output row.
QUANTIZED_BYTES: dict[str, tuple[float, int]] = {"int8": (1.0, 4), "nf4": (0.5 + 1 / 64 + 4 / (64 * 256), 0)}
# model.quantize's fp4: the same Linear4bit layout as nf4 (estimated when asked for by name only)
QUANTIZED_BYTES["fp4"] = QUANTIZED_BYTES["nf4"]
_UNITS = {
    "": 10**9,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
MAX_BATCH = 1 << 20  # the largest batch the search for the largest batch tries
# A CUDA target's cuBLAS workspaces, allocated through torch's allocator: 32 MiB (Hopper) for each of the
# two threads that multiply matrices, the forward pass's and autograd's device thread.
CUDA_WORKSPACES = 2 * 32 * 2**20


def parse_memory(text: str) -> int:
    """Bytes of a memory size such as ``80GB``, ``24 GiB``, ``48000MB`` or ``80`` (GB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError("--memory", f"{text!r} is not a memory size; write e.g. 80GB, 24GiB or 48000MB")
    return int(float(match.group(1)) * _UNITS[unit])


def gigabytes(n: float) -> str:
    return f"{n / 10**9:.2f}"


# ---------------------------------------------------------------------- counting live storages


class LiveMemory:
    """The bytes of the storages alive, and their peak, while the operations of a block run
    (``with memory.counting():``): each storage counted once, from the operation that makes it
    until its last tensor (or view) is gone, as a device allocator sees them."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def restart_peak(self) -> None:
        self.peak = self.current

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        memory = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    if isinstance(leaf, torch.Tensor):
                        memory.track(leaf)
                return out

        with Mode():
            yield


# What CUDA's autocast runs in fp32 and CPU's does not, among the functions our backbones call
# (torch.nn.functional's: nn.LayerNorm and nn.GroupNorm call them; eager attention's softmax).
CUDA_FP32 = ("layer_norm", "group_norm", "softmax", "log_softmax")


@contextlib.contextmanager
def cuda_autocast() -> Iterator[None]:
    """Under a CPU autocast, run in fp32 what CUDA's autocast runs in fp32 (layer norms: their outputs,
    and the residual streams after them, stay fp32): a CUDA run's dtypes, hence its memory, from fake
    CPU tensors. The casts happen above autograd, as autocast's own do, and also in a checkpointed
    layer's recomputation inside the backward pass (so: the functions replaced while inside, not a mode)."""
    import torch.nn.functional as F  # noqa: N812

    originals = {name: getattr(F, name) for name in CUDA_FP32}

    def in_fp32(original: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.is_autocast_enabled("cpu"):

                def up(x: Any) -> Any:
                    return (
                        x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x
                    )

                args, kwargs = tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(F, name, in_fp32(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(F, name, original)


# ---------------------------------------------------------------------- the model from its config


def backbone_config(name: str) -> Any:
    """The Hugging Face config of backbone ``name`` (a model folder, an alias, or a hub id whose
    config.json is in the local cache), read without network and without weights."""
    from transformers import AutoConfig

    try:
        source = resolve_model_source(name)
    except UserError as exc:  # an alias whose weight package is not installed: its hub config, if cached
        alias = ALIASES.get(name.lower())
        if alias is None:
            raise
        source, why = HUB_IDS[alias], str(exc)
    else:
        why = None
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        detail = why or f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise UserError(
            f"model.backbone: no config for {name!r} on this machine ({detail}); give a model folder "
            "holding config.json (weights not needed), an installed alias (spt models list), or a hub "
            "id whose config.json is in the local Hugging Face cache"
        ) from None


def fake_backbone(hf_config: Any, with_lm_head: bool, dtype: torch.dtype, name: str) -> Backbone:
    """A frozen :class:`Backbone` of fake tensors (call inside a ``FakeTensorMode``): no weight loaded."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    family = check_supported(hf_config.model_type)
    loader = (AutoModelForCausalLM if family.runner.decoder else AutoModelForMaskedLM) if with_lm_head else AutoModel
    return Backbone(loader.from_config(hf_config, dtype=dtype), name=name)


def worst_layers(candidates: list[int], k: int) -> list[int]:
    """``k`` prompt layers whose training keeps the most: the lowest candidate (every layer above it
    is in the backward pass) and the rest spread evenly up to the highest."""
    k = max(1, min(k, len(candidates)))
    if k == 1:
        return [candidates[0]]
    return sorted({candidates[round(i * (len(candidates) - 1) / (k - 1))] for i in range(k)})


def retrain_k(config: RunConfig, hidden: int, candidates: int) -> int:
    """K of the retrained model: ``select.k``, or the most generators ``select.budget`` pays for
    (refused as a run refuses it: K above the candidates, a budget that pays for none)."""
    from .selection import choose_k, generator_parameters

    per = generator_parameters(hidden, config.prompt.bottleneck, config.prompt.phm_n)
    return choose_k(candidates, config.select.k, config.select.budget, per)


# ---------------------------------------------------------------------- one estimate


@dataclass
class Row:
    """One line of the estimate: a stage in one precision and checkpointing mode."""

    stage: str
    precision: str
    checkpointing: str | None  # None: inference (nothing kept for a backward pass)
    batch: int
    length: int
    params: int
    trainable: int
    weights_bytes: int  # parameters and buffers (and kept states), as stored
    state_bytes: int  # optimizer state, kept between steps
    peak_bytes: int  # all of it at the step's peak
    layers: list[int] = field(default_factory=list)
    max_batch: int | None = None
    fits: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Peaks:
    """What one simulated stage measured."""

    params: int
    trainable: int
    weights_bytes: int
    state_bytes: int
    phases: dict[str, int]  # phase -> peak bytes
    layers: list[int]
    # the layers' linear weights: how many, their output rows, the largest one
    quantizable: tuple[int, int, int] = (0, 0, 0)

    @property
    def peak(self) -> int:
        return max(self.phases.values())


Probe = Callable[[str, LiveMemory], contextlib.AbstractContextManager]


@dataclass
class _Run:
    """One simulated (or real) stage: its model and feed, the memory count, the peak of each phase."""

    model: PromptModel
    precision: str
    memory: LiveMemory
    probe: Probe
    real: bool
    device: str
    feed: Feed | None = None
    phases: dict[str, int] = field(default_factory=dict)

    def phase(self, name: str, work: Callable[[], object]) -> None:
        """Run ``work`` counting what it makes; its peak is the phase's."""
        with self.memory.counting():
            self.memory.restart_peak()
            with self.probe(name, self.memory):
                work()
            self.phases[name] = self.memory.peak


class Estimator:
    """Simulates the stages of ``config``'s run on a fake backbone (see the module docstring)."""

    def __init__(self, config: RunConfig, device: str = "cuda") -> None:
        if device not in DEVICES:
            raise UserError("--device", f"choose one of {', '.join(DEVICES)}, not {device!r}")
        self.config, self.device = config, device
        self.hf_config = backbone_config(config.model.backbone)
        self.family = check_supported(self.hf_config.model_type)
        head = config.head
        if head.verbalizer and head.type != ("clm" if self.family.runner.decoder else "mlm"):
            kind = "a decoder" if self.family.runner.decoder else "an encoder"
            raise ConfigError("head.type", f"{head.type!r} does not fit {config.model.backbone!r}, {kind}")
        self._fake = None
        self._backbones: dict[torch.dtype, Backbone] = {}
        self._peaks: dict[tuple, Peaks] = {}

    # --- the fake world

    @property
    def fake(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        if self._fake is None:
            self._fake = FakeTensorMode(allow_non_fake_inputs=True)
        return self._fake

    def backbone(self, dtype: torch.dtype) -> Backbone:
        if dtype not in self._backbones:
            with self.fake, _quiet():
                self._backbones[dtype] = fake_backbone(
                    self.hf_config, self.config.head.verbalizer, dtype, self.config.model.backbone
                )
        return self._backbones[dtype]

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def candidates(self) -> list[int]:
        return self.config.prompt.candidates(self.num_layers)

    def sparse_layers(self) -> list[int]:
        return worst_layers(self.candidates, retrain_k(self.config, self.hf_config.hidden_size, len(self.candidates)))

    def _head(self, backbone: Backbone) -> nn.Module:
        head, labels = self.config.head, self.config.task.labels
        if head.verbalizer:  # token ids do not change the memory: no tokenizer needed
            return VerbalizerHead(backbone, list(range(len(labels))), head.type)
        return build_head(backbone, head, labels)

    def model(
        self, stage: str, backbone: Backbone, checkpointing: str, world: contextlib.AbstractContextManager | None = None
    ) -> PromptModel:
        """The supernet (``search``) or the sparse model on :meth:`sparse_layers`, made in ``world``
        (default: the fake tensor mode)."""
        from .pipeline import search_prompt

        config, labels = self.config, self.config.task.labels
        with world if world is not None else self.fake:
            torch.manual_seed(config.seed)
            if stage == "search":
                model: PromptModel = PromptSupernet(
                    backbone,
                    search_prompt(config, backbone),
                    self._head(backbone),
                    config.head,
                    labels,
                    config.model.max_length,
                )
            else:
                model = SparsePromptModel(
                    backbone,
                    config.prompt,
                    self._head(backbone),
                    config.head,
                    labels,
                    self.sparse_layers(),
                    config.model.max_length,
                )
        model.activation_checkpointing = checkpointing
        return model

    def batch(
        self, rows: int, length: int, autocast_dtype: torch.dtype | None, device: torch.device | str = "cpu"
    ) -> dict[str, Any]:
        """What :func:`spt.inputs.collate` makes for ``rows`` examples of ``length`` tokens (no padding)."""
        with torch.device(device):
            return self._batch(rows, length, autocast_dtype)

    def _batch(self, rows: int, length: int, autocast_dtype: torch.dtype | None) -> dict[str, Any]:
        ids = torch.full((rows, length), 1, dtype=torch.long)
        batch: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.zeros(rows, dtype=torch.long),
        }
        if self.config.head.type == "mlm":
            batch["mask_positions"] = torch.full((rows,), length - 1, dtype=torch.long)
        weights = autocast_dtype or torch.float32
        batch["pool_weights"] = torch.full((rows, self.config.prompt.length, length), 1 / length, dtype=weights)
        batch["mean_weights"] = torch.full((rows, length), 1 / length, dtype=weights)
        batch["last_positions"] = torch.full((rows,), length - 1, dtype=torch.long)
        batch["has_padding"] = False
        return batch

    # --- simulation

    def simulate(
        self,
        stage: str,
        precision: str,
        checkpointing: str,
        batch: int,
        length: int,
        eval_batch: int | None = None,
        backbone: Backbone | None = None,
        device: str = "cpu",
        probe: Probe | None = None,
    ) -> Peaks:
        """Peak bytes of each phase of ``stage`` (``fp32`` or ``bf16``: the quantized lines are
        made from ``bf16``) at ``batch`` examples of ``length`` tokens.

        With a real ``backbone`` (on ``device``) the same steps run on real tensors: what
        ``benchmarks/memory.py`` measures; ``probe(phase, memory)`` then wraps each phase (a profiler)."""
        from .feed import Precision

        real = backbone is not None
        world = contextlib.nullcontext() if real else self.fake
        backbone = backbone if real else self.backbone(Precision(precision).backbone_dtype)
        model = self.model(stage, backbone, checkpointing, world)
        run = _Run(
            model, precision, LiveMemory(), probe or (lambda phase, memory: contextlib.nullcontext()), real, device
        )
        kept = self._kept_bytes(model)
        with world, _quiet(), self._device_semantics(precision, real):
            run.feed = self._feed(model, precision, real, device)
            for tensor in [*model.parameters(), *model.buffers()]:
                run.memory.track(tensor)
            run.memory.current += kept
            weights = run.memory.current
            state = self._train(run, stage, batch, length) if stage != "inference" else 0
            self._evaluate(run, eval_batch or self.config.search.eval_batch_size, length)
        params = sum(p.numel() for p in model.parameters())
        return Peaks(
            params,
            model.num_trainable_parameters(),
            weights,
            state,
            run.phases,
            list(model.layers),
            _linear_weights(backbone),
        )

    @staticmethod
    def _feed(model: PromptModel, precision: str, real: bool, device: str) -> Feed:
        """The model's :class:`~search.feed.Feed` (a fake model stays where it is: a feed would move it)."""
        from .feed import Feed

        if real:
            return Feed(model, None, device, precision, 0)
        model.to = lambda *args, **kwargs: model
        try:
            return Feed(model, None, "cpu", precision, 0)
        finally:
            del model.to

    def _trainer(self, run: _Run, stage: str) -> Trainer:
        """The trainer of ``stage`` as the pipeline makes it (the search's with its consistency loss)."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from .losses import search_loss
        from .trainer import Trainer

        config = self.config
        settings = dataclasses.replace(
            config.search if stage == "search" else config.retrain, gradient_accumulation_steps=1
        )
        extra: dict[str, Any] = {}
        if stage == "search":
            loss = search_loss(
                config.search.consistency_weight, config.search.mask_prob, config.seed, len(run.model.layers)
            )
            if not run.real:
                draw = loss.inputs

                def host_inputs(step: int) -> tuple[Any, ...]:  # the mask is drawn on the host
                    with unset_fake_temporarily():
                        return draw(step)

                loss.inputs = host_inputs
            extra["loss"] = loss
        fused = (torch.device(run.device).type if run.real else self.device) == "cuda"  # (as the trainer on a GPU)
        return Trainer(run.model, settings, run.feed, config.seed, fused_optimizer=fused, **extra)

    def _train(self, run: _Run, stage: str, batch: int, length: int) -> int:
        """The weight step (and the search's gate step) with the optimizer state in place; the state's bytes."""
        trainer, memory = self._trainer(run, stage), run.memory
        gate_rows = batch * self.config.search.arch_batches
        with memory.counting():
            batches = {
                rows: self.batch(rows, length, run.feed.precision.autocast_dtype, run.feed.device)
                for rows in ({batch, gate_rows} if stage == "search" else {batch})
            }
        run.feed.local_batch = lambda indices: (batches[len(indices)], 1.0)
        before = memory.current  # (the batches stay on the device through the steps)
        with memory.counting():  # the optimizer state, as the first step leaves it
            for optimizer in trainer.optimizers().values():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        run.phase("weight step", lambda: trainer.weight_step(list(range(batch)), 1))
        if stage == "search":
            run.phase("gate step", lambda: trainer.architect.step(list(range(gate_rows)), 1))
        return memory.current - before

    def _evaluate(self, run: _Run, rows: int, length: int) -> None:
        """An evaluation batch, as the evaluator runs it (inference mode)."""

        def forward() -> None:
            batch = self.batch(rows, length, run.feed.precision.autocast_dtype, run.feed.device)
            with torch.inference_mode(), run.feed.autocast():
                run.model.eval()(batch)

        run.phase("evaluation", forward)

    def floor(
        self,
        precision: str,
        batch: int,
        length: int,
        backbone: Backbone | None = None,
        device: str = "cpu",
        probe: Probe | None = None,
    ) -> int:
        """Peak bytes of the frozen floor (``benchmarks/speed.py``): the bare backbone's forward and
        backward pass for gradients of its input embeddings only, through the adapter's layers."""
        from .feed import Precision

        precision_ = Precision(precision)
        real = backbone is not None
        world = contextlib.nullcontext() if real else self.fake
        backbone = backbone if real else self.backbone(precision_.backbone_dtype)
        memory = LiveMemory()
        with world, _quiet(), self._device_semantics(precision, real):
            for tensor in [*backbone.parameters(), *backbone.buffers()]:
                memory.track(tensor)
            with memory.counting():
                ids = self.batch(batch, length, None, device)["input_ids"]
                memory.restart_peak()
                with probe("floor", memory) if probe else contextlib.nullcontext():
                    with precision_.autocast(torch.device(device).type):
                        hidden = backbone.embed(ids).detach().requires_grad_(True)
                        context = backbone.layer_context(hidden, None)
                        out = hidden
                        for i in range(backbone.num_layers):
                            out = backbone.run_layer(i, out, context)
                        out = backbone.finish(out)
                    out.float().mean().backward()
                    del hidden, context, out
        return memory.peak

    def _kept_bytes(self, model: PromptModel) -> int:
        """The kept states below the first prompt layer: at most ``runtime.frozen_cache_mb``."""
        return int(self.config.runtime.frozen_cache_mb * 2**20) if model.frozen_upto > 0 else 0

    def _device_semantics(self, precision: str, real: bool = False) -> contextlib.AbstractContextManager:
        """A CUDA target's autocast dtypes on fake CPU tensors (a real run has its own device's)."""
        emulate = not real and self.device == "cuda" and precision != "fp32"
        return cuda_autocast() if emulate else contextlib.nullcontext()

    # --- rows

    def row(
        self,
        stage: str,
        precision: str,
        checkpointing: str,
        batch: int,
        length: int,
        memory: int | None = None,
        headroom: float = 0.1,
    ) -> Row:
        """The estimate of one stage, precision and checkpointing mode, and (``memory``) the largest
        batch whose peak stays under ``memory`` less ``headroom`` of it."""
        peaks = self.peaks(stage, precision, checkpointing, batch, length)
        row = Row(
            stage,
            precision,
            None if stage == "inference" else checkpointing,
            batch,
            length,
            peaks.params,
            peaks.trainable,
            peaks.weights_bytes + self._quantized_delta(peaks, precision),
            peaks.state_bytes,
            self.total(peaks, precision),
            peaks.layers,
        )
        if memory is not None:
            usable = memory * (1 - headroom)
            row.fits = row.peak_bytes <= usable
            row.max_batch = self.max_batch(stage, precision, checkpointing, length, usable, batch)
        return row

    def peaks(self, stage: str, precision: str, checkpointing: str, batch: int, length: int) -> Peaks:
        simulated = "bf16" if precision in QUANTIZED_BYTES else precision
        key = (stage, simulated, checkpointing, batch, length)
        if key not in self._peaks:
            # inference: ``batch`` is the evaluation batch; training stages evaluate at search.eval_batch_size
            self._peaks[key] = self.simulate(
                stage, simulated, checkpointing, batch, length, batch if stage == "inference" else None
            )
        return self._peaks[key]

    def total(self, peaks: Peaks, precision: str) -> int:
        """The peak a row reports: the simulated one, with the quantized weights and the CUDA workspaces."""
        delta = self._quantized_delta(peaks, precision)
        if delta:
            delta += 2 * peaks.quantizable[2]  # one weight dequantized to bf16 for a matmul
        return peaks.peak + delta + (CUDA_WORKSPACES if self.device == "cuda" else 0)

    @staticmethod
    def _quantized_delta(peaks: Peaks, precision: str) -> int:
        """Bytes the quantized layers' weights take less than in bf16 (negative)."""
        if precision not in QUANTIZED_BYTES:
            return 0
        count, rows, _ = peaks.quantizable
        per_weight, per_row = QUANTIZED_BYTES[precision]
        return int(math.ceil(per_weight * count + per_row * rows)) - 2 * count

    def max_batch(
        self, stage: str, precision: str, checkpointing: str, length: int, usable: float, start: int = 1
    ) -> int:
        """The largest batch whose estimated peak is at most ``usable`` bytes (0: not even one example).

        A phase's peak grows linearly with the batch (every activation has a batch dimension), so
        a line through two batches guesses the answer and a few simulations near it confirm it."""

        def peak(b: int) -> int:
            return self.total(self.peaks(stage, precision, checkpointing, b, length), precision)

        if peak(1) > usable:
            return 0
        low, high = 1, MAX_BATCH + 1  # peak(low) fits, peak(high) does not (MAX_BATCH + 1: taken as not fitting)

        def probe(b: int) -> None:
            nonlocal low, high
            if low < b < high:
                if peak(b) <= usable:
                    low = b
                else:
                    high = b

        points = [start, 2 * start]
        for b in points:
            probe(b)
        for _ in range(4):  # secant steps
            a, b = points[-2], points[-1]
            slope = (peak(b) - peak(a)) / (b - a) if a != b else 0
            guess = MAX_BATCH if slope <= 0 else a + int((usable - peak(a)) // slope)
            guess = min(max(guess, low), high - 1)
            probe(guess)
            probe(guess + 1)
            if high - low <= 1:
                return low
            if guess in points:
                break
            points.append(guess)
        while high - low > 1:  # bisection where the lines missed
            mid = (low + high) // 2 if high <= MAX_BATCH else min(2 * low, MAX_BATCH)
            if mid == low:
                break
            probe(mid)
            if mid == MAX_BATCH and low == MAX_BATCH:
                break
        return low


def _linear_weights(backbone: Backbone) -> tuple[int, int, int]:
    """The transformer layers' linear weights (what a quantized backbone stores in 8 or 4 bits):
    how many, their output rows, and the largest weight."""
    count, rows, largest = 0, 0, 0
    for module in backbone.layers.modules():
        if isinstance(module, nn.Linear):
            count += module.weight.numel()
            rows += module.out_features
            largest = max(largest, module.weight.numel())
    return count, rows, largest


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' and torch's notes about fake tensors are no news to a user."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------- the command


@dataclass
class Estimate:
    """All rows of ``spt estimate`` and what they were made for."""

    backbone: str
    family: str
    layers: int
    hidden: int
    device: str
    memory_bytes: int | None
    headroom: float
    rows: list[Row]

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "family": self.family,
            "layers": self.layers,
            "hidden": self.hidden,
            "device": self.device,
            "memory_bytes": self.memory_bytes,
            "headroom": self.headroom,
            "rows": [r.to_dict() for r in self.rows],
        }

    def table(self) -> str:
        """The rows as an aligned text table."""
        memory = f"largest batch on {gigabytes(self.memory_bytes)} GB" if self.memory_bytes else None
        head = [
            "stage",
            "precision",
            "checkpointing",
            "params",
            "trainable",
            "batch x length",
            "weights GB",
            "optimizer GB",
            "peak GB",
        ] + ([memory] if memory else [])
        lines = [head]
        for r in self.rows:
            cells = [
                r.stage,
                r.precision,
                r.checkpointing or "-",
                f"{r.params:,}",
                f"{r.trainable:,}",
                f"{r.batch} x {r.length}",
                gigabytes(r.weights_bytes),
                gigabytes(r.state_bytes),
                gigabytes(r.peak_bytes),
            ]
            if memory:
                cells.append(f"{r.max_batch:,}" + ("" if r.fits else " (batch does not fit)"))
            lines.append(cells)
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        text = [
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
            for line in lines
        ]
        text.insert(1, "  ".join("-" * w for w in widths))
        note = (
            f"{self.backbone} ({self.family}, {self.layers} layers x {self.hidden}): estimated peak memory on a "
            f"{self.device.upper() if self.device == 'cuda' else 'CPU'} device (GB = 10^9 bytes); every sequence "
            "full length; int8/nf4/fp4: the layers' linear weights quantized (analytic, from bf16)"
        )
        if self.memory_bytes:
            note += f"; largest batch: peak within {100 * (1 - self.headroom):.0f}% of the memory"
        return note + "\n" + "\n".join(text)


def _offered(precisions: list[str] | None, estimator: Estimator) -> list[str]:
    """The precisions to estimate: those asked for, or all; a quantized one only where model.quantize
    is offered for the backbone's family (GPT-2's Conv1D projections are not: refused if asked for)."""
    if estimator.family.quantizable:
        return list(precisions or PRECISIONS)
    asked = [p for p in precisions or () if p in QUANTIZED_BYTES]
    if asked:
        raise UserError(
            "--precision",
            f"{asked[0]} is not offered for {estimator.hf_config.model_type} backbones (model.quantize refuses "
            "their fused Conv1D projections); choose fp32 or bf16",
        )
    return [p for p in precisions or PRECISIONS if p not in QUANTIZED_BYTES]


def estimate(
    config: RunConfig,
    stages: list[str] | None = None,
    precisions: list[str] | None = None,
    checkpointing: list[str] | None = None,
    batch: int | None = None,
    length: int | None = None,
    memory: int | None = None,
    device: str = "cuda",
    headroom: float = 0.1,
) -> Estimate:
    """The estimate of every requested stage x precision x checkpointing mode. ``batch``: the
    training batch of search and retraining and the inference batch (default: search.batch_size,
    retrain.batch_size, search.eval_batch_size); ``length``: tokens per example (model.max_length)."""
    if batch is not None and batch < 1:
        raise UserError("--batch", f"must be at least 1, got {batch}")
    if length is not None and length < 1:
        raise UserError("--length", f"must be at least 1, got {length}")
    if not 0 <= headroom < 1:
        raise UserError("--headroom", f"must be in [0, 1), got {headroom}")
    estimator = Estimator(config, device)
    try:
        estimator.backbone(torch.float32).check_length(length or config.model.max_length, config.prompt.length)
    except ConfigError as exc:
        if length is None:  # model.max_length's own refusal
            raise
        raise UserError("--length", exc.problem.replace("model.max_length", "--length")) from None
    length = length or config.model.max_length
    config.prompt.validate(estimator.num_layers, estimator.hf_config.hidden_size)
    estimator.sparse_layers()  # (a K or budget the run would refuse: refused here too, before any stage)
    precisions = _offered(precisions, estimator)
    rows = []
    defaults = {
        "search": config.search.batch_size,
        "retrain": config.retrain.batch_size,
        "inference": config.search.eval_batch_size,
    }
    for stage in stages or list(STAGES):
        for precision in precisions:
            for mode in ["none"] if stage == "inference" else checkpointing or list(CHECKPOINTING):
                rows.append(estimator.row(stage, precision, mode, batch or defaults[stage], length, memory, headroom))
    return Estimate(
        config.model.backbone,
        estimator.hf_config.model_type,
        estimator.num_layers,
        estimator.hf_config.hidden_size,
        device,
        memory,
        headroom,
        rows,
    )
