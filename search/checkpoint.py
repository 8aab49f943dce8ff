"""Resumable training checkpoints in one safetensors file (tensors + JSON metadata).

One file replaced atomically: a run killed at any moment leaves either the previous
checkpoint or the new one, never a mix. It holds the trained tensors, the optimizers'
state, the fp16 loss scalers' state, the position in the schedule, and what callbacks
need to go on as if never stopped (:meth:`~search.trainer.Callback.checkpoint_state`:
the dev-best weights and score, early-stopping patience, the epoch's loss sums).
The search writes ``checkpoint.safetensors``, the retraining ``retrain_checkpoint.safetensors``.
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
    from .trainer import Callback, Trainer, TrainState

CHECKPOINT_FILE = "checkpoint.safetensors"
RETRAIN_CHECKPOINT_FILE = "retrain_checkpoint.safetensors"


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


def save_checkpoint(path: Path, trainer: Trainer, state: TrainState, callbacks: dict[str, Callback] | None = None,
                    identity: dict[str, Any] | None = None) -> None:
    """Write ``trainer``'s state at ``state``, the state of the named ``callbacks``, and
    ``identity`` (what the training is of: a resumed one must be of the same)."""
    tensors = {f"model.{k}": v for k, v in trainer.model.trainable_state_dict().items()}
    optim_meta = {}
    for name, optimizer in trainer.optimizers().items():
        flat, meta = _flatten_optimizer(name, optimizer)
        tensors.update(flat)
        optim_meta[name] = meta
    metadata = {"state": json.dumps(asdict(state)), "optimizers": json.dumps(optim_meta)}
    if trainer.scalers:
        metadata["scalers"] = json.dumps({name: scaler.state_dict() for name, scaler in trainer.scalers.items()})
    values = {}
    for name, callback in (callbacks or {}).items():
        kept, values[name] = callback.checkpoint_state()
        tensors.update({f"callback.{name}.{k}": v for k, v in kept.items()})
    if values:
        metadata["callbacks"] = json.dumps(values)
    if identity is not None:
        metadata["identity"] = json.dumps(identity)
    save_tensors_atomic(tensors, path, metadata)


def _fix(path: Path) -> str:
    what = "retraining" if path.name == RETRAIN_CHECKPOINT_FILE else "search"
    return f"; delete {path.name} to restart this {what} from its beginning, or start over with --force"


def check_checkpoint(path: Path, identity: dict[str, Any] | None = None) -> None:
    """Refuse a damaged checkpoint, or one written for another ``identity``, before a resumed
    job writes anything (no file: nothing to check)."""
    if path.is_file():
        _check_identity(path, _read(path)[2].get("identity"), identity)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], TrainState, dict[str, Any]]:
    """The tensors, training state and JSON metadata (optimizers, scalers, callbacks,
    identity; the last three absent from older checkpoints) of a checkpoint, checked."""
    from .trainer import TrainState

    tensors, metadata = read_tensor_file(path, "checkpoint", _fix(path))
    try:
        state = TrainState.from_dict(json.loads(metadata["state"]))
        meta = {"optimizers": json.loads(metadata["optimizers"])}
        meta.update({key: json.loads(metadata[key]) for key in ("scalers", "callbacks", "identity") if key in metadata})
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise UserError("checkpoint", f"{path} has no valid training state ({exc}){_fix(path)}") from None
    return tensors, state, meta


def load_checkpoint(path: Path, trainer: Trainer, callbacks: dict[str, Callback] | None = None,
                    identity: dict[str, Any] | None = None) -> TrainState:
    """Restore model, optimizers, loss scalers and the named ``callbacks`` from ``path``;
    returns the training state.

    A damaged file (a tensor that does not match its checksum, a broken header or state)
    or one written for another ``identity`` is a :class:`UserError`: nothing is loaded from it.
    """
    tensors, state, meta = _read(path)
    _check_identity(path, meta.get("identity"), identity)
    load_trainable_state(trainer.model, _prefixed(tensors, "model."), str(path))
    for name, optimizer in trainer.optimizers().items():
        if name not in meta["optimizers"]:
            raise UserError("checkpoint", f"{path} has no state for optimizer {name!r}{_fix(path)}")
        optimizer.load_state_dict(_unflatten_optimizer(name, tensors, meta["optimizers"][name]))
    # (a checkpoint of another precision has no scaler state: a scaler then starts afresh)
    for name, scaler in trainer.scalers.items():
        if name in meta.get("scalers", {}):
            scaler.load_state_dict(meta["scalers"][name])
    for name, callback in (callbacks or {}).items():
        if name in meta.get("callbacks", {}):
            callback.restore(_prefixed(tensors, f"callback.{name}."), meta["callbacks"][name])
    return state


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_identity(path: Path, saved: dict[str, Any] | None, expected: dict[str, Any] | None) -> None:
    """Refuse a checkpoint written for another training (a retraining of other layers)."""
    for key, value in (expected or {}).items():
        if saved is not None and key in saved and saved[key] != value:
            raise UserError("checkpoint", f"{path} was written for {key} {saved[key]}, but this job trains {key} {value}"
                            f"{_fix(path)}")
