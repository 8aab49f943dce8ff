"""Search quality: SPT's layer pick against a multi-seed exhaustive oracle and the baselines.

MiniLM-L6, K=3 of 6 candidate layers (and one MPNet-base task, K=3 of 12, whose oracle is a
sample: see ``Task.sample``). For each task and seed (seed = the LM-BFF split seed
where the task has them, else the seed of a k-shot sample; always the initialisation seed):

* the oracle: every one of the 20 K=3 subsets (on MPNet a sample: ``Task.sample``), its
  sparse model trained with the task's retraining recipe and scored on dev and test;
* the baselines, trained the same way: ``first`` (layer 0, prompt tuning), ``middle``
  (layer 3, LPT style), ``all`` (6 layers, P-tuning v2 style), PEFT LoRA and prefix tuning
  and Houlsby adapters at the parameters of K=3 generators, ``head-only`` (a linear probe); ``random`` is the exact expectation of a uniformly
  drawn K=3 subset (the mean of the oracle at that seed);
* SPT's search under each variant in ``SEARCH_VARIANTS``, its layers ranked by each
  selection method; a pick is scored by the oracle's entry for the same subset and seed
  (the identical training).

The oracle ranks subsets by their mean test score over the seeds. Reported per task: the
majority-class score, the oracle's best / median / spread and the seed noise (a task whose
best-minus-median is below two standard errors of a 3-seed mean is marked
layer-insensitive), each strategy's mean +- std, the pick's oracle rank and gap, the
Spearman correlation between SPT's layer scores and each layer's marginal oracle value,
and the search's compute against the oracle's; then the mean over tasks.

    python benchmarks/quality.py run --shard 0/2 --threads 1 &     # two workers side by side
    python benchmarks/quality.py run --shard 1/2 --threads 1
    python benchmarks/quality.py report                             # tables -> results/quality/quality.md
    python benchmarks/quality.py run --tasks sst2-16shot --seeds 13 --quick   # smoke run
    python benchmarks/quality.py run --tasks sst2-16shot-mpnet --what spt      # MPNet-base, K=3 of 12: the searches,
    python benchmarks/quality.py run --tasks sst2-16shot-mpnet --what oracle   # then a sampled oracle holding their picks
    python benchmarks/quality.py report --tasks sst2-16shot-mpnet --report quality-mpnet.md
    python benchmarks/quality.py run --what curves --variants honest   # dev curves for successive halving, where
                                                                       # the oracle was stored without them

Every training is appended to ``results/quality/results.jsonl`` as it finishes, so runs resume
and a later session reuses what is there. A row's key is the task, seed and what was trained,
and a hash of all that decides the result: the job's whole resolved config, less what cannot
change a result, and ``RESULTS_VERSION``, the version of the code that computes it (see
``job_identity``); the row holds that ``identity``. A changed default, or a new option, gives
new keys: a result is never reused for a config it was not computed with. (Rows of the old keys,
a hash of the settings that differed from the defaults of their day: ``benchmarks/migrate_store.py``.)
Uses a GPU when there is one.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import json
import math
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from search.config import RunConfig, dump_config, load_config  # noqa: E402
from search.metrics import compute_metrics  # noqa: E402
from search.pipeline import Prepared, prepare, run_search, select_from_run  # noqa: E402
from search.rankers import RANKERS  # noqa: E402
from search.runs import RunDir  # noqa: E402
from search.selection import generator_parameters  # noqa: E402
from search.strategies import STRATEGIES, Context, fixed_proposal, strategy_results, train_proposal  # noqa: E402
from spt.files import write_text_atomic  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "quality"
SEEDS = [13, 21, 42]
FIVE_SEEDS = (13, 21, 42, 87, 100)  # (the LM-BFF split seeds)
K = 3
FEW_SHOT = ["search.epochs=20", "retrain.epochs=20", "search.batch_size=8", "retrain.batch_size=8", "task.max_test=500"]
LARGER = ["search.epochs=5", "retrain.epochs=5", "search.batch_size=8", "retrain.batch_size=8", "task.max_test=500"]


@dataclass(frozen=True)
class Task:
    """A benchmark task: a config, overrides, and overrides that depend on the seed."""

    config: str
    overrides: list[str]
    per_seed: str = ""  # a format string over {seed} adding overrides, e.g. the LM-BFF split paths
    note: str = ""
    variants: tuple[str, ...] = ("default", "normalized prompts", "honest", "budget", "absent slots", "additive")  # search variants run here
    seeds: tuple[int, ...] = tuple(SEEDS)  # the tasks where layer choice matters get five: their ranking decides the defaults
    layers: int = 6  # the backbone's layers
    # 0: the oracle trains every K-subset; n: a seeded uniform sample of n of them, the first and last K
    # layers, and the subsets the task's searches pick by gates (too many subsets to train all)
    sample: int = 0
    hidden: int = 384  # the backbone's width (MiniLM-L6's by default): what one generator's parameter count depends on
    even: bool = False  # a sampled oracle also trains K layers spread evenly over depth (first, middle, last)

    def seed_overrides(self, seed: int) -> list[str]:
        return [o.format(seed=seed) for o in self.per_seed.split()] if self.per_seed else []


def _lmbff(folder: str) -> str:
    return f"task.train={folder}/16-{{seed}}/train.tsv task.dev={folder}/16-{{seed}}/dev.tsv"


TASKS: dict[str, Task] = {
    "sst2-16shot": Task("configs/minilm/sst2-16shot.yaml", FEW_SHOT, _lmbff("SST-2/lmbff_k-shot"),
                        "LM-BFF 16-shot splits (seeds 13, 21, 42); test: 500 of the 872 GLUE dev sentences",
                        ("default", "warmup", "clean gate steps", "normalized prompts", "honest", "budget", "absent slots", "additive")),
    "agnews-8shot": Task("configs/minilm/agnews.yaml", [*FEW_SHOT, "task.shots_per_label=8", "model.max_length=64"], "",
                         "8 per label (4 labels) drawn by the seed from the 1000-article pool, dev another 8 per label; "
                         "test: 500 of 1000", seeds=FIVE_SEEDS),
    "mrpc-16shot": Task("configs/minilm/mrpc-16shot.yaml", FEW_SHOT, _lmbff("MRPC/lmbff_k-shot"),
                        "LM-BFF 16-shot splits; F1 of the paraphrase class; test: the 408 GLUE dev pairs"),
    "qnli-16shot": Task("configs/minilm/qnli-16shot.yaml", FEW_SHOT, _lmbff("QNLI/lmbff_k-shot"),
                        "LM-BFF 16-shot splits; test: 500 of the 5463 GLUE dev pairs"),
    "rte-16shot": Task("configs/minilm/rte-16shot.yaml", FEW_SHOT, _lmbff("RTE/lmbff_k-shot"),
                       "LM-BFF 16-shot splits; test: the 277 GLUE dev pairs"),
    "cb-8shot": Task("configs/minilm/cb.yaml", [*FEW_SHOT, "task.train=CB/superglue_full/train.jsonl", "task.dev=null",
                                                "task.shots_per_label=8"], "",
                     "8 per label drawn by the seed from the 250 SuperGLUE training pairs (only 16 are neutral, so 16 per "
                     "label cannot give a dev set too), dev another 8 per label; test: the 56 validation pairs; macro-F1",
                     seeds=FIVE_SEEDS),
    "sst2-2k": Task("configs/minilm/sst2.yaml", ["task.max_train=2000", "task.max_dev=200", "task.max_test=500", "model.max_length=64",
                                                 "search.epochs=2", "retrain.epochs=2", "retrain.eval_every=50"], "",
                    "2000 training sentences drawn by the seed from 6920; dev 200 of 872, test 500 of 1821",
                    ("default", "honest")),  # a training costs ~8x a 16-shot one: the previous and the current defaults only
    "agnews-16shot": Task("configs/minilm/agnews.yaml", [*FEW_SHOT, "task.shots_per_label=16", "model.max_length=64"], "",
                          "16 per label drawn by the seed from the 1000-article pool, dev another 16 per label; test: 500 of "
                          "1000 (the issue's 16-shot size; the same pool as agnews-8shot, other draws)",
                          ("default", "honest", "budget", "absent slots", "additive")),
    # Larger sizes per label (issue 26): four times the 16-shot data at a quarter of the epochs (the
    # same 160 optimizer steps at batch 8 for a binary task), where one seed's draw weighs less
    "qnli-64shot": Task("configs/minilm/qnli.yaml", [*LARGER, "task.dev=null", "task.shots_per_label=64"], "",
                        "64 per label drawn by the seed from the 8999 glue_pretrain training pairs, dev another 64 per "
                        "label; test: 500 of the 5463 GLUE dev pairs", ("default", "honest")),
    "agnews-64shot": Task("configs/minilm/agnews.yaml", [*LARGER, "task.shots_per_label=64", "model.max_length=64"], "",
                          "64 per label drawn by the seed from the 1000-article pool, dev another 64 per label; test: 500 "
                          "of 1000", ("default", "honest")),
    # FewGLUE's SuperGLUE tasks: one fixed 32 / 32 split each, so a seed varies the initialisation only.
    # Probed (a part of the oracle at seed 13) for whether a MiniLM-L6 learns them above the majority class
    "boolq-32shot": Task("configs/minilm/boolq.yaml", FEW_SHOT, "", "FewGLUE 32 train / 32 dev (one split; the seed "
                         "initialises); test: 500 of the 3270 SuperGLUE validation questions"),
    "wic-32shot": Task("configs/minilm/wic.yaml", FEW_SHOT, "", "FewGLUE 32 train / 32 dev (one split; the seed "
                       "initialises); test: 500 of the 638 SuperGLUE validation pairs"),
    "copa-32shot": Task("configs/minilm/copa.yaml", FEW_SHOT, "", "FewGLUE 32 train / 32 dev (one split; the seed "
                        "initialises), posed as which choice (0 or 1) is the cause / effect; test: the 100 SuperGLUE validation items"),
    # MPNet-base (12 layers): is layer choice a matter of seed noise on a deeper backbone too?
    "sst2-16shot-mpnet": Task("configs/mpnet/sst2-16shot.yaml", FEW_SHOT, _lmbff("SST-2/lmbff_k-shot"),
                              "MPNet-base, K=3 of 12; LM-BFF 16-shot splits (seeds 13, 21, 42); test: 500 of the 872 GLUE "
                              "dev sentences", ("honest",), layers=12, sample=8),
    # The SPT paper's own setting: a frozen LM head scoring label words after a template, on a deep model
    # (RoBERTa-large there; here SmolLM2-135M, 30 layers, head.type clm). Its oracle is a sample.
    "sst2-16shot-smollm2-clm": Task("configs/smollm2/sst2-16shot.yaml", [*FEW_SHOT, "head.type=clm"], _lmbff("SST-2/lmbff_k-shot"),
                                    "SmolLM2-135M, frozen causal-LM head on 'terrible' / 'great', K=3 of 30; LM-BFF 16-shot "
                                    "splits; test: 500 of the 872 GLUE dev sentences", ("budget", "honest"), layers=30,
                                    sample=12, hidden=576, even=True),
    # The same backbone with a trained classifier head (the other tasks' head): separates depth from head
    "sst2-16shot-smollm2": Task("configs/smollm2/sst2-16shot.yaml", FEW_SHOT, _lmbff("SST-2/lmbff_k-shot"),
                                "SmolLM2-135M, trained classifier head on the last token, K=3 of 30; LM-BFF 16-shot splits; "
                                "test: 500 of the 872 GLUE dev sentences", ("budget",), layers=30, sample=12, hidden=576, even=True),
    "agnews-8shot-smollm2-clm": Task("configs/smollm2/agnews.yaml", [*FEW_SHOT, "task.shots_per_label=8"], "",
                                     "SmolLM2-135M, frozen causal-LM head on four topic words, K=3 of 30; 8 per label drawn "
                                     "by the seed, dev another 8 per label; test: 500 of 1000", ("budget", "honest"),
                                     layers=30, sample=12, hidden=576, even=True),
}
MINILM_TASKS = [name for name, spec in TASKS.items() if spec.layers == 6]
DEEP_TASKS = [name for name, spec in TASKS.items() if spec.layers > 6]

# SPT search settings compared by the benchmark (name -> overrides; {warmup} is a quarter of
# the task's search epochs). Every search is ranked by every selection method.
# Each variant spells out every setting it depends on: "default" is the search as it was
# before the measured settings became the defaults; "honest" is the search as the defaults
# now make it (warm-up a quarter of the epochs, gate steps without dropout over two D2
# batches, normalized prompts, gates averaged over the last epoch).
PREVIOUS = ["prompt.normalize=false", "search.warmup_epochs=0", "search.arch_dropout=true", "search.arch_batches=1",
            "select.average_last=1"]
NEW = ["search.warmup_epochs={warmup}", "search.arch_dropout=false", "search.arch_batches=2", "prompt.normalize=true",
       "select.average_last=0"]
SEARCH_VARIANTS: dict[str, list[str]] = {
    "default": PREVIOUS,
    "warmup": [*PREVIOUS, "search.warmup_epochs={warmup}"],
    "clean gate steps": [*PREVIOUS, "search.arch_dropout=false", "search.arch_batches=2"],
    "normalized prompts": [*PREVIOUS, "prompt.normalize=true"],
    "honest": NEW,
    # the new defaults with the gates held at K generators' parameters during the search (S3Delta's
    # shifted sigmoid): against "honest", budget-aware search vs picking K after an unconstrained one
    "budget": [*NEW, "search.budget_params={budget3}"],
    # the new defaults with a closed gate's slots absent from attention, not zeros that are attended
    "absent slots": [*NEW, "prompt.presence_bias=true"],
    # the new defaults with lambda = 0: a gate adds its layer's prompt to the propagated one instead
    # of replacing it, so an open late gate no longer discards what the earlier layers inserted
    "additive": [*NEW, "prompt.discard=0"],
}
# at K=3 of 6 the budget holds the mean gate at 0.5, where the gates start; at K=1 and 2 it
# pulls them down (benchmarks/pareto.py scores these against the exhaustive store)
for _k in (1, 2):
    SEARCH_VARIANTS[f"budget k={_k}"] = [*SEARCH_VARIANTS["budget"][:-1], f"search.budget_params={{budget{_k}}}"]
VARIANT_LABELS = {"default": "previous defaults", "honest": "new defaults", "budget": "new defaults, budget-aware gates",
                  "absent slots": "new defaults, closed gates absent", "additive": "new defaults, additive prompts (lambda 0)"}
METHODS = list(RANKERS)  # every selection method the registry holds
BACKBONES = {"minilm": "MiniLM-L6", "mpnet": "MPNet-base", "smollm2": "SmolLM2-135M"}  # config folder -> backbone
TRANSFERRED = "spt: new defaults, gates"  # the strategy whose masks the transfer matrix moves between tasks
BASELINES = ["first", "middle", "all", "peft-lora", "peft-prefix", "adapter", "head-only"]
LAST = "last 3 layers"
LAYER_SETS = {"first": [0], "middle": [3], "all": [0, 1, 2, 3, 4, 5]}
QUICK = ["task.max_train=16", "task.max_dev=16", "task.max_test=32", "search.epochs=2", "retrain.epochs=2"]


# ---------------------------------------------------------------------- the results store

# The version of the code behind a stored result. A key hashes it with the job's whole resolved
# config (``job_identity``), so a changed setting or a changed default gets new keys by itself;
# what no config shows is a change to the code that computes a result. Bump this when the same
# config would now give other numbers: the models' forward or backward pass, initialisation,
# the optimizers and schedules, the order of batches or of random draws, reading, sampling or
# tokenizing the data, evaluation, metrics, selection (a search's rankings). Leave it for changes
# that keep seeded runs bit-identical (say so in the commit). Every stored result then has to be
# recomputed: rows of another version are never found, and stay in the file.
# 1: the code as of issue 27 (every row computed under the old keys; benchmarks/migrate_store.py).
RESULTS_VERSION = 1
# What a key leaves out of a job's resolved config, because it cannot change the result:
UNUSED_SECTIONS = {  # whole sections the job never reads (hpo: the study around runs)
    "search": ("retrain", "compare", "hpo"),
    "training": ("search", "select", "compare", "hpo"),  # a layer subset, or a baseline of fixed layers
    "baseline": ("search", "select", "hpo"),  # PEFT methods, adapters, head-only: compare's lr, sizes, kind
}
NOT_RESULTS = {
    # where and how a job runs: threads and devices change float rounding (a GPU also draws other
    # dropout masks from the same seed), not the experiment, so workers on any machine fill one store
    # (each new row records its device); progress bars and TensorBoard files only report; kept frozen
    # states are the layers' outputs computed once instead of every step (equal to rounding,
    # tests/test_frozen.py); activation checkpointing recomputes the same layers with the same random
    # draws (tests/test_checkpointing.py). precision and compile stay: they change the arithmetic
    # (and compiled code its random draws). Sharding the frozen backbone across ranks (shard) computes
    # each layer with its whole weights gathered, as one process does (tests/test_sharding.py).
    "runtime": ("device", "threads", "progress", "tensorboard", "frozen_cache_mb", "activation_checkpointing", "shard"),
    "compare": ("strategies", "seeds"),  # which jobs `spt compare` runs, not what one computes
    "task": ("data_dir",),  # the split files are named relative to it (``_portable_task``)
}
# The sparse model (a trained subset, a baseline) has no gates and never rescales its prompts:
# the prompt fields that only the supernet reads leave a training's key.
SUPERNET_ONLY = ("reparam_gates", "gate_init", "candidate_layers", "gate_budget", "normalize", "presence_bias")


def identity_digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _relative(path: str, base: str | None) -> str:
    return Path(path).relative_to(base).as_posix() if base and Path(path).is_relative_to(base) else path


def _portable_task(task: dict[str, Any]) -> dict[str, Any]:
    """The task section with its split files named relative to ``data_dir``: the same files in another
    folder, on another machine, are the same data (a file outside it keeps its path)."""
    out = dict(task)
    for split in ("train", "dev", "test"):
        spec = out[split]
        if isinstance(spec, dict) and isinstance(spec.get("path"), str):
            out[split] = {**spec, "path": _relative(spec["path"], task["data_dir"])}
        elif isinstance(spec, str):
            out[split] = _relative(spec, task["data_dir"])
    return out


def job_use(job: Job) -> str:
    """Which code computes a job's result: ``search``, ``training`` (a sparse model of fixed layers)
    or ``baseline`` (another method, which reads the compare section)."""
    if job.kind == "search":
        return "search"
    return "training" if job.kind == "subset" or job.name in LAYER_SETS else "baseline"


def result_fields(use: str, data: dict[str, Any]) -> dict[str, Any]:
    """A config dict less what cannot change the result of a ``use`` job (``UNUSED_SECTIONS``,
    ``NOT_RESULTS``, and for a training ``SUPERNET_ONLY``); anything else it holds stays."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name in UNUSED_SECTIONS[use]:
            continue
        if isinstance(value, dict):
            drop = NOT_RESULTS.get(name, ()) + (SUPERNET_ONLY if name == "prompt" and use != "search" else ())
            value = {field_name: v for field_name, v in value.items() if field_name not in drop}
        out[name] = value
    return out


