"""A quantized frozen backbone (``model.quantize``): the linear layers of its transformer layers
held in 8 or 4 bits by bitsandbytes, on a CPU as on a CUDA GPU.

* ``int8``: LLM.int8() (``bnb.nn.Linear8bitLt``, the ``load_in_8bit`` of transformers): one
  int8 weight and one scale per output row; each call quantizes its inputs per row as well and
  multiplies in int8, columns of inputs above :data:`INT8_THRESHOLD` kept in 16 bits.
* ``nf4`` / ``fp4``: QLoRA's 4-bit weights (``bnb.nn.Linear4bit``, the ``load_in_4bit`` of
  transformers): one 4-bit code per weight and one scale per block of 64 (the scales
  quantized again), dequantized to the backbone's dtype for every call.

Only the transformer layers' ``nn.Linear`` modules change: embeddings, norms, the final norm and
the LM head keep the backbone's dtype (``runtime.precision``), and what trains (generators,
gates, head) stays fp32. The quantized layers compute gradients for their inputs (the prompts
reach the loss through them), none for their frozen weights. A saved prompt model holds only
what trains and records the mode; loading it quantizes its backbone again.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from types import ModuleType

import torch
from torch import nn

from ..errors import ConfigError

MODES = ("none", "int8", "nf4", "fp4")
EXTRA = "pip install 'spt-search[quant]' (bitsandbytes)"
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, transformers' llm_int8_threshold default


class _Quiet(logging.Filter):
    """bitsandbytes' notes that say nothing to a user of this package: every int8 call on
    fp32/bf16 inputs ("inputs will be cast ... to float16", which LLM.int8() always does), and
    the 4-bit inference kernel it cannot fetch (:func:`bitsandbytes`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("will be cast from" in message or "kernels-community" in message)


def available() -> bool:
    """Whether bitsandbytes is installed (without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def bitsandbytes() -> ModuleType:
    """``bitsandbytes``, imported with its per-call notes filtered (:class:`_Quiet`).

    On a CPU with AVX512-BF16, importing it fetches a 4-bit inference kernel from the Hugging
    Face Hub through the ``kernels`` package, where that is installed (transformers installs
    it). The kernel serves only eval-mode calls without gradients, which :func:`_linear4bit`
    turns off: the import here sees no ``kernels`` package, so nothing is downloaded."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet())
    if "bitsandbytes" in sys.modules:  # (imported already, by this function or by another package)
        return sys.modules["bitsandbytes"]
    kernels = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]  # (import kernels: ImportError)
    try:
        import bitsandbytes
    finally:
        if kernels is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels
    return bitsandbytes


def check_quantize(mode: str, model_type: str | None = None, quantizable: bool = True) -> None:
    """Refuse a mode this installation or this backbone (``model_type``, ``quantizable`` as its
    family says) cannot run, with the field, the reason and the fix."""
    if mode == "none":
        return
    if mode not in MODES:
        raise ConfigError("model.quantize", f"must be one of {', '.join(MODES)}, got {mode!r}")
    if not quantizable:
        raise ConfigError(
            "model.quantize",
            f"{mode} is not offered for {model_type} backbones (their fused Conv1D "
            "projections are not nn.Linear layers); use model.quantize: none, or a LLaMA-family "
            "decoder or an encoder",
        )
    if not available():
        raise ConfigError(
            "model.quantize", f"{mode} needs bitsandbytes, which is not installed: {EXTRA}; or set model.quantize: none"
        )


def quantize_linears(module: nn.Module, mode: str, dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by its bitsandbytes counterpart holding the
    same weights in ``mode`` (frozen), computing in ``dtype``; returns how many were replaced.
    The quantization happens here, on the module's device (a CPU at load time)."""
    bnb = bitsandbytes()
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, linear in targets:
        setattr(parent, name, _quantized(bnb, linear, mode, dtype))
    return len(targets)


def _quantized(bnb: ModuleType, linear: nn.Linear, mode: str, dtype: torch.dtype) -> nn.Module:
    """The bitsandbytes layer of ``mode`` holding ``linear``'s weights (quantized as it is moved
    to their device) and its bias, frozen."""
    sizes, common = (linear.in_features, linear.out_features), {"bias": linear.bias is not None, "device": "meta"}
    if mode == "int8":
        new = bnb.nn.Linear8bitLt(*sizes, **common, has_fp16_weights=False, threshold=INT8_THRESHOLD)
        new.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(*sizes, **common, compute_dtype=dtype, quant_type=mode, compress_statistics=True)
        # On CPUs with AVX512-BF16 a Linear4bit in eval mode repacks its weights, at the first call
        # without gradients, for a bf16 inference kernel that every later call then takes: with no
        # gradient for its inputs, and in bf16 whatever the dtype. The frozen backbone is always in
        # eval mode and must stay differentiable, with one arithmetic in training and evaluation.
        new.support_avx512bf16_for_cpu = False
        new.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, quant_type=mode, compress_statistics=True, module=new
        )
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return new.to(linear.weight.device)


def stored_bytes(module: nn.Module) -> int:
    """Bytes that ``module``'s parameters and buffers take as stored: a quantized weight's packed
    codes plus its scales (an 8-bit weight's per-row scales, a 4-bit weight's quantization state)."""
    total = 0
    for sub in module.modules():
        for tensor in (*sub.parameters(recurse=False), *sub.buffers(recurse=False)):
            total += tensor.numel() * tensor.element_size()
            state = getattr(tensor, "quant_state", None)  # Params4bit
            if state is not None:
                total += sum(
                    t.numel() * t.element_size()
                    for t in state.as_dict(packed=True).values()
                    if isinstance(t, torch.Tensor)
                )
        scales = getattr(getattr(sub, "weight", None), "SCB", None)  # Linear8bitLt, before its first call
        scales = scales if scales is not None else getattr(getattr(sub, "state", None), "SCB", None)  # after it
        if isinstance(scales, torch.Tensor):
            total += scales.numel() * scales.element_size()
    return total
