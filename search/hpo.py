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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from spt.errors import ConfigError, UserError
from spt.files import check_writable, write_text_atomic

from . import lock
from .callbacks import TrainingDiverged
from .comparison import Chart
from .config import OBJECTIVES, RunConfig, config_from_run_dict, dump_config
from .pipeline import Prepared, prepare, run_job, run_retrain, write_metrics
from .runs import RunDir, create_run_dir, open_run_dir
from .selection import write_mask
from .storage import default_storage, describe_error, open_storage, resolve_url, retry_callback, storage_file
from .strategies import make_sampler

logger = logging.getLogger("spt")


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
    hpo = config.hpo
    space = json.dumps({"space": hpo.space, "objectives": hpo.objectives, "mode": hpo.mode}, sort_keys=True)
    fingerprint = _fingerprint(config)
    try:
        existing = optuna.study.get_all_study_names(storage)
    except Exception as exc:
        url = resolve_url(hpo.storage) if hpo.storage else ""
        raise UserError("--storage", f"cannot read studies ({describe_error(exc, url)})") from None
    sampler = make_sampler(hpo.sampler, config.seed + os.getpid(), "hpo.sampler")
    single = len(hpo.objectives) == 1  # (Optuna cannot prune a multi-objective trial)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if hpo.pruner == "median" and single else optuna.pruners.NopPruner()
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
                f"--study: study {name!r} exists with another search space, objectives or mode ({attrs.get('spt_space')}); "
                "choose another --study name or use the same hpo.space, hpo.objectives and hpo.mode"
            )
        if attrs.get("spt_config") != fingerprint:
            raise UserError(
                f"--study: study {name!r} exists for another base config (task, data, backbone or fixed "
                "hyperparameters differ); choose another --study name"
            )
        _name_objectives(study, hpo.objectives, config.task.metric)
        return study
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                directions=[OBJECTIVES[o] for o in hpo.objectives], load_if_exists=True)
    _name_objectives(study, hpo.objectives, config.task.metric)
    _record_settings(study, space, fingerprint, config.task.metric)
    return study


def objective_names(objectives: list[str], metric: str) -> list[str]:
    """What each objective is, as the dashboard and Optuna's plots label it."""
    names = {"dev": f"dev {metric}", "params": "trainable parameters", "step_ms": "retraining step (ms)"}
    return [names[o] for o in objectives]


def _name_objectives(study, objectives: list[str], metric: str) -> None:
    """Name the study's values (once; studies made before names existed get them on load)."""
    import warnings

    if study.metric_names is None:
        with warnings.catch_warnings():  # set_metric_names is marked experimental in Optuna
            warnings.simplefilter("ignore")
            study.set_metric_names(objective_names(objectives, metric))


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


def hpo_root(config: RunConfig, out: str | Path | None = None) -> Path:
    """The folder of the trial run directories (and of the default SQLite study)."""
    return Path(out or config.hpo.out_dir or Path("runs") / f"hpo-{study_name(config)}")


def storage_url(config: RunConfig, root: Path) -> str:
    """``hpo.storage``, or the SQLite file ``spt-hpo.db`` in ``root``."""
    return config.hpo.storage or default_storage(root)


def check_destinations(config: RunConfig, root: Path) -> None:
    """Refuse, before the study is created or opened, trial and storage folders that cannot be written."""
    check_writable(root, "--out")
    path = storage_file(resolve_url(storage_url(config, root)))
    if path is not None:
        check_writable(path, "--storage")