def job_identity(job: Job, config: RunConfig) -> dict[str, Any]:
    """What decides a job's result: ``RESULTS_VERSION`` and the job's resolved config (``config.to_dict()``,
    every default filled in, split files named portably), less what cannot change it (``result_fields``).
    Whatever a config gains (a new field, a new section) is part of it unless listed there."""
    data = config.to_dict()
    data["task"] = _portable_task(data["task"])
    return {"version": RESULTS_VERSION, "config": result_fields(job_use(job), data)}


def identity_key(job: Job, identity: dict[str, Any]) -> str:
    """``task|seed|kind|name|v<version>-<hash of the identity>``."""
    return f"{job.task}|{job.seed}|{job.kind}|{job.name}|v{identity['version']}-{identity_digest(identity)}"


def is_legacy_key(key: str) -> bool:
    """A key of the old scheme (a hash of the settings that differed from the defaults of its day)."""
    return not key.rsplit("|", 1)[-1].startswith("v")


class Store:
    """``results.jsonl``: one JSON line per finished training or search, appended under a lock;
    each row holds its ``key`` and the ``identity`` it hashes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row
        legacy = [key for key in self.rows if is_legacy_key(key)]
        if legacy:
            raise SystemExit(f"{path}: {len(legacy)} results keyed by the old scheme (e.g. {legacy[0]}); "
                             f"re-key them first: python benchmarks/migrate_store.py {path}"
                             + (" --quick" if "quick" in path.name else ""))

    def get(self, key: str) -> dict[str, Any] | None:
        if key not in self.rows:
            self.__init__(self.path)  # another worker may have added it
        return self.rows.get(key)

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(json.dumps(row) + "\n")
            fcntl.flock(handle, fcntl.LOCK_UN)
        self.rows[row["key"]] = row
        return row

    def replace(self, row: dict[str, Any]) -> dict[str, Any]:
        """Rewrite the stored row with ``row``'s key in place (under the lock the appenders take, so a
        worker appending meanwhile waits and then appends after it): one line per key."""
        with open(self.path, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            lines = [json.dumps(row) if line.strip() and json.loads(line)["key"] == row["key"] else line
                     for line in handle.read().splitlines()]
            handle.seek(0)
            handle.truncate()
            handle.write("".join(line + "\n" for line in lines))
            fcntl.flock(handle, fcntl.LOCK_UN)
        self.rows[row["key"]] = row
        return row


# ---------------------------------------------------------------------- jobs


@dataclass
class Job:
    task: str
    seed: int
    kind: str  # subset | baseline | search | curve (a subset retrained for its dev curve)
    name: str  # "0-2-4", "peft-lora", a variant name

    def identity(self, config: RunConfig) -> dict[str, Any]:
        return job_identity(self, config)

    def key(self, config: RunConfig) -> str:
        """The job's key in the store, for ``config`` (``job_config``'s, or a variation of it)."""
        return identity_key(self.stored(), self.stored().identity(config))

    def stored(self) -> Job:
        """The job whose row this one writes: a curve job rewrites its subset's row."""
        return Job(self.task, self.seed, "subset", self.name) if self.kind == "curve" else self


