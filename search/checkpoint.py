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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spt.errors import UserError
from spt.files import save_tensors_atomic
from spt.schema import validate
from spt.serialization import load_trainable_state, read_tensor_file

from .schema import CHECKPOINT

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


def checkpoint_fix(path: Path) -> str:
    """How to get past a checkpoint that cannot be resumed (ends a refusal)."""
    what = "retraining" if path.name == RETRAIN_CHECKPOINT_FILE else "search"
    return f"; delete {path.name} to restart this {what} from its beginning, or start over with --force"


def check_checkpoint(path: Path, identity: dict[str, Any] | None = None) -> TrainState | None:
    """Refuse a damaged checkpoint (a tensor that does not match its checksum, a training
    state, optimizer or callback record of the wrong structure), or one written for another
    ``identity``, before a resumed job writes anything; returns its training state (no file:
    None, nothing to check)."""
    if not path.is_file():
        return None
    _, state, meta = _read(path)
    _check_identity(path, meta.get("identity"), identity)
    return state


def _read(path: Path) -> tuple[dict[str, torch.Tensor], TrainState, dict[str, Any]]:
    """The tensors, training state and JSON metadata (optimizers, scalers, callbacks,
    identity) of a checkpoint, each checked against its schema (:data:`search.schema.CHECKPOINT`)."""
    from .trainer import TrainState

    fix, where = checkpoint_fix(path), f"checkpoint: {path}"
    tensors, metadata = read_tensor_file(path, "checkpoint", fix)
    decoded: dict[str, Any] = {}
    for key in CHECKPOINT:
        if key in metadata:
            try:
                decoded[key] = json.loads(metadata[key])
            except json.JSONDecodeError as exc:
                raise UserError(where, f"{key}: not valid JSON ({exc.msg}){fix}") from None
    meta = validate(decoded, CHECKPOINT, where, fix)
    _check_tensor_names(tensors, meta, where, fix)
    return tensors, TrainState.from_dict(meta.pop("state")), meta


def _check_tensor_names(tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str, fix: str) -> None:
    """Every tensor is the model's, a callback's, or the state of a parameter an optimizer's groups hold."""
    for name in tensors:
        part, _, rest = name.partition(".")
        if part in ("model", "callback") and rest:
            continue
        optimizer, _, rest = rest.partition(".")
        index, _, field = rest.partition(".")
        groups = meta["optimizers"].get(optimizer, {}).get("param_groups", [])
        if not (part == "optim" and index.isdigit() and field and any(int(index) in g["params"] for g in groups)):
            raise UserError(where, f"tensor {name}: not a model, callback or optimizer tensor of this checkpoint{fix}")


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
            raise UserError("checkpoint", f"{path} has no state for optimizer {name!r}{checkpoint_fix(path)}")
        with _restoring(path, f"optimizers.{name}"):
            optimizer.load_state_dict(_unflatten_optimizer(name, tensors, meta["optimizers"][name]))
    # (a checkpoint of another precision has no scaler state: a scaler then starts afresh)
    for name, scaler in trainer.scalers.items():
        if name in meta.get("scalers", {}):
            with _restoring(path, f"scalers.{name}"):
                scaler.load_state_dict(meta["scalers"][name])
    for name, callback in (callbacks or {}).items():
        if name in meta.get("callbacks", {}):
            callback.restore(_prefixed(tensors, f"callback.{name}."), meta["callbacks"][name])
    return state


@contextmanager
def _restoring(path: Path, what: str) -> Iterator[None]:
    """torch's refusal of a state that does not fit (other parameter groups, sizes) as a :class:`UserError`."""
    try:
        yield
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise UserError(f"checkpoint: {path}", f"{what}: does not fit this training ({exc}){checkpoint_fix(path)}") from None


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_identity(path: Path, saved: dict[str, Any] | None, expected: dict[str, Any] | None) -> None:
    """Refuse a checkpoint written for another training (a retraining of other layers)."""
    for key, value in (expected or {}).items():
        if saved is not None and key in saved and saved[key] != value:
            raise UserError("checkpoint", f"{path} was written for {key} {saved[key]}, but this job trains {key} {value}"
                            f"{checkpoint_fix(path)}")
