"""Re-key a quality results store (``results.jsonl``): rows of the old keys, and options added later.

**Old keys.** A result used to be keyed by a hash (its ``recipe``) of the settings of its job that
differed from the defaults of the day, with ``RECIPE_BASE`` holding the old values of the defaults
changed since: a default changed without an entry there kept the old results for the new setting.
``benchmarks/quality.py`` now keys a result by its job's whole resolved config and
``RESULTS_VERSION`` (``job_identity``). Each old row's config is reconstructed as the old key
defined it: today's defaults, overlaid with ``RECIPE_BASE``, overlaid with the settings its recipe
hashed. A recipe is a hash, so it is matched, not inverted: of the configs the benchmark's jobs run
with today (the task's training config at the row's seed, or each search variant's), the one whose
recipe is the row's agrees with that reconstruction on every field the recipe hashed (a field it
hashed either differs from its base there, and the recipe holds the value, or equals it); the
fields a recipe never hashed (a training's supernet-only prompt fields, runtime precision and
compile, a PEFT baseline's compare section) are today's defaults in both, as the old keys took
them. That config's new key replaces the row's; the row keeps every field, the old key as
``legacy_key``, the hashed ``identity``, and ``recipe`` becomes the new hash. A row no config
matches stops the migration before anything is written.

**Options added later.** A new option enters every key, so the stored results are no longer found
(a result is never reused for a config it was not computed with). Where the new option's default is
what the code did before it existed, say so: ``--assume section.field=value`` adds the field to the
identities that lack it and re-keys those rows (the replaced keys kept in ``previous_keys``).

    python benchmarks/migrate_store.py                                    # results/quality/results.jsonl
    python benchmarks/migrate_store.py results/quality/results-quick.jsonl --quick
    python benchmarks/migrate_store.py --assume prompt.new_option=false

Run it with no benchmark worker writing to the store.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import benchmarks.quality as quality  # noqa: E402
from search.config import RunConfig, parse_overrides  # noqa: E402
from spt.files import write_text_atomic  # noqa: E402

# The settings whose defaults changed after the benchmark began, at their old values: the old
# recipes were hashed against these (the old scheme's RECIPE_BASE, as it last stood).
RECIPE_BASE: dict[str, dict[str, Any]] = {
    "prompt": {"normalize": False}, "search": {"warmup_epochs": 0, "arch_dropout": True, "arch_batches": 1},
    "select": {"average_last": 1},
}
SHAPE = ("length", "bottleneck", "phm_n", "activation", "dropout", "discard")  # the prompt fields a training hashed


def _legacy_settings(config: RunConfig, sections: list[str], prompt_fields: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The fields of ``sections`` that differ from today's defaults overlaid with ``RECIPE_BASE``."""
    out: dict[str, Any] = {"seed": config.seed}
    for name in sections:
        section = getattr(config, name)
        default = type(section)()
        base = RECIPE_BASE.get(name, {})
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
                  if getattr(section, f.name) != base.get(f.name, getattr(default, f.name))}
        if name == "prompt" and prompt_fields is not None:
            values = {k: v for k, v in values.items() if k in prompt_fields}
        out[name] = values
    return out


def legacy_recipe(kind: str, config: RunConfig) -> str:
    """The old scheme's recipe of a ``kind`` job run with ``config``."""
    if kind == "search":
        data = _legacy_settings(config, ["model", "prompt", "head", "task", "search", "select"])
    else:
        data = _legacy_settings(config, ["model", "prompt", "head", "task", "retrain"], SHAPE)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def legacy_key(job: quality.Job, config: RunConfig) -> str:
    return f"{job.task}|{job.seed}|{job.kind}|{job.name}|{legacy_recipe(job.kind, config)}"


def _candidates(task: str, seed: int, kind: str, quick: bool) -> dict[str, RunConfig]:
    """Today's configs of the task's ``kind`` jobs at ``seed``, by their old recipe."""
    if kind == "search":
        configs = [quality.job_config(quality.Job(task, seed, kind, v), quick) for v in quality.SEARCH_VARIANTS]
    else:
        configs = [quality.task_config(task, seed, [], quick)]
    found: dict[str, RunConfig] = {}
    for config in configs:
        recipe = legacy_recipe(kind, config)
        # (one recipe, one config: what a search recipe leaves out no variant sets)
        assert recipe not in found or found[recipe].to_dict() == config.to_dict(), recipe
        found[recipe] = config
    return found