def run_hpo(config: RunConfig, trials: int, max_trials: int | None = None, out: str | Path | None = None,
            progress: bool = False, timeout: float | None = None) -> Any:
    """Run ``trials`` trials in this worker (fewer if the study reaches ``max_trials``, or once
    ``timeout`` seconds have passed: a trial running then is finished, no new one starts).

    A trial interrupted here (Ctrl-C) is marked failed and not resumed; a trial whose worker
    died (no heartbeat, or a dead process of this host on a journal storage) is failed and
    retried with the same parameters in its own run directory, resuming from its checkpoint.
    """
    import optuna
    from optuna.trial import TrialState

    check_space(config)
    root = hpo_root(config, out)
    check_destinations(config, root)
    prepare(config)  # the base config's data and backbone: a problem there is the user's, not a trial's
    # Optuna's own lines (a study created, a trial failed with its traceback) would repeat ours.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    hpo = config.hpo
    if hpo.storage is None:
        root.mkdir(parents=True, exist_ok=True)  # the default study lives there
    storage = open_storage(storage_url(config, root), hpo.heartbeat_interval, hpo.grace_period, hpo.max_retry)
    study = open_study(config, storage)
    if not (hpo.heartbeat_interval and isinstance(storage, optuna.storages.RDBStorage)):
        fail_dead_local_trials(study, hpo.max_retry)
    root.mkdir(parents=True, exist_ok=True)
    callbacks = []
    if max_trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(max_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if trials > 0:
        study.optimize(make_objective(config, root, progress), n_trials=trials, timeout=timeout, callbacks=callbacks, catch=())
    return study


def pareto_report(config: RunConfig, study, out: str | Path | None) -> Chart | None:
    """A multi-objective study's ``pareto.md`` (written) and its picture to draw, if it has a front."""
    if len(config.hpo.objectives) < 2 or not study.best_trials:
        return None
    return write_pareto(study, hpo_root(config, out), config.task.metric)


def make_objective(config: RunConfig, root: Path, progress: bool) -> Callable[[Any], float]:
    """The objective: one trial's search, selection and retraining in ``root/trial-NNNN``."""
    import optuna

    worker = f"{socket.gethostname()}:{os.getpid()}"
    base = config.to_dict()

    def objective(trial: optuna.Trial) -> float:
        previous = trial.user_attrs.get("worker")  # set: a retry of a dead worker's trial
        name = str(trial.user_attrs.get("run_dir") or f"trial-{trial.number:04d}")
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("run_dir", name)  # relative to --out: no user's folder layout in the study
        params = {key: _suggest(trial, key, spec, _get_path(base, key)) for key, spec in config.hpo.space.items()}
        layers = _suggest_layers(trial, config) if config.hpo.mode == "subsets" else None
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
        if previous:
            lock.known_dead(previous)
            logger.warning("trial %d retries %s of dead worker %s, resuming from its checkpoint", trial.number, name, previous)
        return _run_trial(trial, prep, root / name, params, retry=bool(previous), progress=progress, layers=layers)

    return objective


def _suggest_layers(trial: Any, config: RunConfig) -> list[int]:
    """``subsets`` mode: one yes/no per candidate layer (at least one yes: else the first)."""
    candidates = config.prompt.candidate_layers or list(range(_num_layers(config)))
    chosen = [c for c in candidates if trial.suggest_categorical(f"layer_{c}", [0, 1])]
    return chosen or [candidates[0]]


def _num_layers(config: RunConfig) -> int:
    from .pipeline import run_backbone

    return run_backbone(config, config.head.verbalizer).num_layers


def _run_trial(trial: Any, prep: Prepared, path: Path, params: dict[str, Any], retry: bool, progress: bool,
               layers: list[int] | None = None) -> float | tuple[float, ...]:
    import optuna

    cfg, started = prep.config, time.perf_counter()
    metric = cfg.task.metric
    stages = ["search", "retrain"] if layers is None else ["retrain"]
    # A directory already there belongs to a retried trial (resumed; redone if its worker
    # died after finishing it) or to another study sharing this --out (refused, not overwritten).
    redo = retry and path.is_dir() and RunDir(path).done("retrain")
    run = create_run_dir(open_run_dir(path, cfg, stages, force=redo, create=False), cfg)

    def report(step: int, dev: float) -> None:
        if len(cfg.hpo.objectives) == 1:
            trial.report(dev, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

    try:
        if layers is None:
            mask, metrics = run_job(prep, run, progress=progress, on_eval=report)
        else:
            mask, metrics = retrain_subset(prep, run, layers, progress, report)
    except TrainingDiverged as exc:
        trial.set_user_attr("diverged", str(exc))
        logger.info("trial %d: %s, pruned", trial.number, exc)
        raise optuna.TrialPruned() from None
    finally:
        run.release()
    trial.set_user_attr("selected_layers", mask.selected_layers)
    if layers is None:
        trial.set_user_attr("layer_scores", dict(zip(map(str, mask.candidate_layers), mask.scores)))
        trial.set_user_attr("gates", [round(a, 4) for a in run.status()["search"]["alphas"]])
    trial.set_user_attr("test", metrics["test"][metric])
    values = objective_values(metrics, cfg.hpo.objectives)
    trial.set_user_attr("params", metrics["trainable_params"])
    logger.info("trial %d (%s): %s -> layers %s, %s (%.0fs)", trial.number, trial.user_attrs["worker"],
                ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()),
                mask.selected_layers, ", ".join(f"{o} {v:.4g}" for o, v in zip(cfg.hpo.objectives, values)), time.perf_counter() - started)
    return values[0] if len(values) == 1 else tuple(values)


def objective_values(metrics: dict[str, Any], objectives: list[str]) -> list[float]:
    """A trial's values: the dev score, the trainable parameters, the mean training step in ms."""
    every = {"dev": metrics["dev"][metrics["metric"]], "params": float(metrics["trainable_params"]),
             "step_ms": 1000 * metrics["retrain_seconds"] / max(1, metrics["retrain_steps"])}
    return [every[o] for o in objectives]


def retrain_subset(prep: Prepared, run: RunDir, layers: list[int], progress: bool,
                   on_eval: Callable[[int, float], None]) -> tuple[Any, dict[str, Any]]:
    """``subsets`` mode: the sparse model of ``layers`` trained and scored (no search)."""
    from .strategies import fixed_proposal

    mask = fixed_proposal(prep, layers).mask
    write_mask(mask, run.file("layer_mask.json"), force=True)
    result = run_retrain(prep, mask, run, progress=progress, on_eval=on_eval)
    metrics = write_metrics(run, prep.config, mask, result, None)
    run.mark("retrain", seconds=round(result.seconds, 3))
    return mask, metrics


def fail_dead_local_trials(study: Any, max_retry: int | None) -> None:
    """For storages without a heartbeat (journal files, ``hpo.heartbeat_interval: 0``): a
    running trial whose worker is a dead process of this host is failed, and retried with
    the same parameters. (With a heartbeat, Optuna does this before each trial.)"""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if not (pid.isdigit() and lock.Holder(int(pid), host).stale()):
            continue
        failed = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        logger.warning("trial %d: its worker %s is dead; failed, and retried with the same parameters",
                       trial.number, trial.user_attrs["worker"])
        retry_callback(max_retry)(study, failed)


def study_table(study) -> str:
    from optuna.trial import TrialState

    objectives = json.loads(study.user_attrs.get("spt_space", "{}")).get("objectives", ["dev"])
    lines = [f"| trial | state | {' | '.join(objectives)} | test | layers | worker | suggested |", "|---|---|" + "---|" * len(objectives) + "---|---|---|---|"]
    for t in study.get_trials(deepcopy=False):
        values = " | ".join(f"{v:.4g}" for v in t.values) if t.values else " | ".join("-" for _ in objectives)
        test = t.user_attrs.get("test")
        params = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}" for k, v in t.params.items())
        lines.append(f"| {t.number} | {t.state.name} | {values} | {'-' if test is None else f'{test:.4f}'} | "
                     f"{t.user_attrs.get('selected_layers', '-')} | {t.user_attrs.get('worker', '-')} | {params} |")
    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        if len(objectives) == 1:
            best = study.best_trial
            lines += ["", f"best: trial {best.number}, dev {best.value:.4f}, params {best.params}"]
        else:
            lines += ["", "Pareto front: trials " + ", ".join(str(t.number) for t in sorted(study.best_trials, key=lambda t: t.number))]
    return "\n".join(lines)