def task_config(task: str, seed: int, extra: list[str], quick: bool = False) -> RunConfig:
    spec = TASKS[task]
    overrides = [*spec.overrides, *spec.seed_overrides(seed), *(QUICK if quick else []), *extra,
                 f"seed={seed}", f"select.k={K}", "select.budget=null", "runtime.progress=false",
                 "search.checkpoint_every=100000"]
    return load_config(REPO / spec.config, overrides)


def _name(layers: Any) -> str:
    return "-".join(map(str, layers))


def last_subset(layers: int) -> str:
    """The last K of a backbone's ``layers``."""
    return _name(range(layers - K, layers))


def uniform_subsets(task: str) -> list[str]:
    """The K-subsets drawn uniformly: every one, or the task's seeded sample."""
    every = [_name(s) for s in itertools.combinations(range(TASKS[task].layers), K)]
    return random.Random(0).sample(every, TASKS[task].sample) if TASKS[task].sample else every


def oracle_subsets(task: str, store: Store | None) -> list[str]:
    """What the oracle trains: the uniform subsets, and for a sampled task the first and last K
    layers, K spread evenly over depth where the task asks, and the gate picks of the task's searches in ``store`` (run the
    searches first)."""
    chosen = uniform_subsets(task)
    if not TASKS[task].sample:
        return chosen
    layers = TASKS[task].layers
    extra = [_name(range(K)), last_subset(layers)]
    if TASKS[task].even:
        extra.append(_name(round(i * (layers - 1) / (K - 1)) for i in range(K)))
    for row in (store.rows.values() if store else []):
        if row["task"] == task and row["kind"] == "search":
            extra.append(_name(row["rankings"]["gates"]["layers"]))
    return chosen + [x for x in dict.fromkeys(extra) if x not in chosen]


def jobs_for(task: str, seed: int, what: list[str], variants: list[str] | None = None, store: Store | None = None) -> list[Job]:
    jobs = []
    variants = list(TASKS[task].variants) if variants is None else variants
    if "oracle" in what:
        jobs += [Job(task, seed, "subset", name) for name in oracle_subsets(task, store)]
    if "exhaustive" in what:  # every other non-empty subset (benchmarks/pareto.py)
        jobs += [Job(task, seed, "subset", _name(s)) for k in range(1, 7) if k != K
                 for s in itertools.combinations(range(6), k)]
    if "spt" in what:
        jobs += [Job(task, seed, "search", name) for name in variants]
    if "baselines" in what and TASKS[task].layers == 6:  # (their layer sets are MiniLM's)
        jobs += [Job(task, seed, "baseline", name) for name in BASELINES]
    if "curves" in what and store is not None:
        jobs += curve_jobs(task, seed, variants, store)
    return jobs


def search_top(scores: list[float], subsets: list[str], m: int) -> list[str]:
    """The ``m`` best of ``subsets`` by a search's per-layer ``scores`` (ties: the subsets' order by name)."""
    return sorted(subsets, key=lambda s: (-subset_score(scores, s), s))[:m]


def curve_jobs(task: str, seed: int, variants: list[str], store: Store) -> list[Job]:
    """The oracle trainings successive halving replays that were stored before dev curves were kept:
    the gates' best ``HALVING[0]`` subsets of each stored search of ``variants``, retrained with the
    same config and seed to record the curve (``run_job`` adds it, and the rerun's scores, to the row)."""
    config, wanted = task_config(task, seed, []), oracle_subsets(task, store)
    names: dict[str, None] = {}
    for job, row in stored_searches(store, task, seed, False):
        if job.name in variants:
            names.update(dict.fromkeys(search_top(row["rankings"]["gates"]["scores"], wanted, HALVING[0])))
    jobs = [Job(task, seed, "curve", name) for name in names]
    return [job for job in jobs if not (store.get(job.key(config)) or {"dev_curve": 1}).get("dev_curve")]


