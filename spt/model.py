"""The prompt supernetwork and the sparse prompt model: what a user builds, trains, saves and loads.

Both run the frozen backbone layer by layer with ``l`` prompt slots prepended to the
sequence (:func:`spt.prompted.run_prompted_layers`). At candidate layer ``i`` the slots
entering layer ``i+1`` become ``P_i = (1 - lambda*g_i) * P_hat_i + g_i * G_i(H_i)``
(:mod:`spt.mixing`), ``g_i`` the gate: the supernet's ``alpha~_i * m_i``, the sparse
model's 1 at the selected layers. What happens at each layer is planned on the host
before the pass (:mod:`spt.plan`), with the method variants the config selects
(:mod:`spt.variants`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .backbone import Backbone
from .config import HeadConfig, PromptConfig
from .errors import ConfigError, UserError
from .gates import LayerGates
from .generator import PromptGenerators
from .heads import build_head
from .inputs import TextInput
from .plan import ArchMask, Plan, Rows, active_rows, make_plan
from .prompted import frozen_layers, is_padded, run_prompted_layers, unprompted_states
from .serialization import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_trainable_state,
    load_weights,
    locate_model,
    model_sections,
    read_model_config,
    resolve_backbone,
    save_prompt_model,
    write_model_card,
)
from .trainable import PromptOutput, TrainableMixin
from .variants import AS_GENERATED, ATTENDED, PromptScale, SlotPresence, variants_for

# (the plan and the pass are re-exported: tests and search/ import them from here)
__all__ = [
    "PromptModel", "PromptOutput", "PromptSupernet", "SparsePromptModel",
    "load_prompt_model", "make_plan", "run_prompted_layers", "unprompted_states",
]


class PromptModel(TrainableMixin, nn.Module):
    """Shared part of the supernet and the sparse model: backbone, generators, head.

    ``max_length`` is the number of tokens an input is cut to (``model.max_length`` of the
    run) and ``instruction`` the line placed before every input (``task.instruction``); both
    are saved with the model, so :meth:`predict` tokenizes new text as in training.
    """

    KIND: ClassVar[str]  # "supernet" or "sparse": the kind a saved model's config records
    # ``runtime.activation_checkpointing`` (none, prompted, all): a runtime choice, set after
    # construction by whoever trains the model, never saved with it
    activation_checkpointing: str = "none"

    def __init__(
        self, backbone: Backbone, prompt: PromptConfig, head: nn.Module, head_config: HeadConfig,
        labels: list[str], layers: list[int], max_length: int | None = None, instruction: str | None = None,
    ) -> None:
        super().__init__()
        prompt.validate(backbone.num_layers, backbone.hidden_size)
        self.backbone = backbone
        self.prompt_config = prompt
        self.head_config = head_config
        self.labels = list(labels)
        self.max_length = max_length
        self.instruction = instruction
        self.head = head
        self.layers = sorted(layers)
        self.generators = PromptGenerators(
            len(self.layers), backbone.hidden_size, prompt.bottleneck, prompt.phm_n, prompt.activation, prompt.dropout
        )

    @property
    def prompt_length(self) -> int:
        return self.prompt_config.length

    @property
    def frozen_upto(self) -> int:
        """The lowest layer that can get a prompt: what the layers below it compute for an example
        never changes (frozen, no prompt), so a trainer may compute it once per example
        (:mod:`search.frozen`) and pass it as ``batch["frozen_states"]`` with ``batch["frozen_upto"]``."""
        return self.layers[0]

    def states_below_prompts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The states ``(B, T, d)`` entering layer :attr:`frozen_upto`, as a forward pass computes them."""
        return frozen_layers(self.backbone, batch, self.frozen_upto, is_padded(batch))

    def _encode(self, batch: dict[str, torch.Tensor], plan: Plan, gates: torch.Tensor | None) -> PromptOutput:
        states = run_prompted_layers(
            self.backbone, batch, self.generators, plan, gates, self.prompt_config.length, float(self.prompt_config.discard),
            # (prompted and all alike: the layers below the first prompt run without autograd)
            checkpointed=self.activation_checkpointing != "none",
        )
        representation = self.head.representation(states, batch)
        return PromptOutput(self.head(representation), representation)

    def _plan(self, active: list[Rows], hard: bool) -> Plan:
        """The plan of a pass inserting the prompts ``active`` says, with this model's variants."""
        return make_plan(self.backbone.num_layers, self.layers, active, hard, float(self.prompt_config.discard),
                         *self._variants())

    def _variants(self) -> tuple[PromptScale, SlotPresence]:
        """How its prompts are scaled and its slots attended (:mod:`spt.variants`): here the plain
        method, the sparse model's (gates of 1: nothing to rescale, slots fully present)."""
        return AS_GENERATED, ATTENDED

    def train(self, mode: bool = True) -> PromptModel:
        super().train(mode)
        self.backbone.train(False)
        return self

    # ------------------------------------------------------------------ saving and using

    def save_pretrained(self, directory: str | os.PathLike, metrics: dict | None = None) -> Path:
        """Config JSON, trainable weights (safetensors) and a ``README.md`` model card in ``directory``."""
        path = save_prompt_model(self, directory)
        write_model_card(path, metrics)
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, backbone: Backbone | str | None = None, *,
                        revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None, quantize: str | None = None) -> PromptModel:
        """The model saved in a folder, or in a hub repo ("user/name", downloaded with
        ``snapshot_download``; with ``HF_HUB_OFFLINE=1`` read from the Hugging Face cache), in
        eval mode. An existing folder comes first. Its backbone is loaded from the saved reference
        (an alias, a hub id, or a folder relative to the model's folder) unless given: a model
        trained on a local backbone folder needs ``backbone=`` when it comes from the hub. A
        backbone loaded here is quantized as the model was trained (``model.quantize``), or as
        ``quantize`` says (``none``, ``int8``, ``nf4``, ``fp4``)."""
        model = load_prompt_model(name_or_path, backbone, revision=revision, token=token, cache_dir=cache_dir,
                                  quantize=quantize)
        if not isinstance(model, cls):
            raise UserError("model", f"{name_or_path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = True, upload: bool = True,
                    metrics: dict | None = None) -> Path:
        """Save into a temporary folder, with a model card that loads it from ``repo_id`` (and
        ``metrics`` as its scores), and upload it to the Hugging Face Hub as ``repo_id`` (needs a
        reachable hub); ``upload=False`` only prepares the folder."""
        import tempfile

        folder = save_prompt_model(self, Path(tempfile.mkdtemp(prefix="spt-push-")) / repo_id.replace("/", "--"))
        write_model_card(folder, metrics, repo_id=repo_id)
        if upload:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id)
        return folder

    @torch.inference_mode()
    def predict(self, texts: str | Sequence[str | tuple[str, str]], batch_size: int = 32) -> list[dict]:
        """Label and class probabilities of each text, tokenized as in training (saved
        ``max_length``, instruction and template); always one record per input, in order.

        ``texts`` is one string, or a list of inputs each a string or a ``(text_a, text_b)``
        pair for two-segment tasks (a bare string is one input, as in a transformers pipeline,
        never a sequence of characters)."""
        from .inputs import collate, encode_split, longest_first

        if self.max_length is None:
            raise UserError("model.max_length", "this model was saved without max_length; set model.max_length")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError("batch_size", f"must be a whole number >= 1, not {batch_size!r}")
        examples = [_text_input(t, n) for n, t in enumerate([texts] if isinstance(texts, str) else texts)]
        if not examples:
            return []
        split = encode_split(self.backbone.tokenizer, examples, self.max_length, self.head_config, self.instruction)
        device = next(self.generators.parameters()).device
        self.eval()
        order = longest_first(split, range(len(split)))
        results: list[dict] = [{}] * len(split)
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            rows = self(collate(split, indices, device, self.prompt_length)).logits.float().softmax(-1).tolist()
            for i, row in zip(indices, rows):
                best = max(range(len(row)), key=row.__getitem__)
                results[i] = {"label": self.labels[best], "probabilities": dict(zip(self.labels, row))}
        return results

    def weight_parameters(self) -> list[nn.Parameter]:
        """``omega``: generator and head parameters."""
        return list(self.generators.parameters()) + list(self.head.parameters())


