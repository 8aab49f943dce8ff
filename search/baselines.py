"""Established methods on the same frozen backbone, data, head and trainer as SPT: the
Hugging Face PEFT methods, bottleneck adapters, full fine-tuning, and the frozen backbone
alone with a head (a linear probe, or a verbalizer for zero-shot and in-context prompting).

:class:`EncoderClassifier` gives a PEFT-wrapped, adapted (or fully trainable) model the
interface the shared trainer uses (``forward(batch) -> PromptOutput``, ``weight_parameters``,
``trainable_state_dict``), with the same classifier head on the same real-token positions.
:class:`FrozenModel` runs the frozen backbone through the backbone adapter, as SPT does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from spt.adapters import adapter_size_for, add_adapters
from spt.backbone import FAMILIES, Backbone, load_hf_model, quantize_model, sublayer_outputs
from spt.errors import UserError
from spt.heads import ClassifierHead
from spt.model import unprompted_states
from spt.trainable import PromptOutput, TrainableMixin

PEFT_METHODS = ("peft-prompt", "peft-prefix", "peft-ptuning", "peft-lora")


class FrozenModel(TrainableMixin, nn.Module):
    """The frozen backbone alone (no prompt) with a head: a linear probe whose classifier trains
    (``head-only``), or a verbalizer with nothing to train (``zero-shot``, ``in-context``)."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def train(self, mode: bool = True) -> FrozenModel:
        super().train(mode)
        self.backbone.train(False)
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> PromptOutput:
        representation = self.head.representation(unprompted_states(self.backbone, batch), batch)
        return PromptOutput(self.head(representation), representation)

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())


class EncoderClassifier(TrainableMixin, nn.Module):
    """A Hugging Face encoder (PEFT-wrapped or not) plus our classifier head.

    ``virtual_tokens`` positions that PEFT prepends to the output (prompt tuning,
    P-tuning) are skipped, so the head pools over the real tokens only.
    ``train_encoder_mode``: whether the encoder's own dropout runs in training (full
    fine-tuning) or stays off like SPT's frozen backbone (PEFT methods).
    """

    def __init__(
        self, encoder: nn.Module, head: ClassifierHead, virtual_tokens: int = 0, train_encoder_mode: bool = False,
        token_types: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.virtual_tokens = virtual_tokens
        self.train_encoder_mode = train_encoder_mode
        self.token_types = token_types  # PEFT's prompt-learning methods drop token type ids
        # Fixed now: the trainer switches requires_grad while it steps.
        self._weights = [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> EncoderClassifier:
        super().train(mode)
        if not self.train_encoder_mode:
            self.encoder.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> PromptOutput:
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.token_types and "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        states = self.encoder(**kwargs).last_hidden_state
        states = states[:, states.shape[1] - batch["input_ids"].shape[1] :]  # drop virtual-token positions
        representation = self.head.representation(states, batch)
        return PromptOutput(self.head(representation), representation)

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self._weights)


def lora_rank_for(target_params: int, hidden: int, num_layers: int) -> int:
    """LoRA on the query and value projections holds ``4 * r * d * L`` parameters."""
    return max(1, round(target_params / (4 * hidden * num_layers)))


def ptuning_hidden_for(target_params: int, hidden: int, length: int) -> int:
    """Width ``h`` whose P-tuning prompt encoder (embedding + MLP d->h->h->d) is nearest ``target_params``."""
    def size(h: int) -> int:
        return length * hidden + (hidden * h + h) + (h * h + h) + (h * hidden + hidden)

    return min(range(8, 4097, 8), key=lambda h: abs(size(h) - target_params))


def check_quantized(method: str, quantize: str) -> None:
    """Refuse full fine-tuning of a quantized backbone (``model.quantize``): its weights cannot train."""
    if method == "finetune" and quantize != "none":
        raise UserError("strategy finetune", f"trains every backbone weight, and model.quantize: {quantize} holds them "
                        "frozen in fewer bits; leave finetune out, or set model.quantize: none")


def build_baseline(
    method: str, backbone_name: str, num_labels: int, pooling: str, dropout: float, prompt_length: int,
    target_params: int, lora_r: int | None = None, ptuning_hidden: int | None = None, backbone: Backbone | None = None,
    adapter_kind: str = "houlsby", adapter_size: int | None = None, quantize: str = "none",
) -> EncoderClassifier:
    """A fresh model set up for ``method`` (a PEFT method, ``adapter`` or ``finetune``) with a new
    head (``pooling`` as resolved for the backbone).

    The model is loaded from ``backbone_name`` (its layers' linear weights quantized as
    ``quantize``, ``model.quantize``, says), or copied from ``backbone`` when given, as quantized
    as that is (PEFT and adapters change the model they wrap, so the frozen backbone itself is
    never handed over).
    """
    check_quantized(method, quantize)
    model = copy.deepcopy(backbone.base) if backbone is not None else quantize_model(load_hf_model(backbone_name)[0], quantize)
    family = FAMILIES[model.config.model_type]
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    head = ClassifierHead(hidden, num_labels, pooling, dropout)
    if method == "finetune":
        model.requires_grad_(True)
        return EncoderClassifier(model, head, train_encoder_mode=True)
    if method == "adapter":
        size = adapter_size or adapter_size_for(target_params, hidden, layers, adapter_kind)
        model.requires_grad_(False)  # the backbone stays frozen; only the adapters (and the head) train
        model.adapters = add_adapters(sublayer_outputs(model), hidden, size, adapter_kind)
        return EncoderClassifier(model, head)
    try:
        from peft import (
            LoraConfig,
            PrefixTuningConfig,
            PromptEncoderConfig,
            PromptTuningConfig,
            TaskType,
            get_peft_model,
        )
    except ImportError:
        raise UserError(f"strategy {method}", "needs the peft package: pip install 'peft>=0.13' (the peft extra of spt-search)") from None
    task = TaskType.FEATURE_EXTRACTION
    virtual = 0
    if method == "peft-prompt":
        peft_config, virtual = PromptTuningConfig(task_type=task, num_virtual_tokens=prompt_length), prompt_length
    elif method == "peft-prefix":
        if not family.peft_prefix:
            raise UserError(
                f"strategy peft-prefix: PEFT prefix tuning cannot run on {model.config.model_type} backbones "
                "(its attention bias does not cover prefix keys); leave it out for this backbone"
            )
        peft_config = PrefixTuningConfig(task_type=task, num_virtual_tokens=prompt_length)
    elif method == "peft-ptuning":
        width = ptuning_hidden or ptuning_hidden_for(target_params, hidden, prompt_length)
        peft_config = PromptEncoderConfig(task_type=task, num_virtual_tokens=prompt_length, encoder_hidden_size=width)
        virtual = prompt_length
    elif method == "peft-lora":
        rank = lora_r or lora_rank_for(target_params, hidden, layers)
        peft_config = LoraConfig(task_type=task, r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                 target_modules=list(family.attention_projections))
    else:
        raise UserError("strategy", f"unknown baseline {method!r}")
    peft_model = get_peft_model(model, peft_config)
    return EncoderClassifier(peft_model, head, virtual_tokens=virtual, token_types=method == "peft-lora")
