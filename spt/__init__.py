"""spt: the model side of Selective Prompt Tuning.

PHM prompt generators with probability gates on every layer of a frozen encoder or decoder
(:class:`PromptSupernet`), and the sparse model built from a layer mask
(:class:`SparsePromptModel`).

The public names are imported on first use (PEP 562), so that ``import spt.errors`` or
``spt --version`` does not load torch.
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.2.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "Backbone": "backbone",
    "load_backbone": "backbone",
    "HeadConfig": "config",
    "PromptConfig": "config",
    "ConfigError": "errors",
    "UnsupportedBackboneError": "errors",
    "UserError": "errors",
    "LayerGates": "gates",
    "reparameterize": "gates",
    "sample_architecture_mask": "gates",
    "PromptGenerator": "generator",
    "adaptive_pool_weights": "generator",
    "build_head": "heads",
    "PromptOutput": "model",
    "PromptSupernet": "model",
    "SparsePromptModel": "model",
    "PHMLinear": "phm",
    "phm_parameter_count": "phm",
    "load_prompt_model": "model",
    "save_prompt_model": "serialization",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
