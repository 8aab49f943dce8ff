"""``--force``: delete what spt wrote in a run directory, all or nothing.

The manifest lists the top-level files and folders spt wrote. A listed folder is deleted
only if everything in it is a file spt writes there (:data:`layouts <_layouts>` below):
a user's file inside ``sparse/``, ``supernet/``, ``tensorboard/`` (or any folder spt
wrote) makes ``--force`` refuse, naming that file, and nothing is deleted. Refusing is
safer than deleting around the file: the user's file is neither lost nor left mixed into
a model folder spt then rewrites (and may upload with ``push_to_hub``).

Clearing is all or nothing: every folder to delete is first checked to be removable
(permissions, not a mount point), then every listed entry is moved (a rename, on the same
disk) into ``.spt-trash`` inside the run, and only then is that folder deleted. A rename
that fails puts back what was moved: the run is as it was, and one error names the path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Union

from spt.errors import UserError

from .manifest import STATUS_FILE, Manifest

TRASH = ".spt-trash"  # where a clearing moves the entries it deletes (gone when it ends)

# The layout of a folder spt writes: name pattern -> None (a file) or the layout of a sub-folder.
Layout = dict[str, Union["Layout", None]]


def _layouts() -> Layout:
    """What spt writes inside the top-level folders it lists in a manifest (names read from
    the modules that write them, so a new file name is one edit)."""
    from spt.serialization import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE

    from .checkpoint import CHECKPOINT_FILE, RETRAIN_CHECKPOINT_FILE

    model: Layout = dict.fromkeys((CONFIG_FILE, WEIGHTS_FILE, CARD_FILE))
    events: Layout = {"events.out.tfevents.*": None}
    tensorboard: Layout = {**events, "steps-*": events}
    # compare's spt strategy: a search run folder per seed (without a manifest of its own)
    search_run: Layout = {**dict.fromkeys(("gates.csv", "metrics.csv", "steps.csv", STATUS_FILE, CHECKPOINT_FILE,
                                           RETRAIN_CHECKPOINT_FILE, "layer_mask.json", "log.txt")),
                          "supernet": model, "sparse": model, "tensorboard": tensorboard}
    return {"sparse": model, "supernet": model, "tensorboard": tensorboard, "masks": {"*-seed*.json": None},
            "spt-seed*": search_run}


def written_files() -> list[str]:
    """The names of the files (not folders) spt writes at the top of a search or run directory."""
    return sorted(name for name, inner in _layouts()["spt-seed*"].items() if inner is None)


def _match(name: str, layout: Layout, folder: bool) -> tuple[bool, Layout | None]:
    """Whether ``name`` (a folder or not) is one ``layout`` allows, and its own layout."""
    for pattern, inner in layout.items():
        if folder and inner is not None and fnmatch(name, pattern):
            return True, inner
        # a file: as written, or the temporary file of an interrupted atomic write
        if not folder and inner is None and (fnmatch(name, pattern) or fnmatch(name.removesuffix(".tmp"), pattern)):
            return True, None
    return False, None


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()  # a link is deleted, never followed


def _foreign(folder: Path, layout: Layout | None) -> Iterator[Path]:
    """Paths under ``folder`` that spt does not write there (a folder without a layout: all)."""
    for path in sorted(folder.iterdir()):
        is_folder = _is_folder(path)
        allowed, inner = _match(path.name, layout or {}, is_folder)
        if not allowed:
            yield path
        elif is_folder:
            yield from _foreign(path, inner)


def _folders(path: Path) -> Iterator[Path]:
    """``path`` and every folder under it (links not followed)."""
    if _is_folder(path):
        yield path
        for child in sorted(path.iterdir()):
            yield from _folders(child)


def _removal_problem(folder: Path) -> str | None:
    """Why ``folder`` (or what it holds) cannot be deleted, or ``None``."""
    if os.path.ismount(folder):
        return "it is a mount point"
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        return "no permission to delete what it holds (read-only)"
    return None


def cleared_names(manifest: Manifest) -> list[str]:
    """The listed entries that exist, and the ``.tmp`` of an interrupted write of one."""
    names = [n for entry in sorted(manifest.entries) for n in (entry, entry + ".tmp")]
    return [n for n in names if (manifest.directory / n).exists() or (manifest.directory / n).is_symlink()]


def check_clearable(manifest: Manifest) -> list[str]:
    """Refuse (a :class:`UserError`, nothing deleted) a clearing that would delete a user's
    file or fail half-way; returns the names to delete."""
    run, names = manifest.directory, cleared_names(manifest)
    layouts = _layouts()
    for name in names:
        if _is_folder(run / name):
            layout = next((inner for pattern, inner in layouts.items() if fnmatch(name.removesuffix(".tmp"), pattern)), None)
            for path in _foreign(run / name, layout):
                raise UserError("--out", f"{path} was not written by spt, and --force deletes only what spt wrote "
                                f"(here the folder {run / name}); move it out of {path.parent}, or choose another --out")
    if not os.access(run, os.W_OK | os.X_OK):
        raise UserError("--out", f"--force cannot delete what {run} holds: no permission (read-only); nothing was deleted")
    for folder in (f for name in names for f in _folders(run / name)):
        problem = _removal_problem(folder)
        if problem:
            raise UserError("--out", f"--force cannot delete {folder}: {problem}; nothing was deleted")
    return names


def clear(manifest: Manifest) -> None:
    """Delete what ``manifest`` lists, all or nothing; the manifest then lists nothing, no stage either."""
    run = manifest.directory
    names = check_clearable(manifest)
    trash = run / TRASH
    if trash.exists():  # left by a clearing that was killed before it ended
        _delete(trash)
    trash.mkdir()
    moved: list[str] = []
    entries, stages = set(manifest.entries), list(manifest.stages)
    try:
        for name in names:
            os.rename(run / name, trash / name)
            moved.append(name)
        manifest.entries, manifest.stages = set(), []
        manifest.save()  # before deleting: a clearing killed now leaves only the trash, which the next one empties
    except OSError as exc:
        for name in reversed(moved):  # put back what was moved: the run is as it was
            os.rename(trash / name, run / name)
        trash.rmdir()
        manifest.entries, manifest.stages = entries, stages
        failed = exc.filename or run
        raise UserError("--out", f"--force cannot delete {failed}: {exc.strerror or exc}; nothing was deleted") from None
    _delete(trash)


def _delete(trash: Path) -> None:
    """Delete the folder ``trash``; a failure names what could not be deleted."""
    try:
        shutil.rmtree(trash)
    except OSError as exc:
        raise UserError("--out", f"--force could not delete {exc.filename or trash} ({exc.strerror or exc}); the old "
                        f"run's remaining files are in {trash}: delete that folder yourself") from None