def variant_overrides(task: str, seed: int, variant: str, quick: bool) -> list[str]:
    config = task_config(task, seed, [], quick)
    per_generator = generator_parameters(TASKS[task].hidden, config.prompt.bottleneck, config.prompt.phm_n)
    budgets = {f"budget{k}": k * per_generator for k in (1, 2, 3)}
    return [o.format(warmup=max(1, config.search.epochs // 4), **budgets) for o in SEARCH_VARIANTS[variant]]


def job_config(job: Job, quick: bool = False, extra: tuple[str, ...] = ()) -> RunConfig:
    """The resolved config a job runs with (a search's: its variant's overrides on the task's; then ``extra``)."""
    overrides = variant_overrides(job.task, job.seed, job.name, quick) if job.kind == "search" else []
    return task_config(job.task, job.seed, [*overrides, *extra], quick)


def run_job(job: Job, store: Store, quick: bool, work: Path) -> None:
    config = job_config(job, quick)
    identity = job.stored().identity(config)
    key = identity_key(job.stored(), identity)
    stored = store.get(key)
    if stored is not None and (job.kind != "curve" or stored.get("dev_curve")):
        return
    prep = prepare(config)
    started = time.time()
    ctx = Context(k=K, workdir=work / job.task / job.name)
    base = {"key": key, "task": job.task, "seed": job.seed, "kind": job.stored().kind, "name": job.name, "recipe": identity_digest(identity),
            "metric": config.task.metric, "device": str(prep.device)}
    if job.kind == "search":
        row = {**base, **search_entry(prep, job, ctx)}
    else:
        row = {**base, **train_entry(prep, job, ctx)}
    row["wall_seconds"] = round(time.time() - started, 1)
    row["identity"] = identity
    if job.kind == "curve" and stored:  # (the stored row with the rerun's curve and scores added: the row's scores stay
        # those first measured; a rerun on another thread count differs in the last float bits, which a few
        # dozen steps can turn into another dev-best epoch, so the rerun's own scores are kept beside its curve)
        store.replace({**stored, "dev_curve": row["dev_curve"], "curve_rerun": {"dev": row["dev"], "test": row["test"]}})
    else:
        store.add(row)
    if job.kind == "search":
        outcome = "picks " + ", ".join(f"{method} {r['layers']}" for method, r in row["rankings"].items())
    else:
        outcome = f"dev {row['dev']:.3f} test {row['test']:.3f}"
    print(f"{job.task} seed {job.seed} {job.kind} {job.name}: {outcome}"
          + f" ({row['wall_seconds']:.0f}s)", flush=True)


def train_entry(prep: Prepared, job: Job, ctx: Context) -> dict[str, Any]:
    curve: list[list[float]] = []  # (step, dev score) at each dev evaluation: what a shorter training would have seen
    if job.kind in ("subset", "curve") or job.name in LAYER_SETS:
        layers = [int(x) for x in job.name.split("-")] if job.kind != "baseline" else LAYER_SETS[job.name]
        row = train_proposal(prep, job.name, fixed_proposal(prep, layers), ctx, on_eval=lambda step, score: curve.append([step, round(score, 6)]))
    else:
        (row,) = strategy_results(STRATEGIES[job.name], prep, ctx)
    entry = {"layers": row.layers, "dev": row.dev, "test": row.test, "trainable_params": row.trainable_params,
             "steps": row.train_steps, "seconds": row.train_seconds, "note": row.note}
    return {**entry, "dev_curve": curve} if curve else entry


def search_entry(prep: Prepared, job: Job, ctx: Context) -> dict[str, Any]:
    run = RunDir(ctx.workdir / f"seed{job.seed}")
    run.path.mkdir(parents=True, exist_ok=True)
    record_config(run, prep.config)
    result = run_search(prep, run, progress=False)
    rankings = {}
    for method in METHODS:
        started = time.time()
        mask = select_from_run(run, prep, k=K, method=method)
        rankings[method] = {"layers": mask.selected_layers, "scores": mask.scores, "spread": mask.spread,
                            "uncertain": mask.uncertain, "seconds": round(time.time() - started, 2)}
    s = prep.config.search
    arch_steps = result.steps - s.warmup * -(-len(prep.train) // s.batch_size)
    return {"rankings": rankings, "steps": result.steps + max(0, arch_steps), "seconds": result.seconds}


def record_config(run: RunDir, config: RunConfig) -> None:
    """``config.yaml`` in a search's folder, so that ``spt plot`` and ``spt select`` can read it."""
    write_text_atomic(run.path / "config.yaml", dump_config(config))


def backfill_configs(work: Path) -> None:
    """``config.yaml`` for search folders written before searches recorded it."""
    for seed_dir in work.glob("*/*/seed*"):
        task, variant = seed_dir.parent.parent.name, seed_dir.parent.name
        if task in TASKS and variant in SEARCH_VARIANTS and (seed_dir / "status.json").is_file() and not (seed_dir / "config.yaml").is_file():
            seed = int(seed_dir.name[len("seed"):])
            record_config(RunDir(seed_dir), task_config(task, seed, variant_overrides(task, seed, variant, False)))


def majority_score(config: RunConfig) -> float:
    prep = prepare(config)
    labels = prep.test.labels
    top = max(set(labels), key=labels.count)
    positive = config.task.labels.index(config.task.positive_label) if config.task.positive_label is not None else None
    return compute_metrics(labels, [top] * len(labels), config.task.metric, positive)[config.task.metric]


# ---------------------------------------------------------------------- the report


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _ranks(scores: list[float]) -> list[float]:
    """1 for the lowest score ... n for the highest (ties share the mean)."""
    return [sum(y < x for y in scores) + (sum(y == x for y in scores) + 1) / 2 for x in scores]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho over the pairs where both are numbers (a sampled oracle may hold no subset with a layer)."""
    pairs = [(x, y) for x, y in zip(a, b) if x == x and y == y]
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = _mean(ra), _mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


@dataclass
class TaskReport:
    task: str
    metric: str
    seeds: list[int]
    majority: float
    oracle: dict[str, dict[int, float]]  # subset -> seed -> test
    oracle_cost: dict[int, tuple[int, float]]  # seed -> (steps, seconds)
    oracle_dev: dict[str, dict[int, float]] = field(default_factory=dict)  # subset -> seed -> dev score
    oracle_curve: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # subset -> seed -> dev score per evaluation
    strategies: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> seed -> test
    picks: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # variant -> seed -> search entry
    layers: int = 6
    uniform: list[str] = field(default_factory=list)  # the oracle's subsets drawn uniformly (random's expectation)

    def subset_means(self) -> dict[str, float]:
        return {s: _mean([v[seed] for seed in self.seeds]) for s, v in self.oracle.items()}

    def ranking(self) -> list[str]:
        means = self.subset_means()
        return sorted(means, key=lambda s: (-means[s], s))

    def noise(self) -> float:
        """Mean over subsets of the seed-to-seed standard deviation of the test score."""
        return _mean([_std([v[seed] for seed in self.seeds]) for v in self.oracle.values()])

    def insensitive(self) -> bool:
        means = sorted(self.subset_means().values(), reverse=True)
        return (means[0] - statistics.median(means)) < 2 * self.noise() / len(self.seeds) ** 0.5

    def marginal(self) -> list[float]:
        means = self.subset_means()
        return [_mean([m for s, m in means.items() if str(layer) in s.split("-")]) for layer in range(self.layers)]

    def sampled(self) -> str:
        """What a sampled oracle holds, in words ("" when it holds every subset)."""
        if len(self.uniform) == len(self.oracle):
            return ""
        return (f"; a seeded sample of {len(self.uniform)} of the {math.comb(self.layers, K)} subsets, the first and last "
                f"{K} layers and the searches' gate picks: ranks are among these")


def stored_searches(store: Store, task: str, seed: int, quick: bool) -> list[tuple[Job, dict[str, Any]]]:
    """The task's searches at ``seed`` that the store holds, with their rows."""
    found = ((job, store.get(job.key(job_config(job, quick)))) for job in jobs_for(task, seed, ["spt"]))
    return [(job, row) for job, row in found if row is not None]


def task_seeds(task: str, seeds: list[int] | None) -> list[int]:
    """The task's seeds, or those of ``seeds`` (the command line's) when given."""
    return list(TASKS[task].seeds) if seeds is None else seeds


def load_reports(store: Store, tasks: list[str], requested: list[int] | None, quick: bool) -> list[TaskReport]:
    reports = []
    for task in tasks:
        seeds = task_seeds(task, requested)
        configs = {seed: task_config(task, seed, [], quick) for seed in seeds}
        oracle: dict[str, dict[int, float]] = {}
        oracle_dev: dict[str, dict[int, float]] = {}
        oracle_curve: dict[str, dict[int, list[float]]] = {}
        cost: dict[int, tuple[int, float]] = {}
        wanted = oracle_subsets(task, store)
        for seed in seeds:
            for name in wanted:
                row = store.get(Job(task, seed, "subset", name).key(configs[seed]))
                if row is not None:
                    oracle.setdefault(name, {})[seed] = row["test"]
                    oracle_dev.setdefault(name, {})[seed] = row["dev"]
                    if row.get("dev_curve"):
                        oracle_curve.setdefault(name, {})[seed] = [score for _, score in row["dev_curve"]]
                    steps, seconds = cost.get(seed, (0, 0.0))
                    cost[seed] = (steps + row["steps"], seconds + row["seconds"])
        complete = {s: v for s, v in oracle.items() if len(v) == len(seeds)}
        if len(complete) < len(wanted):
            print(f"{task}: oracle incomplete ({len(complete)}/{len(wanted)} subsets on all seeds); skipped in the report")
            continue
        every = math.comb(TASKS[task].layers, K)  # a sampled oracle's cost, scaled to training every subset
        cost = {seed: (round(steps * every / len(wanted)), seconds * every / len(wanted)) for seed, (steps, seconds) in cost.items()}
        report = TaskReport(task, configs[seeds[0]].task.metric, seeds, majority_score(configs[seeds[0]]), complete, cost,
                            oracle_dev, oracle_curve, layers=TASKS[task].layers, uniform=uniform_subsets(task))
        for seed in seeds:
            report.strategies.setdefault("random (expectation)", {})[seed] = _mean([complete[s][seed] for s in report.uniform])
            # the top K layers, a fixed rule a search has to beat (an oracle subset: no training of its own)
            report.strategies.setdefault(LAST, {})[seed] = complete[last_subset(TASKS[task].layers)][seed]
            for job in jobs_for(task, seed, ["baselines"]):
                row = store.get(job.key(configs[seed]))
                if row is not None:
                    report.strategies.setdefault(job.name, {})[seed] = row["test"]
            for job, row in stored_searches(store, task, seed, quick):
                for method, ranking in row["rankings"].items():
                    if _name(ranking["layers"]) not in complete:  # (a sampled oracle trains the gate picks only)
                        continue
                    name = f"spt: {VARIANT_LABELS.get(job.name, job.name)}, {method}"
                    entry = {**ranking, "steps": row["steps"], "seconds": row["seconds"] + ranking["seconds"]}
                    report.picks.setdefault(name, {})[seed] = entry
                    report.strategies.setdefault(name, {})[seed] = complete[_name(ranking["layers"])][seed]
        for name in [n for n, by_seed in report.picks.items() if len(by_seed) < len(seeds)]:  # (a sampled oracle's
            del report.picks[name], report.strategies[name]  # untrained picks: a strategy there on some seeds only)
        if not TASKS[task].sample:
            add_derived_selectors(report)
        reports.append(report)
    return reports


# ---------------------------------------------------------------------- selectors built on stored searches

# Noise-resistant selectors (issue 26) made from what the store already holds, without training
# anything new: a search's layer scores, and the oracle's rows, which are the very trainings a user
# would run to check a few subsets on dev (same config, same seed). Each is judged like a search's
# own pick, and its compute counts the searches and extra trainings it needs.
ENSEMBLE = ("default", "honest")  # the searches an ensemble rank-averages: two search recipes, one seed
DEV_CHECKED = (2, 3)  # how many of the search's best subsets a dev-checked pick retrains
HALVING = (6, 3)  # successive halving: the search's best m subsets, reduction factor (a third promoted per rung)
DEV_BEST = "dev-best of every subset (the oracle's compute; not a recipe)"  # how far a dev check can go


def subset_score(scores: list[float], subset: str) -> float:
    """A K-subset's score under per-layer scores: their sum (top-K by layer score maximizes it)."""
    return sum(scores[int(layer)] for layer in subset.split("-"))


def _z(values: list[float]) -> list[float]:
    mean, sd = _mean(values), statistics.pstdev(values)
    return [(v - mean) / sd if sd else 0.0 for v in values]


def _top_k(scores: list[float]) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:K])


def _train_cost(r: TaskReport, seed: int) -> tuple[float, float]:
    """One oracle training's mean steps and seconds at ``seed``."""
    steps, seconds = r.oracle_cost[seed]
    return steps / len(r.oracle), seconds / len(r.oracle)


def dev_checked(r: TaskReport, entry: dict[str, Any], seed: int, m: int) -> dict[str, Any]:
    """Retrain the ``m`` best subsets by the search's scores and keep the one best on dev (ties: the
    search's order); uncertain when the kept subset's dev score does not beat the runner-up's."""
    top = search_top(entry["scores"], list(r.oracle), m)
    kept = max(top, key=lambda s: (r.oracle_dev[s][seed], -top.index(s)))
    dev_scores = sorted((r.oracle_dev[s][seed] for s in top), reverse=True)
    steps, seconds = _train_cost(r, seed)
    return {"layers": [int(x) for x in kept.split("-")], "scores": entry["scores"], "uncertain": dev_scores[0] <= dev_scores[1],
            "steps": entry["steps"] + (m - 1) * steps, "seconds": entry["seconds"] + (m - 1) * seconds}


def successive_halving(r: TaskReport, entry: dict[str, Any], seed: int, m: int = HALVING[0]) -> dict[str, Any]:
    """Train the ``m`` best subsets by the search's scores one after another under Optuna's successive
    halving pruner (a rung at 1, 3, 9... dev evaluations, the best third promoted) and keep the
    completed one best on dev. Replayed from the oracle's dev curves: with a constant learning rate
    the first e epochs of a training are an e-epoch training, so a pruned subset costs what it ran."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=HALVING[1]))
    top = search_top(entry["scores"], list(r.oracle), m)
    evaluations, finished = 0, {}
    for subset in top:
        trial, curve = study.ask(), r.oracle_curve[subset][seed]
        for step, score in enumerate(curve, start=1):
            trial.report(score, step)
            evaluations += 1
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, r.oracle_dev[subset][seed])  # (the dev-best weights' score, as a training keeps)
            finished[subset] = r.oracle_dev[subset][seed]
    kept = max(finished, key=lambda s: (finished[s], -top.index(s)))
    steps, seconds = _train_cost(r, seed)
    extra = evaluations / len(r.oracle_curve[kept][seed]) - 1  # (the kept subset's run is the retraining itself)
    return {"layers": [int(x) for x in kept.split("-")], "scores": entry["scores"], "uncertain": len(finished) > 1 and
            sorted(finished.values())[-1] <= sorted(finished.values())[-2], "steps": entry["steps"] + extra * steps,
            "seconds": entry["seconds"] + extra * seconds, "trained": round(extra + 1, 2)}


def prior_plus_evidence(gates: dict[str, Any], perturbation: dict[str, Any]) -> dict[str, Any]:
    """Gates as the prior, perturbation's dev evidence added in proportion to its reliability: the share
    of the layers' score variance that is not the dev passes' own noise (their spread)."""
    scores, spread = perturbation["scores"], perturbation["spread"]
    signal = statistics.pvariance(scores)
    reliability = signal / (signal + _mean([s * s for s in spread])) if signal else 0.0
    sd = statistics.pstdev(scores) or 1.0
    combined = [g + reliability * p for g, p in zip(_z(gates["scores"]), _z(scores))]
    order = sorted(range(len(combined)), key=lambda i: (-combined[i], i))
    margin = combined[order[K - 1]] - combined[order[K]]  # the K-th kept against the first dropped
    noise = reliability * max(spread[order[K - 1]], spread[order[K]]) / sd
    return {"layers": _top_k(combined), "scores": [round(c, 6) for c in combined], "uncertain": margin < noise,
            "steps": perturbation["steps"], "seconds": perturbation["seconds"]}


def ensemble(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank-average the layer scores of several searches; uncertain when their own picks differ."""
    ranks = [_ranks(e["scores"]) for e in entries]
    mean_rank = [_mean(list(layer)) for layer in zip(*ranks)]
    return {"layers": _top_k(mean_rank), "scores": mean_rank, "uncertain": len({_name(e["layers"]) for e in entries}) > 1,
            "steps": sum(e["steps"] for e in entries), "seconds": sum(e["seconds"] for e in entries)}


def add_derived_selectors(r: TaskReport) -> None:
    """Add the selectors above to ``r``'s picks and strategies, for every search variant they can use."""
    derived: dict[str, dict[int, dict[str, Any]]] = {}
    for variant in TASKS[r.task].variants:
        label = VARIANT_LABELS.get(variant, variant)
        gates, perturbation = (r.picks.get(f"spt: {label}, {m}") for m in ("gates", "perturbation"))
        if gates and perturbation:
            derived[f"spt: {label}, gates + perturbation evidence"] = {
                s: prior_plus_evidence(gates[s], perturbation[s]) for s in gates if s in perturbation}
        for m in DEV_CHECKED if gates else ():
            derived[f"spt: {label}, gates, dev-checked top {m}"] = {s: dev_checked(r, gates[s], s, m) for s in gates}
        if gates and all(seed in r.oracle_curve.get(x, {}) for seed in gates
                         for x in search_top(gates[seed]["scores"], list(r.oracle), HALVING[0])):
            derived[f"spt: {label}, gates, successive halving over top {HALVING[0]}"] = {
                s: successive_halving(r, gates[s], s) for s in gates}
    for method in METHODS:
        members = [r.picks.get(f"spt: {VARIANT_LABELS.get(v, v)}, {method}") for v in ENSEMBLE]
        if method != "greedy" and all(members):  # (greedy's scores come from different rounds)
            derived[f"spt: ensemble of two searches ({' + '.join(VARIANT_LABELS[v] for v in ENSEMBLE)}), {method}"] = {
                s: ensemble([m[s] for m in members]) for s in r.seeds if all(s in m for m in members)}
    every = {"layers": [], "scores": [0.0] * r.layers, "steps": 0, "seconds": 0.0}  # (no search: the oracle's trainings)
    derived[DEV_BEST] = {s: dev_checked(r, every, s, len(r.oracle)) for s in r.seeds}
    for name, by_seed in derived.items():
        if len(by_seed) == len(r.seeds):
            r.picks[name] = by_seed
            r.strategies[name] = {s: r.oracle[_name(e["layers"])][s] for s, e in by_seed.items()}


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def task_section(r: TaskReport) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The Markdown of one task and its numbers for the summary."""
    ranking, means = r.ranking(), r.subset_means()
    best, median = means[ranking[0]], statistics.median(means.values())
    lines = [f"## {r.task} ({r.metric}; {TASKS[r.task].note})", "",
             f"Majority class: {_fmt(r.majority)}. Oracle ({len(r.oracle)} subsets x {len(r.seeds)} seeds, ranked by the mean test score{r.sampled()}): "
             f"best [{ranking[0].replace('-', ', ')}] {_fmt(best)}, median {_fmt(median)}, worst {_fmt(means[ranking[-1]])}; "
             f"seed-to-seed std of one subset {_fmt(r.noise())} (mean over subsets). "
             + (f"**Layer-insensitive**: best minus median is within two standard errors of a {len(r.seeds)}-seed mean."
                if r.insensitive() else "Layer choice matters beyond seed noise.")
             + (" **Near chance**: the best subset does not clear the majority class by 2 points."
                if best - r.majority < 0.02 else ""), "",
             f"| strategy | test {r.metric} (mean ± std) | minus random | picks (per seed) | mean oracle rank | gap to oracle best | Spearman(scores, layer marginals) | search compute / oracle (steps, time) |",
             "|---|---|---|---|---|---|---|---|"]
    numbers: dict[str, dict[str, float]] = {}
    random_mean = _mean(list(r.strategies["random (expectation)"].values()))
    for name, by_seed in r.strategies.items():
        values = [by_seed[s] for s in r.seeds if s in by_seed]
        mean = _mean(values)
        entry = {"test": mean}
        picks = r.picks.get(name)
        cells = ["", "", "", "", ""]
        if picks:
            ranks = [ranking.index(_name(picks[s]["layers"])) + 1 for s in picks]
            gaps = [best - means[_name(picks[s]["layers"])] for s in picks]
            # (greedy scores come from different rounds: they do not rank the layers)
            rho = float("nan") if name.endswith("greedy") else _mean([spearman(picks[s]["scores"], r.marginal()) for s in picks])
            steps = _mean([picks[s]["steps"] / r.oracle_cost[s][0] for s in picks])
            secs = _mean([picks[s]["seconds"] / r.oracle_cost[s][1] for s in picks])
            entry.update(rank=_mean(ranks), gap=_mean(gaps), rho=rho, steps=steps, seconds=secs)
            flagged = sum(bool(picks[s].get("uncertain")) for s in picks)
            cells = ["; ".join(str(picks[s]["layers"]) for s in r.seeds if s in picks) + (f" ({flagged} flagged uncertain)" if flagged else ""),
                     f"{_mean(ranks):.1f}", _fmt(_mean(gaps)), "n/a" if rho != rho else f"{rho:+.2f}",
                     f"{100 * steps:.1f}%, {100 * secs:.1f}%"]
        if name == LAST:  # one subset on every seed: its place in the oracle
            last = last_subset(r.layers)
            entry.update(rank=ranking.index(last) + 1, gap=best - means[last])
            cells[1:3] = [str(entry["rank"]), _fmt(entry["gap"])]
        numbers[name] = entry
        lines.append(f"| {name} | {_fmt(mean)} ± {_fmt(_std(values))} ({len(values)} seeds) | {100 * (mean - random_mean):+.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Oracle subsets by mean test score (± std over seeds): " + ", ".join(
        f"[{s.replace('-', ', ')}] {_fmt(means[s])}±{_fmt(_std(list(r.oracle[s].values())))}" for s in ranking), "",
        "Layer marginals (mean over the subsets that hold the layer): "
        + ", ".join(f"{layer}: {_fmt(m) if m == m else 'none trained'}" for layer, m in enumerate(r.marginal())), ""]
    return lines, numbers


def _few_shot(reports: list[TaskReport]) -> list[TaskReport]:
    """The tasks with 8 or 16 examples per label (by the task's name: "cb-8shot", "sst2-16shot")."""
    return [r for r in reports if (m := re.search(r"(\d+)shot", r.task)) and int(m.group(1)) <= 16]


def summary_section(reports: list[TaskReport], numbers: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["## Mean over tasks", ""]
    sections = (("all tasks", reports), ("few-shot tasks (8 or 16 examples per label)", _few_shot(reports)),
                ("tasks where layer choice matters and the best subset clears the majority class",
                 [r for r in reports if not r.insensitive() and max(r.subset_means().values()) - r.majority >= 0.02]))
    for title, chosen in sections:
        names = [n for n in numbers[reports[0].task]] if reports else []
        lines += [f"### {title}: {', '.join(r.task for r in chosen) or 'none'}", "",
                  f"| strategy | mean test | minus random | minus all | mean oracle rank (of {'/'.join(sorted({str(len(r.oracle)) for r in reports}))}) | gap to oracle best | search compute / oracle (time) |",
                  "|---|---|---|---|---|---|---|"]
        if not chosen:
            lines.append("")
            continue
        for name in names:
            rows = [numbers[r.task].get(name, {}) for r in chosen]
            if any("test" not in row for row in rows):
                continue
            mean = _mean([row["test"] for row in rows])
            rnd = _mean([numbers[r.task]["random (expectation)"]["test"] for r in chosen])
            alls = [numbers[r.task].get("all", {}).get("test") for r in chosen]
            minus_all = f"{100 * (mean - _mean(alls)):+.1f}" if None not in alls else ""
            rank = f"{_mean([row['rank'] for row in rows]):.1f}" if all("rank" in row for row in rows) else ""
            gap = _fmt(_mean([row["gap"] for row in rows])) if all("gap" in row for row in rows) else ""
            secs = f"{100 * _mean([row['seconds'] for row in rows]):.1f}%" if all("seconds" in row for row in rows) else ""
            lines.append(f"| {name} | {_fmt(mean)} | {100 * (mean - rnd):+.1f} | {minus_all} | {rank} | {gap} | {secs} |")
        lines.append("")
    return lines


OTHER_SEEDS = "best subset of the other seeds (noise ceiling)"


def _seed_rank(r: TaskReport, subset: str, seed: int) -> float:
    """``subset``'s place among the oracle's subsets by the test scores of ``seed`` alone (ties share the mean place)."""
    score = r.oracle[subset][seed]
    above = sum(v[seed] > score for v in r.oracle.values())
    level = sum(v[seed] == score for v in r.oracle.values())
    return above + (level + 1) / 2


def _seed_picks(r: TaskReport) -> dict[str, dict[int, str]]:
    """Per strategy that picks a subset, its pick at each seed; with the pick a selector makes that
    knows the test scores of every subset on the task's other seeds (the best of their mean)."""
    picks = {LAST: {s: last_subset(r.layers) for s in r.seeds}}
    picks.update({name: {s: _name(e["layers"]) for s, e in by_seed.items()} for name, by_seed in r.picks.items()})
    picks[OTHER_SEEDS] = {s: max(r.oracle, key=lambda x, s=s: (_mean([v for t, v in r.oracle[x].items() if t != s]), x))
                          for s in r.seeds}
    return picks


def ceiling_section(reports: list[TaskReport]) -> list[str]:
    """How far seed noise lets a pick rank: each pick ranked by its own seed's test scores, against a
    selector that knows the test scores of every subset on the other seeds."""
    per_task = {r.task: {name: (_mean([_seed_rank(r, x, s) for s, x in by_seed.items()]),
                                _mean([max(v[s] for v in r.oracle.values()) - r.oracle[x][s] for s, x in by_seed.items()]))
                         for name, by_seed in _seed_picks(r).items()} for r in reports}
    few = _few_shot(reports)
    names = [n for n in per_task[reports[0].task] if all(n in per_task[r.task] for r in few)] if few else []
    lines = ["## What seed noise leaves to find", "",
             "Each pick ranked among the oracle's subsets by the test scores of the seed it was made on (1 = that seed's "
             "best, ties share the mean place; random: the middle place, " + ", ".join(sorted({f"{(len(r.oracle) + 1) / 2:g} of {len(r.oracle)}" for r in reports})) + "), and its gap to that seed's best. The noise ceiling picks, for each "
             "seed, the subset with the best mean test score over the task's *other* seeds: it knows every subset's test "
             "score everywhere but on this seed's split and training run. Where it ranks far from 1, the seeds disagree on "
             "the best subset, and a pick ranks well at one seed and badly at the next by chance.", "",
             "| strategy | " + " | ".join(r.task for r in reports) + " | mean rank, all | mean gap, all | mean rank, few-shot | mean gap, few-shot |",
             "|---|" + "---|" * (len(reports) + 4)]

    def means(chosen: list[TaskReport], name: str) -> list[str]:
        if not all(name in per_task[r.task] for r in chosen):
            return ["", ""]
        return [f"{_mean([per_task[r.task][name][0] for r in chosen]):.1f}", _fmt(_mean([per_task[r.task][name][1] for r in chosen]))]

    for name in sorted(names, key=lambda n: (n != OTHER_SEEDS, n != LAST, n)):
        cells = [f"{per_task[r.task][name][0]:.1f}" if name in per_task[r.task] else "-" for r in reports]
        lines.append(f"| {name} | " + " | ".join(cells + means(reports, name) + means(few, name)) + " |")
    return lines + [""]


# ---------------------------------------------------------------------- leave-one-task-out judgement

CURRENT = "spt: new defaults, gates"  # what `spt run` does with configs/defaults.yaml
PREVIOUS_RECIPE = "spt: previous defaults, gates"


def _recipes(reports: list[TaskReport]) -> list[str]:
    """What a user can set as a default: every search recipe with a K-subset pick on every task, and the
    fixed rule "last K layers"."""
    names = [n for n in reports[0].picks if all(n in r.picks for r in reports) and n != DEV_BEST]
    return [LAST, *names]


def _minus_random(r: TaskReport, name: str) -> float:
    return _mean(list(r.strategies[name].values())) - _mean(list(r.strategies["random (expectation)"].values()))


def _own_seed_rank(r: TaskReport, name: str) -> float:
    return _mean([_seed_rank(r, subset, seed) for seed, subset in _seed_picks(r)[name].items()])


def loto_choices(reports: list[TaskReport]) -> dict[str, str]:
    """For each task, the recipe with the best mean test score minus random on the *other* tasks."""
    recipes = _recipes(reports)
    return {r.task: max(recipes, key=lambda n, r=r: (_mean([_minus_random(o, n) for o in reports if o is not r]), n))
            for r in reports}


def _judged_row(label: str, per_task: dict[str, str], reports: list[TaskReport], numbers: dict[str, dict[str, dict[str, float]]]) -> str:
    """A table row: the mean over tasks of what ``per_task`` names on each."""
    gains = [_minus_random(r, per_task[r.task]) for r in reports]
    over_last = [g - _minus_random(r, LAST) for g, r in zip(gains, reports)]
    ranks = [_own_seed_rank(r, per_task[r.task]) for r in reports]
    below = [r.task for g, r in zip(gains, reports) if g < -r.noise()]  # (one seed: below by anything)
    secs = [numbers[r.task][per_task[r.task]].get("seconds", 0.0) for r in reports]  # (a fixed rule: none)
    return (f"| {label} | {100 * _mean(gains):+.1f} | {100 * _mean(over_last):+.1f} | {_mean(ranks):.1f} | "
            f"{', '.join(below) or 'none'} | {100 * _mean(secs):.1f}% |")


def loto_section(reports: list[TaskReport], numbers: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The report's lead: each task judged with the recipe chosen on the other tasks."""
    if len(reports) < 3:
        return []
    chosen = loto_choices(reports)
    lines = ["## Leave-one-task-out judgement", "",
             f"A default is what users get on a task nobody tuned it on. For each task, the recipe (search settings and "
             f"selector, or the fixed last-{K} rule) with the best mean test score minus random on the *other* "
             f"{len(reports) - 1} tasks is scored on it. Own-seed rank: the pick's place among the {len(reports[0].oracle)} subsets by "
             "the test scores of its own seed (a coin: the middle place). Seed std: the task's seed-to-seed std of one subset.", "",
             "| held-out task | recipe chosen on the other tasks | minus random | minus last 3 | own-seed rank | flagged uncertain | minus random / seed std |",
             "|---|---|---|---|---|---|---|"]
    for r in reports:
        name = chosen[r.task]
        gain = _minus_random(r, name)
        flagged = sum(bool(e.get("uncertain")) for e in r.picks.get(name, {}).values())
        lines.append(f"| {r.task} | {name} | {100 * gain:+.1f} | {100 * (gain - _minus_random(r, LAST)):+.1f} | "
                     f"{_own_seed_rank(r, name):.1f} | {flagged} of {len(r.seeds)} | "
                     + (f"{gain / r.noise():+.2f} |" if r.noise() else "n/a |"))
    fixed = {label: {r.task: name for r in reports} for label, name in
             (("current default: " + CURRENT, CURRENT), ("previous default: " + PREVIOUS_RECIPE, PREVIOUS_RECIPE), (LAST, LAST))}
    lines += ["", f"Means over the {len(reports)} tasks (compute: search and selection against the oracle's training time; "
              "below random: tasks where the mean is below random by more than the seed std):", "",
              "| recipe | minus random | minus last 3 | own-seed rank | below random | compute / oracle |", "|---|---|---|---|---|---|",
              _judged_row("**leave-one-task-out choice**", chosen, reports, numbers)]
    lines += [_judged_row(label, per_task, reports, numbers) for label, per_task in fixed.items() if all(
        n in r.strategies for r, n in zip(reports, per_task.values()))]
    best = sorted(_recipes(reports), key=lambda n: -_mean([_minus_random(r, n) for r in reports]))[:5]
    lines += [_judged_row(f"in hindsight: {n}", {r.task: n for r in reports}, reports, numbers) for n in best]
    lines.append(_ceiling_row(reports))
    if all(DEV_BEST in r.strategies for r in reports):
        lines.append(_judged_row(f"reference: {DEV_BEST}", {r.task: DEV_BEST for r in reports}, reports, numbers))
    return lines + ["", "Choices: " + "; ".join(f"{t}: {n}" for t, n in chosen.items()), "",
                    "The reference rows are no recipes. The noise ceiling knows the test scores of every subset on the "
                    "task's other seeds and picks their best mean, the subset that is best on average: its gain over random "
                    "is what layer choice leaves to win once seed noise is paid. The dev-best of every subset trains all "
                    "of them at the held-out seed and keeps the best on dev: how far selection by dev scores can go.", ""]


def _ceiling_row(reports: list[TaskReport]) -> str:
    """The LOTO table's reference row: the noise ceiling (best subset of the other seeds) on each task."""
    gains, ranks, over_last = [], [], []
    for r in reports:
        picks = _seed_picks(r)[OTHER_SEEDS]
        gain = _mean([r.oracle[x][s] - r.strategies["random (expectation)"][s] for s, x in picks.items()])
        gains.append(gain)
        over_last.append(gain - _minus_random(r, LAST))
        ranks.append(_mean([_seed_rank(r, x, s) for s, x in picks.items()]))
    return (f"| reference: {OTHER_SEEDS} | {100 * _mean(gains):+.1f} | {100 * _mean(over_last):+.1f} | {_mean(ranks):.1f} | "
            "(not a recipe) | 100% of the oracle, on other seeds |")


def flag_section(reports: list[TaskReport]) -> list[str]:
    """How well "layer choice is uncertain" predicts that the oracle cannot tell the pick from the median."""
    truth = {r.task: {s: (m - statistics.median(r.subset_means().values())) < 2 * r.noise() / len(r.seeds) ** 0.5
                      for s, m in r.subset_means().items()} for r in reports}
    sensitive = [r for r in reports if not r.insensitive()]
    lines = ["## Is the uncertainty flag calibrated?", "",
             "A pick is *indistinguishable* when its mean test score over the seeds is within two standard errors of a "
             f"{'/'.join(sorted({str(len(r.seeds)) for r in reports}))}-seed mean of the oracle's median subset. Precision: the share of flagged picks that "
             "are indistinguishable; recall: the share of indistinguishable picks that are flagged; silent on sensitive "
             f"tasks: the share of picks not flagged on the tasks where layer choice matters ({', '.join(r.task for r in sensitive) or 'none'}).", "",
             "| selector | flagged | indistinguishable picks | precision | recall | silent on sensitive tasks |", "|---|---|---|---|---|---|"]
    for name in [n for n in reports[0].picks if all(n in r.picks for r in reports)]:
        pairs = [(bool(e.get("uncertain")), truth[r.task][_name(e["layers"])], r in sensitive)
                 for r in reports for e in r.picks[name].values()]
        flagged = [t for f, t, _ in pairs if f]
        true = [f for f, t, _ in pairs if t]
        silent = [not f for f, _, s in pairs if s]
        lines.append(f"| {name} | {len(flagged)} of {len(pairs)} | {len(true)} | "
                     + (f"{_mean([float(t) for t in flagged]):.2f}" if flagged else "n/a") + " | "
                     + (f"{_mean([float(f) for f in true]):.2f}" if true else "n/a") + " | "
                     + (f"{_mean([float(x) for x in silent]):.2f}" if silent else "n/a") + " |")
    return lines + [""]


def transfer_section(reports: list[TaskReport], strategy: str) -> list[str]:
    """Masks found on one task retrained on another (same backbone, same seed): the source's pick
    scored by the target's oracle, against the target's own pick and a random subset."""
    usable = [r for r in reports if strategy in r.picks]
    if len(usable) < 2:
        return []
    lines = [f"## Mask transfer ({strategy})", "",
             "Mean test score on the target (columns) of the mask searched on the source (rows), minus the target's "
             "own pick, over the seeds both have; the diagonal is the target's own pick.", "",
             "| source \\ target | " + " | ".join(r.task for r in usable) + " |", "|---|" + "---|" * len(usable)]
    for source in usable:
        cells = []
        for target in usable:
            seeds = [s for s in target.seeds if s in source.picks[strategy] and s in target.picks[strategy]]
            own = _mean([target.oracle[_name(target.picks[strategy][s]["layers"])][s] for s in seeds])
            moved = _mean([target.oracle[_name(source.picks[strategy][s]["layers"])][s] for s in seeds])
            cells.append(_fmt(own) if source is target else f"{100 * (moved - own):+.1f}")
        lines.append(f"| {source.task} | " + " | ".join(cells) + " |")
    lines += ["", "Random subset (expectation) minus the target's own pick: " + ", ".join(
        f"{r.task} {100 * (_mean(list(r.strategies['random (expectation)'].values())) - _mean(list(r.strategies[strategy].values()))):+.1f}"
        for r in usable), ""]
    return lines


PAPER_PATTERN = ("SPT paper (RoBERTa-large, 24 layers, frozen masked-LM head): every task inserts prompts at layer 0 "
                 "and in the first four layers, layers 10-19 are often chosen, the last four are discarded")


def depth_section(store: Store, tasks: list[str], seeds: list[int] | None, quick: bool) -> list[str]:
    """Where the searches of deep backbones put their K layers, beside the paper's pattern (needs no oracle)."""
    lines = []
    for task in [t for t in tasks if TASKS[t].layers > 6]:
        layers = TASKS[task].layers
        bins = [range(start, min(start + -(-layers // 6), layers)) for start in range(0, layers, -(-layers // 6))]
        rows = []
        for seed in task_seeds(task, seeds):
            for job, row in stored_searches(store, task, seed, quick):
                for method, ranking in row["rankings"].items():
                    rows.append((f"{VARIANT_LABELS.get(job.name, job.name)}, {method}", ranking["layers"]))
        if not rows:
            continue
        if not lines:
            lines = ["## Where deep backbones' searches put the prompts", "", PAPER_PATTERN + ".", ""]
        lines += [f"### {task} ({TASKS[task].note})", "",
                  "| search, selector | picks | in the first 4 layers | in the last 4 | "
                  + " | ".join(f"{b.start}-{b.stop - 1}" for b in bins) + " |", "|---|---|---|---|" + "---|" * len(bins)]
        for name in dict.fromkeys(n for n, _ in rows):
            picked = [layer for n, chosen in rows if n == name for layer in chosen]
            counts = [sum(layer in b for layer in picked) for b in bins]
            lines.append(f"| {name} | " + "; ".join(str(c) for n, c in rows if n == name)
                         + f" | {sum(x < 4 for x in picked)} of {len(picked)} | {sum(x >= layers - 4 for x in picked)} of {len(picked)} | "
                         + " | ".join(map(str, counts)) + " |")
        lines.append("")
    return lines


def probe_section(store: Store, tasks: list[str]) -> list[str]:
    """The tasks without a complete oracle (MiniLM's: the deep tasks have the depth section): what their
    trained subsets and the all-layer baseline scored against the majority class, per seed."""
    lines = []
    for task in [t for t in tasks if TASKS[t].layers == 6]:
        for seed in TASKS[task].seeds:
            config = task_config(task, seed, [])
            scores = {job.name: row["test"] for job in jobs_for(task, seed, ["oracle", "baselines"])
                      if (job.kind == "subset" or job.name == "all") and (row := store.get(job.key(config))) is not None}
            if scores:
                lines.append(f"| {task} | {seed} | {100 * majority_score(config):.1f} | {len(scores)} | "
                             f"{100 * min(scores.values()):.1f}-{100 * max(scores.values()):.1f} | "
                             + (f"{100 * scores['all']:.1f} |" if "all" in scores else "- |"))
    if not lines:
        return []
    return ["## Probed, not benchmarked", "", "Tasks whose oracle is not complete: a few subsets (and the all-layer "
            "baseline) trained at a seed, to see whether a MiniLM-L6 learns the task above its majority class at all.", "",
            "| task | seed | majority class | trainings | range of their test scores | all 6 layers |", "|---|---|---|---|---|---|",
            *lines, ""]


def report(store: Store, tasks: list[str], seeds: list[int] | None, quick: bool, out: Path) -> str:
    reports = load_reports(store, tasks, seeds, quick)
    backbones = sorted({f"{BACKBONES.get(TASKS[t].config.split('/')[1], '?')} (K={K} of {TASKS[t].layers})" for t in tasks})
    text = [f"# Search quality on {', '.join(backbones)}, against a multi-seed oracle", "",
            f"Made by `python benchmarks/quality.py report` from {len(store.rows)} results in `results.jsonl` "
            f"({sum(r.get('wall_seconds', 0) for r in store.rows.values()) / 3600:.1f} h of single-thread training and search).", ""]
    if reports:
        numbers, sections = {}, []
        for r in reports:
            lines, numbers[r.task] = task_section(r)
            sections += lines
        text += loto_section(reports, numbers) + flag_section(reports) + sections
        text += summary_section(reports, numbers) + ceiling_section(reports) + transfer_section(reports, TRANSFERRED)
    text += depth_section(store, tasks, seeds, quick) + probe_section(store, [t for t in tasks if t not in {r.task for r in reports}])
    out.write_text("\n".join(text) + "\n")
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "report"])
    parser.add_argument("--tasks", nargs="+", default=MINILM_TASKS, choices=list(TASKS),
                        help="default: the MiniLM tasks (sst2-16shot-mpnet: run --what spt first, then oracle)")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: each task's own (13 21 42, or five where layer choice matters)")
    parser.add_argument("--what", nargs="+", default=["oracle", "baselines", "spt"], choices=["oracle", "baselines", "spt", "curves"],
                        help="curves: retrain the oracle subsets successive halving replays to record their dev curves")
    parser.add_argument("--variants", nargs="+", choices=list(SEARCH_VARIANTS),
                        help="run: only these search variants (default: each task's own)")
    parser.add_argument("--shard", default="0/1", help="i/n: this worker takes every n-th job starting at i")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 when two workers share two cores)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, two epochs (results go to results-quick.jsonl)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of results.jsonl and the report")
    parser.add_argument("--report", default="quality.md", help="the report's file name in --out")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    store = Store(args.out / ("results-quick.jsonl" if args.quick else "results.jsonl"))
    if args.action == "report":
        backfill_configs(args.out / "work")
        print(report(store, args.tasks, args.seeds, args.quick, args.out / ("quality-quick.md" if args.quick else args.report)))
        return
    index, count = (int(x) for x in args.shard.split("/"))
    jobs = [job for task in args.tasks for seed in task_seeds(task, args.seeds) for job in jobs_for(task, seed, args.what, args.variants, store)]
    for number, job in enumerate(jobs):
        if number % count == index:
            run_job(job, store, args.quick, args.out / "work")


if __name__ == "__main__":
    main()
