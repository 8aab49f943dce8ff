"""Resumable training checkpoints in one safetensors file (tensors + JSON metadata).

One file replaced atomically: a run killed at any moment leaves either the previous
checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spt.errors import UserError
from spt.files import save_tensors_atomic
from spt.serialization import load_trainable_state, read_tensor_file

if TYPE_CHECKING:
    from .trainer import Trainer, TrainState

CHECKPOINT_FILE = "checkpoint.safetensors"


def _flatten_optimizer(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, trainer: Trainer, state: TrainState) -> None:
    tensors = {f"model.{k}": v for k, v in trainer.model.trainable_state_dict().items()}
    optim_meta = {}
    for name, optimizer in trainer.optimizers().items():
        flat, meta = _flatten_optimizer(name, optimizer)
        tensors.update(flat)
        optim_meta[name] = meta
    metadata = {"state": json.dumps(asdict(state)), "optimizers": json.dumps(optim_meta)}
    save_tensors_atomic(tensors, path, metadata)


def _fix(path: Path) -> str:
    return f"; delete {path.name} to restart this search from its beginning, or start over with --force"


def check_checkpoint(path: Path) -> None:
    """Refuse a damaged checkpoint before a resumed job writes anything (no file: nothing to check)."""
    if path.is_file():
        _read(path)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], TrainState, dict[str, Any]]:
    """The tensors, training state and optimizer metadata of a checkpoint, checked."""
    from .trainer import TrainState

    tensors, metadata = read_tensor_file(path, "checkpoint", _fix(path))
    try:
        state = TrainState.from_dict(json.loads(metadata["state"]))
        optim_meta = json.loads(metadata["optimizers"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise UserError("checkpoint", f"{path} has no valid training state ({exc}){_fix(path)}") from None
    return tensors, state, optim_meta


def load_checkpoint(path: Path, trainer: Trainer) -> TrainState:
    """Restore model and optimizers from ``path``; returns the training state.

    A damaged file (a tensor that does not match its checksum, a broken header or state)
    is a :class:`UserError`: nothing is loaded from it.
    """
    tensors, state, optim_meta = _read(path)
    load_trainable_state(trainer.model, {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}, str(path))
    for name, optimizer in trainer.optimizers().items():
        if name not in optim_meta:
            raise UserError("checkpoint", f"{path} has no state for optimizer {name!r}{_fix(path)}")
        optimizer.load_state_dict(_unflatten_optimizer(name, tensors, optim_meta[name]))
    return state