def _text_input(item: object, position: int) -> TextInput:
    """One ``predict`` input as the tokenizer's :class:`TextInput`: a string, or a pair of strings."""
    if isinstance(item, str):
        return TextInput(item)
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item):
        return TextInput(*item)
    raise UserError("texts", f"input {position} is {type(item).__name__} {item!r:.60}; give a string or a (text_a, text_b) "
                    "pair of strings")


class PromptSupernet(PromptModel):
    """Frozen backbone + a generator and a probability gate on every candidate layer."""

    KIND = "supernet"  # what a saved model's config calls it

    def __init__(
        self, backbone: Backbone, prompt: PromptConfig, head: nn.Module, head_config: HeadConfig, labels: list[str],
        max_length: int | None = None, instruction: str | None = None,
    ) -> None:
        prompt.validate(backbone.num_layers, backbone.hidden_size)
        super().__init__(backbone, prompt, head, head_config, labels, prompt.candidates(backbone.num_layers), max_length,
                         instruction)
        self.gates = LayerGates(len(self.layers), reparam=prompt.reparam_gates, init=prompt.gate_init, budget=prompt.gate_budget)

    @property
    def candidate_layers(self) -> list[int]:
        return self.layers

    def alphas(self) -> torch.Tensor:
        """Current gate probabilities ``alpha`` per candidate layer."""
        return self.gates.alpha().detach()

    def architecture_parameters(self) -> list[nn.Parameter]:
        """The gate logits ``a``."""
        return [self.gates.logits]

    def _variants(self) -> tuple[PromptScale, SlotPresence]:
        # as prompt.normalize and prompt.presence_bias say (a hard-gated pass drops the presence bias: make_plan)
        return variants_for(self.prompt_config)

    def forward(
        self, batch: dict[str, torch.Tensor], arch_mask: ArchMask | None = None, hard_gates: bool = False
    ) -> PromptOutput:
        """Scores with gates ``alpha~ * m``; ``arch_mask`` (C,) or (B, C) over candidates (host values).

        ``hard_gates=True`` uses the mask itself as gate values (1 = prompt inserted at
        full strength), which is what the sparse model computes (with the supernet's own
        prompts: rescaled when ``prompt.normalize``, as in its training).
        """
        plan = self._plan(active_rows(arch_mask, len(self.layers)), hard_gates)
        return self._encode(batch, plan, None if hard_gates else self.gates())

    def forward_consistency(self, batch: dict[str, torch.Tensor], arch_mask: ArchMask) -> tuple[PromptOutput, PromptOutput]:
        """The full pass and the masked pass (``arch_mask`` (C,), host values) of the same batch, as one batch of 2B."""
        B = batch["input_ids"].shape[0]
        doubled = {k: torch.cat([v, v], dim=0) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        masked = active_rows(arch_mask, len(self.layers))
        active = [(True,) * B + (column[0],) * B for column in masked]
        out = self._encode(doubled, self._plan(active, hard=False), self.gates())
        return PromptOutput(out.logits[:B], out.representation[:B]), PromptOutput(out.logits[B:], out.representation[B:])


class SparsePromptModel(PromptModel):
    """Generators only at the selected layers, no gates (their value is 1)."""

    KIND = "sparse"

    def __init__(
        self, backbone: Backbone, prompt: PromptConfig, head: nn.Module, head_config: HeadConfig,
        labels: list[str], layers: list[int], max_length: int | None = None, instruction: str | None = None,
    ) -> None:
        if not layers:
            raise ConfigError("mask.selected_layers", "is empty; a sparse model needs at least one prompt layer")
        bad = [i for i in layers if not 0 <= i < backbone.num_layers]
        if bad:
            raise ConfigError("mask.selected_layers", f"layers {bad} do not exist; the backbone has 0..{backbone.num_layers - 1}")
        super().__init__(backbone, prompt, head, head_config, labels, layers, max_length, instruction)
        self.plan = self._plan([(True,)] * len(self.layers), hard=True)  # fixed at construction

    @property
    def selected_layers(self) -> list[int]:
        return self.layers

    def forward(self, batch: dict[str, torch.Tensor]) -> PromptOutput:
        return self._encode(batch, self.plan, None)

    @torch.no_grad()
    def load_generators_from(self, supernet: PromptSupernet) -> None:
        """Start from the supernet's generator (and head) weights instead of from scratch."""
        index = [supernet.layers.index(i) for i in self.layers]
        for mine, theirs in zip(self.generators.parameters(), supernet.generators.parameters()):
            mine.copy_(theirs[index])
        self.head.load_state_dict(supernet.head.state_dict())


def load_prompt_model(name_or_path: str | os.PathLike, backbone: Backbone | str | None = None, *,
                      revision: str | None = None, token: str | bool | None = None,
                      cache_dir: str | os.PathLike | None = None, quantize: str | None = None) -> PromptModel:
    """Rebuild a saved supernet or sparse model, in eval mode (loading its backbone unless given,
    quantized as recorded or as ``quantize`` says), from a folder or a hub repo id (``revision``,
    ``token``, ``cache_dir``: see ``snapshot_download``)."""
    directory, origin = locate_model(name_or_path, revision, token, cache_dir)
    rerun = f"download it again (force_download) from {origin}" if origin else f"rerun the spt command that wrote {directory}"
    fix = f"; save the model again ({rerun})"
    config = read_model_config(directory, fix)
    prompt, head_config = model_sections(config, directory / CONFIG_FILE, fix)
    tensors = load_weights(directory, config, fix)  # (before the backbone: an edited fingerprint is named as such)
    backbone = resolve_backbone(config, directory, head_config.verbalizer, backbone, origin, quantize)
    head = build_head(backbone, head_config, config["labels"])
    inputs = {"max_length": config.get("max_length"), "instruction": config.get("instruction")}
    if config["kind"] == "supernet":
        model: PromptModel = PromptSupernet(backbone, prompt, head, head_config, config["labels"], **inputs)
    else:
        model = SparsePromptModel(backbone, prompt, head, head_config, config["labels"], config["layers"], **inputs)
    load_trainable_state(model, tensors, str(directory / WEIGHTS_FILE))
    return model.eval()
