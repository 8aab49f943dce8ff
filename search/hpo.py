"""``spt hpo``: an Optuna study over the search's hyperparameters on a shared storage.

Each trial runs the whole job (search, selection, retraining) with suggested values and
returns the retrained dev score. Workers started with the same ``--storage`` and
``--study`` cooperate on one study, on one machine or many; running a worker again on an
existing study continues it. A study remembers its search space and base config: a
worker whose settings differ is refused before it touches the study.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from spt.errors import ConfigError, UserError

from .config import RunConfig, config_from_run_dict, dump_config
from .pipeline import prepare, run_job
from .runs import create_run_dir, open_run_dir
from .strategies import make_sampler

logger = logging.getLogger("spt")


def open_storage(url: str):
    """An Optuna storage for ``url``; an unreachable or malformed one is a :class:`UserError`."""
    import optuna

    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = Path(url[len("journal:") :]).expanduser()
            if not path.parent.is_dir():
                raise UserError("--storage", f"folder {path.parent} of journal file {path.name} does not exist")
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if "://" not in url:
            raise UserError("--storage", f"{url!r} is not a storage URL; use sqlite:///file.db, postgresql://user@host/db or journal:/path/file.log")
        return _rdb_storage(url)
    except UserError:
        raise
    except Exception as exc:  # SQLAlchemy and drivers raise many types for an unreachable server
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError("--storage", f"cannot open {url!r} ({type(exc).__name__}: {first})") from None


def _rdb_storage(url: str, attempts: int = 6):
    """An RDB storage; workers that start together on an empty database race to create its
    tables, and the losers of that race retry once the winner's tables exist."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    section, name = key.split(".", 1)
    data.setdefault(section, {})[name] = value


def _get_path(data: dict[str, Any], key: str) -> Any:
    section, name = key.split(".", 1)
    return data[section][name]


def check_space(config: RunConfig) -> None:
    data = config.to_dict()
    for key, spec in config.hpo.space.items():
        if key.count(".") != 1 or key.split(".")[0] not in data or key.split(".")[1] not in data[key.split(".")[0]]:
            raise ConfigError(f"hpo.space.{key}", "is not a config field; write section.field, e.g. search.lr")
        if key.split(".")[0] in ("runtime", "hpo", "compare", "task"):
            raise ConfigError(f"hpo.space.{key}", "only model, prompt, head, search, select and retrain fields can be searched")
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"hpo.space.{key}", "has no choices")
        elif not (isinstance(spec, dict) and "low" in spec and "high" in spec and spec["low"] < spec["high"]):
            raise ConfigError(f"hpo.space.{key}", "must be a list of choices or {low, high[, log, step]} with low < high")


def _suggest(trial, key: str, spec: Any, current: Any) -> Any:
    if isinstance(spec, list):
        return trial.suggest_categorical(key, spec)
    if isinstance(current, int) and not isinstance(current, bool) and all(float(spec[b]).is_integer() for b in ("low", "high")):
        return trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)), log=bool(spec.get("log", False)))
    return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)), step=spec.get("step"))


