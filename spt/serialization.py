"""Save and load prompt models: a JSON config plus safetensors weights, no pickle.

A saved model directory holds ``prompt_config.json`` (what to rebuild) and
``prompt_weights.safetensors`` (only the trainable tensors: generators, gates, head).
The frozen backbone is referenced by name and loaded from its own files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .backbone import Backbone, load_backbone
from .config import HeadConfig, PromptConfig, config_from_dict, to_dict
from .errors import UserError
from .files import CHECKSUM_KEY, read_text, save_tensors_atomic, tensor_sha256, write_json_atomic, write_text_atomic
from .heads import build_head
from .model import PromptModel, PromptSupernet, SparsePromptModel

FORMAT = "spt-prompt-model"
VERSION = 2  # 2: the generators of a model are one stack (generators.down.A holds every layer's A)
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "prompt_config.json"
WEIGHTS_FILE = "prompt_weights.safetensors"


def read_tensor_file(path: Path, what: str = "checkpoint", fix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, every tensor checked against its
    checksum; a missing, corrupt or damaged file is a :class:`UserError` for ``what``
    ending in ``fix`` (what to do about it)."""
    if not path.is_file():
        raise UserError(what, f"{path} does not exist")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(what, f"{path} is corrupt or not a safetensors file ({exc}){fix}") from None
    verify_checksums(tensors, metadata, path, what, fix)
    return tensors, metadata


def verify_checksums(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, what: str, fix: str = "") -> None:
    """Compare every tensor with the checksum written beside it (files written before
    checksums existed carry none and are taken as they are)."""
    if CHECKSUM_KEY not in metadata:
        return
    try:
        expected = json.loads(metadata[CHECKSUM_KEY])
    except json.JSONDecodeError:
        raise UserError(what, f"{path} is damaged (its checksums are unreadable){fix}") from None
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        raise UserError(what, f"{path} is damaged (its tensors do not match its checksum list){fix}")
    for name, tensor in tensors.items():
        if tensor_sha256(tensor) != expected[name]:
            raise UserError(what, f"{path} is damaged: tensor {name} does not match its checksum{fix}")


def load_tensors(path: Path, what: str = "checkpoint", fix: str = "") -> dict[str, torch.Tensor]:
    """Read a safetensors file, checked as :func:`read_tensor_file` does."""
    return read_tensor_file(path, what, fix)[0]


def backbone_reference(name: str, directory: Path) -> str:
    """How a saved model names its backbone: an alias or hub id as given; a local model
    directory relative to the saved model's folder (never an absolute path)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return os.path.relpath(path.resolve(), directory.resolve())
    return name


def save_prompt_model(model: PromptModel, directory: str | os.PathLike) -> Path:
    """Write ``model``'s config and trainable weights to ``directory``."""
    from . import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "supernet" if isinstance(model, PromptSupernet) else "sparse",
        "backbone": backbone_reference(model.backbone.name, directory),
        "backbone_fingerprint": model.backbone.fingerprint(),
        "model_type": model.backbone.config.model_type,
        "num_layers": model.backbone.num_layers,
        "hidden_size": model.backbone.hidden_size,
        "layers": model.layers,
        "labels": model.labels,
        "max_length": model.max_length,
        "instruction": model.instruction,
        "prompt": to_dict(model.prompt_config),
        "head": to_dict(model.head_config),
        "trainable_params": model.num_trainable_parameters(),
        "spt_search_version": __version__,
    }
    save_tensors_atomic(model.trainable_state_dict(), directory / WEIGHTS_FILE, {"format": FORMAT})
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


