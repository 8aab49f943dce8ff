"""Read what the analysis needs from run directories: gates over time and the selection."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spt.errors import UserError


@dataclass
class RunGates:
    """A search's gate history and selection.

    ``history[s][j]`` is the gate of ``candidate_layers[j]`` at ``steps[s]``; ``ranked[j]``
    is the gate of ``candidate_layers[j]`` as selection ranks it (averaged over the steps
    ``select.average_last`` names: by default every step logged in the last epoch).
    """

    path: Path
    task: str
    backbone: str
    seed: int
    num_layers: int
    candidate_layers: list[int]
    steps: list[int]
    history: list[list[float]]
    selected_layers: list[int]
    ranked: list[float] = field(default_factory=list)
    averaged: str = "the last logged step"  # which steps ``ranked`` averages, in words

    @property
    def final(self) -> list[float]:
        return self.history[-1]

    @property
    def k(self) -> int:
        """How many layers the run selected."""
        return len(self.selected_layers)

    def attribute(self, name: str) -> str:
        """The run's task, seed, backbone, K or directory name, as a label."""
        return str({"task": self.task, "seed": self.seed, "backbone": self.backbone, "k": self.k,
                    "run": self.path.name}[name])

    def describe(self, name: str) -> str:
        """``attribute`` as it reads in a title: ``sst2``, ``minilm-l6``, ``seed 42``, ``K=3``."""
        value = self.attribute(name)
        return {"seed": f"seed {value}", "k": f"K={value}"}.get(name, value)


DESCRIBED = ("task", "backbone", "k", "seed")


def shared_description(runs: list[RunGates], skip: tuple[str, ...] = ()) -> str:
    """What all ``runs`` have in common, e.g. ``"sst2 · minilm-l6 · K=3 · seed 42"``."""
    parts = []
    for name in DESCRIBED:
        if name in skip:
            continue
        values = {run.describe(name) for run in runs}
        if len(values) == 1:
            parts.append(values.pop())
    return " · ".join(parts)


def distinct_descriptions(runs: list[RunGates]) -> list[str]:
    """One label per run naming what differs between the runs (task, backbone, K, seed);
    runs that still read alike get their directory name, so no two labels are equal."""
    varying = [name for name in DESCRIBED if len({run.attribute(name) for run in runs}) > 1]
    base = [" · ".join(run.describe(name) for name in varying) for run in runs]
    labels = [b if b and base.count(b) == 1 else (f"{b} · {run.path.name}" if b else run.path.name)
              for b, run in zip(base, runs)]
    # the same directory name under different parents: the full path tells them apart
    return [f"{label} ({run.path})" if labels.count(label) > 1 else label for label, run in zip(labels, runs)]


def load_run(path: str | Path) -> RunGates:
    """Load a search or run directory; a directory without a gate history is refused."""
    from search.config import SelectConfig
    from search.runs import RunDir
    from search.selection import averaged_steps, final_scores, rank_layers, read_gate_history, read_mask

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run_dir: {path} is not a directory")
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"run_dir: {path} has no config.yaml; is it an spt run directory?")
    if not (path / "gates.csv").is_file():
        raise UserError(f"run_dir: {path} has no gate history (gates.csv): only searches can be plotted; run `spt search` first")
    config = RunDir(path).recorded_config() or {}
    try:
        task, backbone, seed = str(config["task"]["name"]), str(config["model"]["backbone"]), int(config.get("seed", 0))
    except (KeyError, TypeError, ValueError):
        raise UserError(str(config_path), "is damaged (task.name, model.backbone or seed missing or unreadable)") from None
    rows = read_gate_history(path / "gates.csv")
    candidates = sorted({r["layer"] for r in rows})
    steps = sorted({r["step"] for r in rows})
    index = {layer: j for j, layer in enumerate(candidates)}
    position = {step: s for s, step in enumerate(steps)}
    history = [[float("nan")] * len(candidates) for _ in steps]
    for r in rows:
        history[position[r["step"]]][index[r["layer"]]] = r["alpha"]
    select = config.get("select") if isinstance(config.get("select"), dict) else {}
    average_last = select.get("average_last", SelectConfig.average_last)
    average_last = average_last if isinstance(average_last, int) and average_last >= 0 else SelectConfig.average_last
    ranked = final_scores(rows, candidates, average_last)
    mask_path = path / "layer_mask.json"
    if mask_path.is_file():
        mask = read_mask(mask_path)
        num_layers, selected = mask.num_layers, mask.selected_layers
    else:  # a search still running: rank by the gates as selection would
        k = select.get("k") if isinstance(select.get("k"), int) else 1
        selected = sorted(rank_layers(candidates, ranked)[:k])
        num_layers = max(candidates) + 1
    return RunGates(
        path=path,
        task=task,
        backbone=Path(backbone).name,  # an alias, or the last part of a path / hub id
        seed=seed,
        num_layers=num_layers,
        candidate_layers=candidates,
        steps=steps,
        history=history,
        selected_layers=selected,
        ranked=ranked,
        averaged=averaged_steps(average_last),
    )

