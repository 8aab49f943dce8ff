"""spt: the model side of Selective Prompt Tuning.

PHM prompt generators with probability gates on every layer of a frozen encoder or decoder
(:class:`PromptSupernet`), and the sparse model built from a layer mask
(:class:`SparsePromptModel`).
"""

from .backbone import Backbone, load_backbone
from .config import HeadConfig, PromptConfig
from .errors import ConfigError, UnsupportedBackboneError, UserError
from .gates import LayerGates, reparameterize, sample_architecture_mask
from .generator import PromptGenerator, adaptive_pool_weights
from .heads import build_head
from .model import PromptOutput, PromptSupernet, SparsePromptModel
from .phm import PHMLinear, phm_parameter_count
from .serialization import load_prompt_model, save_prompt_model

__version__ = "0.2.0"

__all__ = [
    "Backbone",
    "ConfigError",
    "HeadConfig",
    "LayerGates",
    "PHMLinear",
    "PromptConfig",
    "PromptGenerator",
    "PromptOutput",
    "PromptSupernet",
    "SparsePromptModel",
    "UnsupportedBackboneError",
    "UserError",
    "adaptive_pool_weights",
    "build_head",
    "load_backbone",
    "load_prompt_model",
    "phm_parameter_count",
    "reparameterize",
    "sample_architecture_mask",
    "save_prompt_model",
]
