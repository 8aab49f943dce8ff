"""Run directories: creation without silent overwrites, resume detection, the recorded
config and environment, the log, and per-stage status."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from spt.errors import UserError

from .config import RunConfig, dump_config, run_identity

STATUS_FILE = "status.json"
CONFIG_FILE = "config.yaml"
DEFAULT_ROOT = Path("runs")


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else prefix.rstrip(".")


class RunDir:
    """A run directory and what is known about its stages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.resume = False  # an unfinished run with the same config, to be continued
        self.clear = False  # --force: remove what is there before writing

    def file(self, name: str) -> Path:
        return self.path / name

    def status(self) -> dict[str, Any]:
        path = self.file(STATUS_FILE)
        return json.loads(path.read_text()) if path.is_file() else {}

    def mark(self, stage: str, **info: Any) -> None:
        status = self.status()
        status[stage] = {"done": True, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        tmp = self.file(STATUS_FILE + ".tmp")
        tmp.write_text(json.dumps(status, indent=2) + "\n")
        tmp.replace(self.file(STATUS_FILE))

    def done(self, stage: str) -> bool:
        return bool(self.status().get(stage, {}).get("done"))

    def recorded_config(self) -> dict[str, Any] | None:
        path = self.file(CONFIG_FILE)
        return yaml.safe_load(path.read_text()) if path.is_file() else None


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
    * a run directory with the same config whose stages are not all done is resumed;
    * a finished run, or one with another config, is refused unless ``force`` (which
      clears it); a non-empty directory that is not a run directory is always refused.

    With ``create=False`` only the checks run and nothing is written, so a job can
    refuse bad input before it leaves anything behind; call :func:`create_run_dir` next.
    """
    path = Path(out) if out is not None else default_run_path(config.task.name)
    run = RunDir(path)
    if path.exists() and not path.is_dir():
        raise UserError("--out", f"{path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        recorded = run.recorded_config()
        if recorded is None:
            raise UserError("--out", f"{path} is not empty and is not an spt run directory; choose a new or empty directory")
        if force:
            run.clear = True
        else:
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
            if all(run.done(stage) for stage in stages):
                raise UserError("--out", f"{path} already holds this finished run; pass --force to run it again")
            run.resume = True
    return create_run_dir(run, config) if create else run


def create_run_dir(run: RunDir, config: RunConfig) -> RunDir:
    """Write what :func:`open_run_dir` decided: clear (``--force``), create, record."""
    if run.clear:
        shutil.rmtree(run.path)
        run.clear = False
    if not run.resume:
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / CONFIG_FILE).write_text(dump_config(config))
        (run.path / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")
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
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pid": os.getpid(),
    }


class _TqdmHandler(logging.StreamHandler):
    """Console log lines that do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never crash a run
            self.handleError(record)


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
        file_handler = logging.FileHandler(run.file("log.txt"))
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)
    logger.propagate = False
    return logger
