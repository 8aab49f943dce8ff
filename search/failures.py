"""What the CLI says when the machine runs out: a full disk, a failed write, out of memory.

Each is one ``error: <field>: <problem>`` line (exit status 2, as for bad input): the path
or the setting, what happened and what to do, never a traceback. Every write of a run goes
through a temporary file or appends all or nothing (:mod:`spt.files`), so after such a
failure the run directory holds its last good checkpoint and the same command resumes.
Stdlib only: the CLI imports it before any command has loaded torch.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from pathlib import Path
from types import TracebackType

from spt.errors import UserError

FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}
MB = 1024 * 1024

# A function of the failing call stack -> what it was doing and the settings bounding its memory.
STAGES = (
    ("train_and_evaluate", "the retraining", ["retrain.batch_size", "search.eval_batch_size"]),
    ("evaluate_model", "the evaluation", ["search.eval_batch_size"]),
    ("rank_candidates", "the layer selection", ["search.eval_batch_size"]),
    ("run_search", "the search", ["search.batch_size", "search.eval_batch_size"]),
)
COMMAND_STAGES = {"search": "run_search", "select": "rank_candidates", "retrain": "train_and_evaluate"}
MODEL_SETTINGS = ["model.max_length", "runtime.frozen_cache_mb"]


def output_of(args: argparse.Namespace) -> str:
    """The path a command writes (for an I/O error that names no file)."""
    for name in ("out", "output", "export_best", "run_dir"):
        value = getattr(args, name, None)
        if value:
            return str(value)
    dirs = getattr(args, "run_dirs", None)
    return str(dirs[0]) if dirs else "disk"


def _run_dir(path: Path) -> Path | None:
    """The spt run directory holding ``path`` (it has a manifest), if any."""
    from .manifest import MANIFEST_FILE  # (stdlib and spt.files only)

    return next((p for p in (path, *path.parents) if (p / MANIFEST_FILE).is_file()), None)


def _needed_mb(run: Path) -> int:
    """About how much more a run needs: its largest file twice (an atomic rewrite holds the
    old and the new copy, and the files still to come are of the same kind), at least 1 MB."""
    sizes = [p.stat().st_size for p in run.rglob("*") if p.is_file() and not p.is_symlink()]
    return max(1, math.ceil(2 * max(sizes, default=0) / MB))


def disk_error_line(exc: OSError, args: argparse.Namespace) -> str:
    """One line for an ``OSError`` of a command: the path, what happened, what to do."""
    where = str(exc.filename) if exc.filename is not None else output_of(args)
    if exc.errno not in FULL:
        return f"error: {where}: {exc.strerror or exc}; check that disk and folder"
    run = _run_dir(Path(where))
    if run is None:
        return f"error: {where}: {FULL[exc.errno]}; free space on that disk and run the same command again"
    if _finished(run):  # (a report written after the last stage was marked done)
        return (f"error: {where}: {FULL[exc.errno]}; free space on that disk: the run itself finished (its results "
                f"are in {run}), only this file was not written")
    return (f"error: {where}: {FULL[exc.errno]}; free space on that disk (the run needs about {_needed_mb(run)} MB more) "
            "and run the same command again to resume")


def _finished(run: Path) -> bool:
    """Whether every stage of ``run``'s manifest is marked done in its status (unreadable: no)."""
    from .manifest import Manifest
    from .runs import RunDir

    try:
        manifest = Manifest.read(run)
        return manifest is not None and bool(manifest.stages) and all(RunDir(run).done(s) for s in manifest.stages)
    except (UserError, OSError):
        return False


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says a step ran out of memory (CUDA, MPS or the CPU allocator)."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def _functions(tb: TracebackType | None) -> set[str]:
    names = set()
    while tb is not None:
        names.add(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


def memory_error_line(exc: BaseException, args: argparse.Namespace) -> str:
    """One line for an out-of-memory ``exc``: in what, and which setting to lower."""
    device = "GPU memory" if type(exc).__name__ == "OutOfMemoryError" else "memory"
    if args.command in ("predict", "evaluate"):
        return (f"error: --batch-size: out of {device} with --batch-size {args.batch_size}; "
                "pass a smaller --batch-size and run the same command again")
    called = _functions(exc.__traceback__) | {COMMAND_STAGES.get(args.command, "")}
    what, settings = next(((w, s) for name, w, s in STAGES if name in called), ("the run", ["search.batch_size", "retrain.batch_size"]))
    settings = settings + MODEL_SETTINGS
    # recomputing the prompted layers in backward trades step time for the activations' memory
    return (f"error: {settings[0]}: out of {device} in {what}; lower {', '.join(settings[:-1])} or {settings[-1]}, "
            "or set runtime.activation_checkpointing=prompted (--set KEY=VALUE) and run the same command again to resume; "
            "`spt estimate CONFIG --memory SIZE` gives the largest batch that fits")
