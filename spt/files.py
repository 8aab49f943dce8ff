"""Files: the one home of atomic writes, of text reads with clear errors, and of the
check that a destination can be written at all.

Each writer goes through a temporary file in the same folder and renames it into place,
and gives the file the permissions the user's umask asks for (safetensors writes 0600).
JSON is written strictly: NaN or infinity is refused, never written as invalid JSON.
Tensor files carry a SHA-256 checksum of every tensor in their metadata
(:data:`CHECKSUM_KEY`), checked when they are read (:mod:`spt.serialization`).
A text file that is not UTF-8 is a :class:`~spt.errors.UserError` naming the file and the
line, never a ``UnicodeDecodeError``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

CHECKSUM_KEY = "spt_sha256"  # safetensors metadata: JSON {tensor name: sha256 of its bytes}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, path: Path) -> None:
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _publish(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON; a NaN or infinite number raises ``ValueError``."""
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as stored (any dtype, bf16 included)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as one safetensors file through a temporary file, with a checksum per tensor."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    checksums = json.dumps({k: tensor_sha256(v) for k, v in cpu.items()}, sort_keys=True)
    save_file(cpu, str(tmp), metadata={**(metadata or {}), CHECKSUM_KEY: checksums})
    _publish(tmp, path)
    return path


def read_text(path: str | os.PathLike, field: str) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark is dropped).

    Bytes that are not UTF-8 are a :class:`UserError` for ``field`` naming the file, the
    line and the byte; a file that cannot be opened, one naming the file and the reason.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(field, f"cannot read {path} ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(
            field, f"{path} line {line}: byte 0x{raw[exc.start]:02x} is not UTF-8 text; save the file as UTF-8"
        ) from None


def check_writable(path: str | os.PathLike, field: str) -> None:
    """Refuse now, before anything is created, a ``path`` (a folder or file to create or
    replace) that cannot be written: under a file, or in a read-only or foreign folder."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise UserError(field, f"cannot create {path}: {existing} is a file, not a folder")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(field, f"cannot write in {folder} (read-only or no permission); choose another {field}")
    if existing == path and path.is_file() and not os.access(path, os.W_OK):
        raise UserError(field, f"{path} is read-only; choose another {field}")