def _fingerprint(config: RunConfig) -> str:
    """The base config a study belongs to, without the fields the study varies."""
    data = config.identity()
    for key in config.hpo.space:
        section, name = key.split(".", 1)
        data.get(section, {}).pop(name, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def study_name(config: RunConfig) -> str:
    return config.hpo.study or f"{config.task.name}-{Path(config.model.backbone).name}"


def open_study(config: RunConfig, storage):
    """Create the study, or load it after checking it was made with the same settings."""
    import optuna

    name = study_name(config)
    space = json.dumps(config.hpo.space, sort_keys=True)
    fingerprint = _fingerprint(config)
    try:
        existing = optuna.study.get_all_study_names(storage)
    except Exception as exc:
        raise UserError("--storage", f"cannot read studies ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    sampler = make_sampler(config.hpo.sampler, config.seed + os.getpid())
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if config.hpo.pruner == "median" else optuna.pruners.NopPruner()
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        attrs = study.user_attrs
        for _ in range(50):  # a worker that just created the study may still be recording its settings
            if "spt_space" in attrs:
                break
            time.sleep(0.2)
            attrs = study.user_attrs
        else:
            _record_settings(study, space, fingerprint, config.task.metric)
            return study
        if attrs.get("spt_space") != space:
            raise UserError(
                f"--study: study {name!r} exists with another search space ({attrs.get('spt_space')}); "
                "choose another --study name or use the same hpo.space"
            )
        if attrs.get("spt_config") != fingerprint:
            raise UserError(
                f"--study: study {name!r} exists for another base config (task, data, backbone or fixed "
                "hyperparameters differ); choose another --study name"
            )
        return study
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    _record_settings(study, space, fingerprint, config.task.metric)
    return study


def _record_settings(study, space: str, fingerprint: str, metric: str) -> None:
    study.set_user_attr("spt_config", fingerprint)
    study.set_user_attr("spt_metric", metric)
    study.set_user_attr("spt_space", space)  # last: its presence means the settings are complete


def trial_config(config: RunConfig, params: dict[str, Any]) -> RunConfig:
    data = copy.deepcopy(config.to_dict())
    for key, value in params.items():
        _set_path(data, key, value)
    if "select.k" in params:
        data["select"]["budget"] = None
    return config_from_run_dict(data)


def run_hpo(config: RunConfig, trials: int, max_trials: int | None = None, out: str | None = None,
            progress: bool = False, timeout: float | None = None) -> Any:
    """Run ``trials`` trials in this worker (fewer if the study reaches ``max_trials``, or once
    ``timeout`` seconds have passed: a trial running then is finished, no new one starts)."""
    import optuna
    from optuna.trial import TrialState

    check_space(config)
    prepare(config)  # the base config's data and backbone: a problem there is the user's, not a trial's
    storage = open_storage(config.hpo.storage)
    study = open_study(config, storage)
    root = Path(out or config.hpo.out_dir or Path("runs") / f"hpo-{study.study_name}")
    root.mkdir(parents=True, exist_ok=True)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    metric = config.task.metric
    base = config.to_dict()

    def objective(trial: optuna.Trial) -> float:
        params = {key: _suggest(trial, key, spec, _get_path(base, key)) for key, spec in config.hpo.space.items()}
        trial.set_user_attr("worker", worker)
        try:
            cfg = trial_config(config, params)
            prep = prepare(cfg)
        except UserError as exc:
            # The base config was checked before the study started, so what fails here is the
            # combination (phm_n not dividing the bottleneck, K above the candidate layers...):
            # not a result and not a failure.
            trial.set_user_attr("invalid", str(exc))
            logger.info("trial %d: invalid combination (%s), pruned", trial.number, exc)
            raise optuna.TrialPruned() from None
        # Trial numbers are unique within a study; a directory already there belongs to
        # another study sharing this --out, and is refused rather than overwritten.
        run = create_run_dir(open_run_dir(root / f"trial-{trial.number:04d}", cfg, ["search", "retrain"], create=False), cfg)
        trial.set_user_attr("run_dir", str(run.path))
        started = time.perf_counter()

        def report(step: int, dev: float) -> None:
            trial.report(dev, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        mask, metrics = run_job(prep, run, progress=progress, on_eval=report)
        trial.set_user_attr("selected_layers", mask.selected_layers)
        trial.set_user_attr("layer_scores", dict(zip(map(str, mask.candidate_layers), mask.scores)))
        trial.set_user_attr("gates", [round(a, 4) for a in run.status()["search"]["alphas"]])
        trial.set_user_attr("test", metrics["test"][metric])
        score = metrics["dev"][metric]
        logger.info("trial %d (%s): %s -> layers %s, dev %s %.4f (%.0fs)", trial.number, worker,
                    ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()),
                    mask.selected_layers, metric, score, time.perf_counter() - started)
        return score

    callbacks = []
    if max_trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(max_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if trials > 0:
        study.optimize(objective, n_trials=trials, timeout=timeout, callbacks=callbacks, catch=())
    return study


def study_table(study) -> str:
    from optuna.trial import TrialState

    lines = ["| trial | state | dev | test | layers | worker | params |", "|---|---|---|---|---|---|---|"]
    for t in study.get_trials(deepcopy=False):
        value = f"{t.value:.4f}" if t.value is not None else "-"
        test = t.user_attrs.get("test")
        params = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}" for k, v in t.params.items())
        lines.append(f"| {t.number} | {t.state.name} | {value} | {'-' if test is None else f'{test:.4f}'} | "
                     f"{t.user_attrs.get('selected_layers', '-')} | {t.user_attrs.get('worker', '-')} | {params} |")
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if done:
        best = study.best_trial
        lines += ["", f"best: trial {best.number}, dev {best.value:.4f}, params {best.params}"]
    return "\n".join(lines)


def export_best(config: RunConfig, study, path: str | Path, force: bool = False) -> Path:
    """Write the best trial's full config: ``spt run PATH`` reproduces it."""
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise UserError("--export-best", f"study {study.study_name!r} has no completed trial yet")
    path = Path(path)
    if path.exists() and not force:
        raise UserError("--export-best", f"{path} already exists; pass --force to overwrite it")
    best = trial_config(config, study.best_trial.params)
    text = f"# Best trial {study.best_trial.number} of study {study.study_name!r} (dev {study.best_trial.value:.4f}).\n"
    path.write_text(text + dump_config(best))
    yaml.safe_load(path.read_text())
    return path