def write_pareto(study, root: Path, metric: str) -> Chart:
    """``pareto.md`` in ``root`` and the picture of ``pareto.png``: the non-dominated trials, dev
    score against size."""
    front = sorted(study.best_trials, key=lambda t: t.user_attrs.get("params", 0))
    rows = [{"trainable_params": t.user_attrs.get("params", 0), "test": t.values[0], "k": len(t.user_attrs.get("selected_layers", [])),
             "trial": t.number, "layers": t.user_attrs.get("selected_layers")} for t in front]
    table = "\n".join(["| trial | K | layers | trainable params | dev |", "|---|---|---|---|---|"] + [
        f"| {r['trial']} | {r['k']} | {r['layers']} | {int(r['trainable_params']):,} | {r['test']:.4f} |" for r in rows])
    title = f"Pareto front of study {study.study_name!r}: dev {metric} against trainable parameters"
    write_text_atomic(root / "pareto.md", f"# {title}\n\n![front](pareto.png)\n\n{table}\n")
    return Chart("fronts", {"pareto front (dev)": rows}, metric, root / "pareto.png", title)


def export_best(config: RunConfig, study, path: str | Path, force: bool = False, max_params: int | None = None) -> Path:
    """Write the best trial's full config (storage password masked): ``spt run PATH`` reproduces it.

    The best trial is the one with the best dev score, among those with at most
    ``max_params`` trainable parameters when given.
    """
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        raise UserError("--export-best", f"study {study.study_name!r} has no completed trial yet")
    fits = [t for t in done if max_params is None or t.user_attrs.get("params", 0) <= max_params]
    if not fits:
        smallest = min(t.user_attrs.get("params", 0) for t in done)
        raise UserError("--max-params", f"no completed trial has at most {max_params:,} trainable parameters (the smallest has {smallest:,})")
    chosen = max(fits, key=lambda t: (t.values[0], -t.number))
    path = Path(path)
    check_export(path, force)
    best = trial_config(config, {k: v for k, v in chosen.params.items() if not k.startswith("layer_")})
    if chosen.user_attrs.get("selected_layers") and config.hpo.mode == "subsets":
        best.prompt.candidate_layers = list(chosen.user_attrs["selected_layers"])  # rerun: those layers are the search's only candidates
        best.select.k, best.select.budget = len(best.prompt.candidate_layers), None
    text = f"# Best trial {chosen.number} of study {study.study_name!r} (dev {chosen.values[0]:.4f}).\n"
    text += dump_config(best)
    yaml.safe_load(text)
    return write_text_atomic(path, text)


def check_export(path: str | Path, force: bool) -> None:
    """Refuse an ``--export-best`` file that exists (without ``force``) or cannot be written."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError("--export-best", f"{path} already exists; pass --force to overwrite it")
    check_writable(path, "--export-best")
