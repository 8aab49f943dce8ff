"""Run directories: creation without silent overwrites, resume detection, the lock and
the manifest of what spt wrote, the recorded config and environment, the log, and
per-stage status."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterable
from contextlib import suppress
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from spt.errors import UserError
from spt.files import check_writable, read_text, write_json_atomic, write_text_atomic
from spt.schema import validate

from . import lock
from .clearing import TRASH, check_clearable, clear, written_files
from .config import RunConfig, config_from_run_dict, dump_config, run_identity
from .manifest import MANIFEST_FILE, STATUS_FILE, Manifest
from .schema import CONFIG, STAGE_STATUS
from .storage import mask_argument, mask_secrets

CONFIG_FILE = "config.yaml"
ENVIRONMENT_FILE = "environment.json"
DEFAULT_ROOT = Path("runs")
BOOKKEEPING = (MANIFEST_FILE, lock.LOCK_FILE, TRASH)  # what an otherwise empty run directory may hold
DAMAGED_FIX = "restore it, or pass --force to start this run over (spt deletes only the files it wrote)"


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else prefix.rstrip(".")


class RunDir:
    """A run directory and what is known about its stages.

    While a job writes the directory (after :meth:`open_for_writing`), every name asked
    for with :meth:`file` is recorded in the directory's manifest: the one place where
    run files are named is the one place that records them.
    """

    def __init__(self, path: Path, stages: Iterable[str] = ()) -> None:
        self.path = path
        self.stages = list(stages)  # what the job that opens it will write
        self.resume = False  # an unfinished run with the same config, to be continued
        self.clear = False  # --force: remove what spt wrote there before writing
        self.manifest: Manifest | None = None  # set while this job writes the directory

    def file(self, name: str) -> Path:
        if self.manifest is not None:
            self.manifest.add(name)
        return self.path / name

    def has_content(self) -> bool:
        """Whether the directory holds anything beyond spt's lock and manifest."""
        return self.path.is_dir() and any(p.name not in BOOKKEEPING for p in self.path.iterdir())

    def open_for_writing(self) -> None:
        """Take the directory's lock and its manifest (a new one if it has none)."""
        lock.acquire(self.path)
        self.manifest = Manifest.read(self.path) or Manifest(self.path, self.stages)

    def release(self) -> None:
        lock.release(self.path)

    def status(self) -> dict[str, Any]:
        path = self.path / STATUS_FILE
        if not path.is_file():
            return {}
        try:
            status = json.loads(read_text(path, str(path)))
        except json.JSONDecodeError as exc:
            raise UserError(str(path), f"is damaged (not valid JSON: {exc.msg}, line {exc.lineno}); {DAMAGED_FIX}") from None
        if not isinstance(status, dict):
            raise UserError(str(path), f"is damaged (not a mapping of stage -> status); {DAMAGED_FIX}")
        return {stage: validate(entry, STAGE_STATUS, str(path), f"; {DAMAGED_FIX}", f"{stage}.") for stage, entry in status.items()}

    def mark(self, stage: str, **info: Any) -> None:
        status = self.status()
        status[stage] = {"done": True, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        write_json_atomic(self.file(STATUS_FILE), status)

    def done(self, stage: str) -> bool:
        return bool(self.status().get(stage, {}).get("done"))

    def recorded_config(self) -> dict[str, Any] | None:
        path = self.path / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            data = yaml.safe_load(read_text(path, str(path)))
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(str(path), f"is damaged (not valid YAML: {problem}); {DAMAGED_FIX}") from None
        if not isinstance(data, dict):
            raise UserError(str(path), f"is damaged (not a mapping of config sections); {DAMAGED_FIX}")
        return validate(data, CONFIG, str(path), f"; {DAMAGED_FIX}")  # each section a mapping (fields: see config())

    def config(self) -> RunConfig:
        """The run's recorded config, checked like any config (errors name the file)."""
        recorded = self.recorded_config()
        if recorded is None:
            raise UserError("run_dir", f"{self.path} has no config.yaml; is it an spt run directory?")
        try:
            return config_from_run_dict(recorded)
        except UserError as exc:
            raise UserError(str(self.path / CONFIG_FILE), f"{exc}; {DAMAGED_FIX}") from None

    def recorded_stages(self) -> set[str]:
        """The stages of the job(s) that wrote the directory: its manifest's and its status's."""
        manifest = Manifest.read(self.path)
        return set(manifest.stages if manifest else ()) | set(self.status())


def default_run_path(task: str, root: Path = DEFAULT_ROOT) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{task}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{task}-{stamp}-{n}"
    return path


def open_run_dir(
    out: str | Path | None, config: RunConfig, stages: Iterable[str], force: bool = False, create: bool = True,
    with_compare: bool = False,
) -> RunDir:
    """The run directory for a job made of ``stages``: new, or reopened to resume.

    * a new or empty directory is used as is;
    * a run directory with the same config, written by a job whose stages are among
      ``stages``, whose stages are not all done, is resumed;
    * a finished run, one with another config, or one holding another job's stages is
      refused unless ``force``, which deletes what its manifest lists (and nothing else),
      all or nothing; a listed folder holding a file spt did not write is refused
      (:mod:`search.clearing`);
    * a non-empty directory without a manifest is never cleared, and without a config
      never used; a directory another live job holds (its lock) is refused.

    With ``create=False`` only the checks run and nothing is written, so a job can
    refuse bad input before it leaves anything behind; call :func:`create_run_dir` next.
    """
    path = Path(out) if out is not None else default_run_path(config.task.name)
    run = RunDir(path, stages)
    if path.exists() and not path.is_dir():
        raise UserError("--out", f"{path} is a file, not a directory")
    check_writable(path, "--out")
    if path.is_dir():
        lock.check_free(path)
    if run.has_content():
        if force:
            manifest = Manifest.read(path)
            if manifest is None:
                raise UserError("--out", f"{path} is not empty and is not an spt run directory with a manifest "
                                f"({MANIFEST_FILE}), so --force deletes nothing there; choose a new or empty directory")
            check_clearable(manifest)  # a user's file in a folder spt wrote, or one that cannot go: refused now
            run.clear = True
        else:
            _check_resumable(run, config, with_compare)
            run.resume = True
    return create_run_dir(run, config) if create else run


def _check_resumable(run: RunDir, config: RunConfig, with_compare: bool) -> None:
    """Refuse (without --force) a directory this job must not continue."""
    path = run.path
    recorded = run.recorded_config()
    if recorded is None:
        raise UserError("--out", f"{path} is not empty and is not an spt run directory; choose a new or empty directory")
    if with_compare:  # a comparison's result depends on its strategies and seeds too
        diff = _first_difference({k: v for k, v in recorded.items() if k != "runtime"},
                                 {k: v for k, v in config.to_dict().items() if k != "runtime"})
    else:
        diff = _first_difference(run_identity(recorded), config.identity())
    if diff is not None:
        raise UserError(
            f"--out: {path} holds a run with a different config ({diff} differs); "
            "choose another --out, or pass --force to replace that run"
        )
    foreign = sorted(run.recorded_stages() - set(run.stages))
    if foreign:
        raise UserError("--out", f"{path} holds another job's results (stage {', '.join(foreign)}), which this job "
                        f"({', '.join(run.stages)}) would overwrite; choose another --out, or pass --force to replace them")
    if all(run.done(stage) for stage in run.stages):
        raise UserError("--out", f"{path} already holds this finished run; pass --force to run it again")
    for name in (CONFIG_FILE, ENVIRONMENT_FILE, *written_files()):  # a resumed job reads or appends to them
        file = run.file(name)
        if file.exists() and not file.is_file():
            raise UserError(str(file), "is a folder (or not a regular file) where spt keeps a file of this run; "
                            "move it away, or pass --force to start the run over")
        if name.endswith(".csv") and file.is_file():  # a history a stage keeps rows of: text now, not after a rewrite
            read_text(file, str(file))


def create_run_dir(run: RunDir, config: RunConfig) -> RunDir:
    """Write what :func:`open_run_dir` decided: lock, clear (``--force``), create, record."""
    run.path.mkdir(parents=True, exist_ok=True)
    run.open_for_writing()
    assert run.manifest is not None
    if run.clear:
        try:
            clear(run.manifest)
        except UserError:
            run.release()
            raise
        run.clear = False
    elif not run.resume and run.has_content():
        run.release()
        raise UserError("--out", f"{run.path} was written by another job meanwhile; choose another --out")
    run.manifest.add_stages(run.stages)
    if not run.resume:
        write_text_atomic(run.file(CONFIG_FILE), dump_config(config))
        write_json_atomic(run.file(ENVIRONMENT_FILE), environment())
    return run


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with each run."""
    import torch

    packages = {}
    for name in ("spt-search", "torch", "transformers", "optuna", "numpy", "scikit-learn", "safetensors", "peft"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": packages,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "command": _private(" ".join(mask_argument(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pid": os.getpid(),
    }


def _private(text: str) -> str:
    """``text`` with storage passwords masked and the home folder written ``~``."""
    home = str(Path.home())
    text = mask_secrets(text)
    return text.replace(home + os.sep, "~" + os.sep) if home not in ("", os.sep) else text


class _TqdmHandler(logging.StreamHandler):
    """Console log lines that do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never crash a run
            self.handleError(record)


class _RunLogHandler(logging.FileHandler):
    """``log.txt``: a line that cannot be written (a full disk) ends the command with one error
    naming the file, where ``logging`` would print a traceback and go on."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        stream, self.stream = self.stream, None  # drop the unwritten bytes: closing later must not fail again
        with suppress(OSError):
            stream.close()
        raise OSError(exc.errno, exc.strerror, self.baseFilename) from exc


def setup_logging(run: RunDir | None, verbose: bool = True) -> logging.Logger:
    """Log to ``<run>/log.txt`` (everything) and the console (INFO and up)."""
    logger = logging.getLogger("spt")
    logger.setLevel(logging.DEBUG)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = _TqdmHandler()
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if run is not None:
        file_handler = _RunLogHandler(run.file("log.txt"))
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)
    logger.propagate = False
    return logger
