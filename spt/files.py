"""Files: the one home of atomic writes, of text reads with clear errors, and of the
check that a destination can be written at all.

Each writer goes through a temporary file in the same folder and renames it into place,
and gives the file the permissions the user's umask asks for (safetensors writes 0600).
JSON is written strictly: NaN or infinity is refused, never written as invalid JSON.
Tensor files carry a SHA-256 checksum of every tensor in their metadata
(:data:`CHECKSUM_KEY`), checked when they are read (:mod:`spt.serialization`).
A text file that is not UTF-8 is a :class:`~spt.errors.UserError` naming the file and the
line, never a ``UnicodeDecodeError``.

A write that fails (a full disk, an I/O error, an interrupt) leaves the file as it was and
no temporary file: the failure is an ``OSError`` naming the file (safetensors' own error
for a failed write included), which the CLI prints as one line. :func:`append_text` adds
lines all or nothing, so a full disk never leaves half a row in a CSV history.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are written: text writers stay light (plots, the CLI)
    import torch

CHECKSUM_KEY = "spt_sha256"  # safetensors metadata: JSON {tensor name: sha256 of its bytes}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, path: Path) -> None:
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def write_error(exc: BaseException, path: str | os.PathLike, tmp: Path | None = None) -> OSError | None:
    """``exc``, a failed write of ``path`` (through ``tmp``), as an ``OSError`` naming ``path``
    (``None``: not an I/O failure). A write's ``OSError`` often names no file, or the
    temporary one; safetensors raises its own ``SafetensorError`` holding ``(os error N)``."""
    if isinstance(exc, OSError):
        if exc.filename is not None and exc.filename != str(tmp):
            return exc
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    found = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def raise_write_error(exc: BaseException, path: str | os.PathLike, tmp: Path | None = None) -> NoReturn:
    """Raise ``exc`` (being handled), as an ``OSError`` naming ``path`` where it is an I/O failure."""
    error = write_error(exc, path, tmp)
    if error is None or error is exc:
        raise exc
    raise error from exc


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """The temporary file to write for ``path``, moved into place when the block ends; on
    any failure it is removed (``path`` stays as it was) and an I/O error names ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        _publish(tmp, path)
    except BaseException as exc:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise_write_error(exc, path, tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file."""
    path = Path(path)
    with _atomic(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str, create: bool = True) -> None:
    """Append ``text`` (UTF-8) to ``path``, all or nothing: a failed write (a full disk) cuts
    the file back to its old length and raises an ``OSError`` naming ``path``. Without
    ``create`` a missing file is a ``FileNotFoundError`` (it is not made anew)."""
    flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0)
    data = memoryview(text.encode("utf-8"))
    fd = os.open(path, flags, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as exc:
            with suppress(OSError):
                os.ftruncate(fd, size)
            raise write_error(exc, path) from exc
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON; a NaN or infinite number raises ``ValueError``."""
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as stored (any dtype, bf16 included)."""
    import torch

    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as one safetensors file through a temporary file, with a checksum per tensor."""
    from safetensors.torch import save_file

    path = Path(path)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    checksums = json.dumps({k: tensor_sha256(v) for k, v in cpu.items()}, sort_keys=True)
    with _atomic(path) as tmp:
        save_file(cpu, str(tmp), metadata={**(metadata or {}), CHECKSUM_KEY: checksums})
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
