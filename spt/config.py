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
        discard: the paper's ``lambda`` in ``P_i = (1 - lambda g_i) P^_i + g_i G_i(H_i)``: how
            much of the propagated prompt ``P^_i`` a new prompt discards. 1 - it replaces the
            propagated one in proportion to its gate; 0 - it is added to it.
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
        presence_bias: supernet only: make a closed gate's slots absent, not merely zero. The
            slots entering layer ``i+1`` are attended with ``log(pi_i)`` added to their
            attention scores, ``pi_i = 1 - prod_{j<=i} (1 - g_j)`` the chance that some gate
            up to layer ``i`` inserted a prompt: with every gate so far at 0 the slots get no
            attention (as in the frozen model), with one at 1 full attention. Opening a gate
            then also lets the later layers attend to the prompt, which its gradient sees.
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
    normalize: bool = True
    presence_bias: bool = False

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
    """The trainable (classifier) or frozen (verbalizer) head.

    Attributes:
        type: ``classifier`` - a linear layer on the pooled representation, works with any
            backbone; ``mlm`` - an encoder's frozen masked-LM head scored on label words at
            the mask token of ``template``; ``clm`` - a decoder's frozen causal-LM head scored
            on label words as the next token after the template (read up to ``{mask}``).
            Verbalizer heads need a backbone whose LM head is trained.
        pooling: classifier input: ``cls`` (first real token; encoders), ``mean`` (mean of
            real tokens), ``last`` (last real token; what a decoder's last position sums up)
            or ``auto`` (``last`` for decoders, ``mean`` for encoders).
        dropout: dropout before the classifier.
        template: verbalizer heads (and the ``zero-shot`` / ``in-context`` strategies):
            text with ``{text_a}``, optional ``{text_b}`` and ``{mask}``, e.g.
            ``"{text_a} It was {mask}."``. A ``clm`` head reads it up to ``{mask}`` and scores
            the label word as the next token there (``"{text_a} It was"``).
        label_words: verbalizer heads: one word per label (each must be a single token).
    """

    type: str = "classifier"
    pooling: str = "auto"
    dropout: float = 0.1
    template: str | None = None
    label_words: dict[str, str] | None = None

    SECTION: ClassVar[str] = "head"

    def check(self) -> None:
        self.one_of("type", ("classifier", "mlm", "clm"))
        self.one_of("pooling", ("auto", "cls", "mean", "last"))
        self.require("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")

    @property
    def verbalizer(self) -> bool:
        """Scored by a frozen LM head on label words (``mlm`` or ``clm``)."""
        return self.type in ("mlm", "clm")

    def pooling_for(self, decoder: bool) -> str:
        """The classifier's pooling on an encoder or a decoder (``auto`` resolved; ``cls`` refused on a decoder)."""
        if self.pooling == "auto":
            return "last" if decoder else "mean"
        if self.pooling == "cls" and decoder:
            raise ConfigError("head.pooling", "'cls' pools the first token, which in a decoder sees only itself; "
                              "use last (the default for decoders) or mean")
        return self.pooling

    def validate(self, labels: list[str] | None = None, kind: str | None = None) -> None:
        """Check the verbalizer settings (template, one label word per label) of this head, or of a
        verbalizer of ``kind`` (``mlm``/``clm``) that a zero-shot strategy builds from them."""
        kind = kind or self.type
        if kind not in ("mlm", "clm"):
            return
        needs = "{text_a} and {mask}" if kind == "mlm" else "{text_a} before any {mask}"
        reads = self.template.split("{mask}")[0] if kind == "clm" and self.template else self.template
        if not reads or "{text_a}" not in reads or (kind == "mlm" and "{mask}" not in reads):
            raise ConfigError("head.template", f"a {kind} verbalizer needs a template with {needs}, e.g. '{{text_a}} It was {{mask}}.'")
        if not self.label_words:
            raise ConfigError("head.label_words", f"a {kind} verbalizer needs one word per label, e.g. {{'0': 'bad', '1': 'good'}}")
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

