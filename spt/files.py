"""Writing files so that a crash never leaves half a file: the one home of atomic writes.

Each writer goes through a temporary file in the same folder and renames it into place,
and gives the file the permissions the user's umask asks for (safetensors writes 0600).
JSON is written strictly: NaN or infinity is refused, never written as invalid JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


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


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as one safetensors file through a temporary file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _publish(tmp, path)
    return path
