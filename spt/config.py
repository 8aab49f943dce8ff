"""Configuration of the prompt machinery and of the head (dataclasses with documented fields)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from .errors import ConfigError
from .generator import ACTIVATIONS
from .typed import Section


@dataclass
class PromptConfig(Section):
    """How prompts are generated and inserted.

    Attributes:
        length: ``l``, number of prompt slots (positions prepended to the sequence).
        bottleneck: ``m``, width of the generator's PHM bottleneck.
        phm_n: ``n`` of the PHM layers; must divide the hidden size and ``bottleneck``.
        activation: generator activation: relu, gelu, tanh, silu or identity.
        dropout: dropout on the generated prompt.
        discard: ``lambda``: 1 - a new prompt replaces the propagated one in proportion to
            its gate; 0 - it is added to it.
        reparam_gates: use the re-parameterized gate ``alpha * sg(S) / S`` (False: plain
            DARTS gate, for ablations).
        gate_init: initial gate logit ``a_i`` (0 gives ``alpha = 0.5``).
        candidate_layers: layers that may receive a prompt (``None``: every layer
            ``0 .. L-1``). Layer 0 is the embedding output.
        gate_budget: supernet only: the expected number of open gates, held during the search
            by one global shift of the gate logits, solved each pass (S3Delta's shifted
            sigmoid); set from ``search.budget_params`` (null: no budget).
        normalize: supernet only: scale each generated prompt vector to the root mean square
            of the layer's token states, so that a generator cannot grow or shrink its output
            to say what its gate should say; the sparse model never rescales.
    """

    length: int = 10
    bottleneck: int = 64
    phm_n: int = 4
    activation: str = "relu"
    dropout: float = 0.1
    discard: float = 1.0
    reparam_gates: bool = True
    gate_init: float = 0.0
    candidate_layers: list[int] | None = None
    gate_budget: float | None = None
    normalize: bool = False

    SECTION: ClassVar[str] = "prompt"

    def check(self) -> None:
        self.positive("length", "bottleneck", "phm_n")
        self.one_of("activation", tuple(sorted(ACTIVATIONS)))
        self.require("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")
        self.require("discard", self.discard in (0, 1), "0 (add) or 1 (replace)")
        self.positive("gate_budget")
        if self.candidate_layers is not None:
            if not self.candidate_layers:
                raise ConfigError("prompt.candidate_layers", "is empty; give at least one layer or null for all")
            if len(set(self.candidate_layers)) != len(self.candidate_layers):
                raise ConfigError("prompt.candidate_layers", f"has duplicates: {self.candidate_layers}")

    def validate(self, num_layers: int | None = None, hidden_size: int | None = None) -> None:
        """Check the fields against a backbone with ``num_layers`` layers of width ``hidden_size``."""
        self.check()
        if self.gate_budget is not None and num_layers is not None and self.gate_budget >= len(self.candidates(num_layers)):
            raise ConfigError("prompt.gate_budget", f"must be below the {len(self.candidates(num_layers))} candidate layers, "
                              f"got {self.gate_budget}")
        if self.candidate_layers is not None:
            if num_layers is not None:
                bad = [i for i in self.candidate_layers if not 0 <= i < num_layers]
                if bad:
                    raise ConfigError(
                        "prompt.candidate_layers",
                        f"layers {bad} do not exist; the backbone has layers 0..{num_layers - 1}",
                    )
        if hidden_size is not None:
            from .phm import check_phm_divides

            check_phm_divides(self.phm_n, hidden_size=hidden_size, bottleneck=self.bottleneck)

    def candidates(self, num_layers: int) -> list[int]:
        """The candidate layers, sorted."""
        return sorted(self.candidate_layers) if self.candidate_layers is not None else list(range(num_layers))


@dataclass
class HeadConfig(Section):
    """The trainable (classifier) or frozen (MLM verbalizer) head.

    Attributes:
        type: ``classifier`` - a linear layer on the pooled representation, works with any
            encoder; ``mlm`` - the backbone's frozen MLM head scored on label words at the
            mask token of ``template`` (needs a backbone with a trained MLM head).
        pooling: classifier input: ``cls`` (first real token) or ``mean`` (mean of real tokens).
        dropout: dropout before the classifier.
        template: ``mlm`` only: text with ``{text_a}``, optional ``{text_b}`` and ``{mask}``,
            e.g. ``"{text_a} It was {mask}."``.
        label_words: ``mlm`` only: one word per label (each must be a single token).
    """

    type: str = "classifier"
    pooling: str = "mean"
    dropout: float = 0.1
    template: str | None = None
    label_words: dict[str, str] | None = None

    SECTION: ClassVar[str] = "head"

    def check(self) -> None:
        self.one_of("type", ("classifier", "mlm"))
        self.one_of("pooling", ("cls", "mean"))
        self.require("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")

    def validate(self, labels: list[str] | None = None) -> None:
        """Check the MLM settings (template, one label word per label)."""
        if self.type == "mlm":
            if not self.template or "{mask}" not in self.template or "{text_a}" not in self.template:
                raise ConfigError("head.template", "an mlm head needs a template with {text_a} and {mask}, e.g. '{text_a} It was {mask}.'")
            if not self.label_words:
                raise ConfigError("head.label_words", "an mlm head needs one word per label, e.g. {'0': 'bad', '1': 'good'}")
            if labels is not None:
                missing = [lab for lab in labels if lab not in self.label_words]
                if missing:
                    raise ConfigError("head.label_words", f"no word for labels {missing}")


def config_from_dict(cls: type, data: dict[str, Any] | None, section: str) -> Any:
    """Build dataclass ``cls`` from a mapping, naming unknown keys as errors."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(section, f"must be a mapping of fields, got {type(data).__name__}")
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}", f"unknown field; known fields: {sorted(known)}")
    return cls(**data)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready copy of a config dataclass."""
    return asdict(config)