def migrate_row(row: dict[str, Any], quick: bool, cache: dict[tuple, dict[str, RunConfig]]) -> dict[str, Any] | None:
    """``row`` under its new key (as it is when already there); None when no config of today's jobs has its recipe."""
    if not quality.is_legacy_key(row["key"]):
        return row
    task, seed, kind, name, recipe = row["task"], row["seed"], row["kind"], row["name"], row["recipe"]
    if task not in quality.TASKS or row["key"] != f"{task}|{seed}|{kind}|{name}|{recipe}":
        return None
    group = (task, seed, kind == "search")
    if group not in cache:
        cache[group] = _candidates(task, seed, kind, quick)
    config = cache[group].get(recipe)
    if config is None:
        return None
    job = quality.Job(task, seed, kind, name)
    identity = job.identity(config)
    return {**row, "key": quality.identity_key(job, identity), "recipe": quality.identity_digest(identity),
            "legacy_key": row["key"], "identity": identity}


def migrate_rows(rows: list[dict[str, Any]], quick: bool = False) -> list[dict[str, Any]]:
    """Every row under its new key, in the same order; a ValueError naming the rows that match no config."""
    cache: dict[tuple, dict[str, RunConfig]] = {}
    migrated = [migrate_row(row, quick, cache) for row in rows]
    unmatched = [row["key"] for row, new in zip(rows, migrated) if new is None]
    if unmatched:
        raise ValueError(f"{len(unmatched)} rows match no config of today's jobs (nothing written): {', '.join(unmatched[:5])}")
    done = [row for row in migrated if row is not None]
    if len({row["key"] for row in done}) != len({row["key"] for row in rows}):
        raise ValueError("two results would share a key (nothing written)")
    return done


def assume(rows: list[dict[str, Any]], settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose identity lacks a field of ``settings`` (``{section: {field: value}}``) given it, and re-keyed:
    for an option added after they were computed, at the value that does what the code did before it."""
    out = []
    for row in rows:
        identity = row.get("identity")
        if identity is None or identity["version"] != quality.RESULTS_VERSION:
            out.append(row)
            continue
        job = quality.Job(row["task"], row["seed"], row["kind"], row["name"])
        use, config = quality.job_use(job), copy.deepcopy(identity["config"])
        for section, values in settings.items():
            if section not in quality.UNUSED_SECTIONS[use]:  # (a field the row has keeps its value; a new section is added)
                config[section] = {**values, **config.get(section, {})}
        new = {"version": identity["version"], "config": quality.result_fields(use, config)}
        if new == identity:
            out.append(row)
            continue
        out.append({**row, "key": quality.identity_key(job, new), "recipe": quality.identity_digest(new), "identity": new,
                    "previous_keys": [*row.get("previous_keys", []), row["key"]]})
    return out


def rewrite(path: Path, change: Any) -> tuple[int, int]:
    """Apply ``change`` (rows -> rows) to the store at ``path`` under its lock; (rows, rows whose key changed)."""
    with open(path) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        rows = [json.loads(line) for line in handle.read().splitlines() if line.strip()]
        new = change(rows)
        assert len(new) == len(rows)
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in new))
    return len(rows), sum(a["key"] != b["key"] for a, b in zip(rows, new))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path, nargs="?", default=quality.OUT / "results.jsonl")
    parser.add_argument("--quick", action="store_true", help="a store of quality.py run --quick (its configs are the quick ones)")
    parser.add_argument("--assume", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                        help="an option added after the rows were computed, at the value that keeps what they did")
    args = parser.parse_args()
    settings = parse_overrides(args.assume)
    total, changed = rewrite(args.store, lambda rows: assume(migrate_rows(rows, args.quick), settings))
    print(f"{args.store}: {changed} of {total} rows re-keyed")


if __name__ == "__main__":
    main()