def write_model_card(directory: Path, metrics: dict[str, Any] | None = None) -> Path:
    """``README.md`` beside a saved model: what it is, how it scores, how to load it."""
    config = read_model_config(directory)
    rows = [("kind", config["kind"]), ("backbone", f"`{config['backbone']}` (fingerprint {config.get('backbone_fingerprint')})"),
            ("prompt layers", ", ".join(map(str, config["layers"]))), ("labels", ", ".join(config["labels"])),
            ("prompt length", config["prompt"]["length"]), ("max length", config.get("max_length")),
            ("trainable parameters", f"{config['trainable_params']:,}"), ("spt-search", config.get("spt_search_version"))]
    if metrics:
        m = metrics.get("metric", "accuracy")
        rows = [("task", metrics.get("task"))] + rows
        rows += [(f"dev {m}", f"{metrics['dev'][m]:.4f}"), (f"test {m}", f"{metrics['test'][m]:.4f}")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    card = (f"# Selective prompt tuning model\n\nPrompts generated at layers {config['layers']} of a frozen "
            f"`{config['model_type']}` backbone (spt-search).\n\n| | |\n|---|---|\n{table}\n\n## Use\n\n"
            "```python\nfrom spt import SparsePromptModel\n\nmodel = SparsePromptModel.from_pretrained(\"path/to/this/folder\")\n"
            "print(model.predict([\"a text to classify\"]))\n```\n\nor `spt predict RUN_DIR --input texts.txt`.\n")
    return write_text_atomic(directory / "README.md", card)


def read_model_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UserError("model", f"{path} does not exist; is {directory} a saved prompt model?")
    try:
        config = json.loads(read_text(path, "model"))
    except json.JSONDecodeError as exc:
        raise UserError("model", f"{path} is not valid JSON ({exc})") from None
    found = config.get("format") if isinstance(config, dict) else type(config).__name__
    if found != FORMAT:
        raise UserError("model", f"{path} has format {found!r}, expected {FORMAT!r}")
    if config.get("version") not in READABLE_VERSIONS:
        raise UserError("model", f"{path} has version {config.get('version')!r}; this spt-search reads versions {READABLE_VERSIONS}")
    return config


def upgrade_generator_names(tensors: dict[str, torch.Tensor], layers: list[int]) -> dict[str, torch.Tensor]:
    """Version 1 kept one generator per layer (``generators.3.down.A``); stack them as version 2 does."""
    if not any(k.startswith("generators.") and k.split(".")[1].isdigit() for k in tensors):
        return tensors
    out = {k: v for k, v in tensors.items() if not k.startswith("generators.")}
    for part in ("down", "up"):
        for name in ("A", "S", "bias"):
            keys = [f"generators.{layer}.{part}.{name}" for layer in layers]
            if all(k in tensors for k in keys):
                out[f"generators.{part}.{name}"] = torch.stack([tensors[k] for k in keys])
    return out


def resolve_backbone(config: dict[str, Any], directory: Path, with_lm_head: bool, backbone: Backbone | str | None = None) -> Backbone:
    """The saved model's backbone: ``backbone`` when given (a loaded one, or a name/folder), else
    the recorded reference (relative folders from the model's folder); the fingerprint must match."""
    if isinstance(backbone, Backbone):
        resolved = backbone
    else:
        name = backbone or config["backbone"]
        if backbone is None and not Path(name).expanduser().is_absolute() and (directory / name).is_dir():
            name = str((directory / name).resolve())
        try:
            resolved = load_backbone(name, with_lm_head=with_lm_head)
        except UserError as exc:
            raise UserError("model.backbone", f"cannot load the backbone {config['backbone']!r} that {directory} was trained on "
                            f"({exc.problem}); pass the backbone (--backbone NAME_OR_FOLDER)") from None
    if resolved.num_layers != config["num_layers"] or resolved.config.model_type != config["model_type"]:
        raise UserError(
            f"model: {directory} was saved for a {config['num_layers']}-layer {config['model_type']} backbone "
            f"({config['backbone']!r}), not this {resolved.num_layers}-layer {resolved.config.model_type}"
        )
    expected = config.get("backbone_fingerprint")
    if expected is not None and expected != resolved.fingerprint():
        raise UserError("model.backbone", f"{directory} was trained on another backbone than {resolved.name!r} "
                        f"(fingerprint {expected}, this one {resolved.fingerprint()}); pass the one it was trained on")
    return resolved


def load_prompt_model(directory: str | os.PathLike, backbone: Backbone | str | None = None) -> PromptModel:
    """Rebuild a saved supernet or sparse model, in eval mode (loading its backbone unless given)."""
    directory = Path(directory)
    config = read_model_config(directory)
    prompt = config_from_dict(PromptConfig, config["prompt"], "prompt")
    head_config = config_from_dict(HeadConfig, config["head"], "head")
    backbone = resolve_backbone(config, directory, head_config.verbalizer, backbone)
    head = build_head(backbone, head_config, config["labels"])
    inputs = {"max_length": config.get("max_length"), "instruction": config.get("instruction")}
    if config["kind"] == "supernet":
        model: PromptModel = PromptSupernet(backbone, prompt, head, head_config, config["labels"], **inputs)
    else:
        model = SparsePromptModel(backbone, prompt, head, head_config, config["labels"], config["layers"], **inputs)
    fix = f"; save the model again (rerun the spt command that wrote {directory})"
    tensors = upgrade_generator_names(load_tensors(directory / WEIGHTS_FILE, "model weights", fix), config["layers"])
    load_trainable_state(model, tensors, str(directory / WEIGHTS_FILE))
    return model.eval()


def load_trainable_state(model: PromptModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load trainable tensors, refusing missing, unexpected or misshapen ones."""
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"checkpoint: {source} does not match the model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UserError("checkpoint", f"{source}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False)
