"""Fuzzing the command line with Hypothesis (issue 29): generated configs and ``--set``
values, mutated run directories and mutated model directories, driven through the real
entry point (``search.cli.main``, in-process).

Whatever the input, a command ends with exit status 0 or 2, no traceback and no
exception but its one printed ``error:`` line, and a refused command (status 2) leaves
every file as it was. One tiny finished run is made once for the module; each example
works on a copy.

Bounded and deterministic by default (``derandomize``: the same examples on every run,
so CI cannot flake; about a minute for the module); ``SPT_FUZZ_PROFILE=long`` draws
random examples, many more of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import snapshot, tiny_config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from search.cli import main
from search.config import SECTIONS

_COMMON = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("spt-fuzz-default", max_examples=50, derandomize=True, **_COMMON)
settings.register_profile("spt-fuzz-long", max_examples=1000, **_COMMON)
FUZZ = settings.get_profile("spt-fuzz-" + os.environ.get("SPT_FUZZ_PROFILE", "default"))

# ------------------------------------------------------------------ values

SPECIAL_STRINGS = ["nan", "-nan", "inf", "-inf", "1e309", "-1e309", "-1", "0", "1.5", "", "null", "~", "yes", "off",
                   "[", "{", "]", "{a: 1}", "[1, [2]]", "!!python/object:os.system", "&a [*a]", "'", '"', "\\", "%",
                   "x" * 10_000, "über ¿ 😀 ℕ", "\x00", "\udcff", "\t\n", "a: b: c", "- a\n- b", "0x1F", "1_000", "2**31"]
# Settings whose large valid values mean a long run or a large allocation (epochs, prompt and
# model sizes, thread count): drawn small, so an accepted example runs in a second.
WORKLOAD = {"search.epochs", "retrain.epochs", "prompt.length", "prompt.bottleneck", "prompt.phm_n", "runtime.threads",
            "compare.random_draws", "compare.optuna_trials"}

scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from([2**31, 2**63, -(2**63), 10**30, 0, -1])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


DEFAULTS = {f"{name}.{f.name}": _default(f) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
DEFAULTS["seed"] = 42
keys = st.sampled_from(sorted(DEFAULTS)) | st.sampled_from(["search", "nope", "search.nope", "search.lr.x", "", ".", "search.",
                                                             "=", "task.labels.0", " seed", "SEARCH.LR"])


def typed(default: Any) -> st.SearchStrategy:
    """Values of a field's own type (so that many examples pass the config check and run)."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-3, 40)
    if isinstance(default, float):
        return st.floats(-1, 2) | st.sampled_from([0.0, 1e-12, 1e30, float("nan")])
    if isinstance(default, list):
        return st.lists(typed(default[0]) if default else json_values, max_size=4)
    return st.text(max_size=12) | st.sampled_from(["none", "cpu", "auto", "mean", "cls", "linear", "cosine", "bf16", "fp16"])


@st.composite
def set_values(draw, key: str) -> str:
    """The text after ``KEY=``: a value of the field's type, JSON of any type, a special
    string, or any text. Settings whose large valid values mean a long run take small ones."""
    if key in WORKLOAD:
        return draw(st.sampled_from(["1", "2", "0", "-1", "1.5", "null", "[]", "x"]))
    kind = draw(st.sampled_from(["typed", "json", "special", "text"]))
    if kind == "typed":
        return json.dumps(draw(typed(DEFAULTS.get(key))), allow_nan=True)
    if kind == "json":
        return json.dumps(draw(json_values), allow_nan=True)
    return draw(st.sampled_from(SPECIAL_STRINGS)) if kind == "special" else draw(st.text(max_size=40))


@st.composite
def overrides(draw) -> list[str]:
    items = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(keys)
        bare = draw(st.integers(0, 9)) == 9  # sometimes no '='
        items += ["--set", key if bare else f"{key}={draw(set_values(key))}"]
    return items


# ------------------------------------------------------------------ running a command


def spt(args: list[str]) -> tuple[int, list[str]]:
    """``spt args`` in-process: its exit status (argparse's too) and its standard error lines."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse: usage and one error line, exit 2
            code = exc.code
    return code, err.getvalue().splitlines()


def check(args: list[str], root: Path, before: dict[str, bytes]) -> tuple[int, list[str]]:
    """Run ``args``; status 0 or 2, no traceback, one error line exactly when refused, and a
    refusal leaves every file under ``root`` as it was."""
    code, err = spt(args)
    text = "\n".join(err)
    assert code in (0, 2), (args, code, text[-3000:])
    assert "Traceback" not in text and "Logging error" not in text, (args, text[-3000:])
    errors = [line for line in err if line.startswith("error: ") or line.startswith(f"spt {args[0]}: error: ")]
    with contextlib.suppress(InvalidArgument):  # (outside a Hypothesis test there are no statistics)
        event(f"{args[0]}: exit {code}" + (f": {errors[0][:70]}" if errors else ""))
    if code == 0:
        assert errors == [], (args, errors)
    else:
        assert len(errors) == 1 and err[-1] == errors[0], (args, err[-5:])
        after = snapshot(root)
        changed = {name for name in set(before) | set(after) if before.get(name) != after.get(name)}
        assert changed == set() or _stopped_in_its_run(args, errors[0], root, changed), (args, errors[0], sorted(changed)[:5])
    return code, err


def _stopped_in_its_run(args: list[str], error: str, root: Path, changed: set[str]) -> bool:
    """A stop that can only come once a run has begun (its training diverged): it may leave
    that run's folder (to start over with --force), and nothing else, no temporary file nor lock."""
    if not error.endswith("start over with --force") or "--out" not in args:
        return False
    out = Path(args[args.index("--out") + 1]).relative_to(root).as_posix()
    return all(name.startswith(out + "/") and not name.endswith((".tmp", ".spt-lock")) for name in changed)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert) -> tuple[Path, Path]:
    """A tiny config and its finished run (a sparse model in ``sparse/``), made once."""
    root = tmp_path_factory.mktemp("fuzz")
    config = tiny_config(root, tiny_bert, n_train=16, search={"epochs": 1}, select={"k": 1})
    assert main(["run", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    (root / "texts.txt").write_text("a great film\ni hate this plot\n")
    return config, root / "run"


@contextlib.contextmanager
def workspace(finished: tuple[Path, Path]):
    """A fresh folder holding a copy of the finished run (``run``), the config and the texts;
    beside the finished run's folder, so that its models' relative backbone paths still hold."""
    config, run = finished
    with tempfile.TemporaryDirectory(prefix="spt-fuzz-", dir=run.parent.parent) as folder:
        root = Path(folder)
        shutil.copytree(run, root / "run")
        shutil.copy(config, root / "config.yaml")
        shutil.copy(run.parent / "texts.txt", root / "texts.txt")
        yield root


# ------------------------------------------------------------------ configs and --set


@FUZZ
@given(data=st.data())
def test_fuzzed_set_values_exit_0_or_2_without_a_traceback(finished, data):
    with workspace(finished) as root:
        check(["run", str(root / "config.yaml"), "--out", str(root / "new"), "--quiet", *data.draw(overrides())], root, snapshot(root))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a node of a nested dict/list (the root included)."""
    found = [prefix]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        found += _paths(child, (*prefix, key))
    return found


def _any_value(path: tuple) -> st.SearchStrategy:
    return json_values


def _config_value(path: tuple) -> st.SearchStrategy:
    """A config field's new value: small for the settings in :data:`WORKLOAD`."""
    return st.sampled_from([-1, 0, 1, 2, 1.5, None, [], "x"]) if ".".join(map(str, path)) in WORKLOAD else json_values


@st.composite
def mutated_tree(draw, tree: Any, values=_any_value) -> Any:
    """``tree`` (parsed JSON or YAML) with one node replaced (by a value of ``values(path)``),
    deleted, or given an extra key."""
    tree = json.loads(json.dumps(tree))
    path = draw(st.sampled_from(_paths(tree)))
    if not path:
        return draw(json_values)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    how = draw(st.sampled_from(["replace", "delete", "extra"]))
    if how == "replace":
        parent[path[-1]] = draw(values(path))
    elif how == "delete":
        del parent[path[-1]]
    elif isinstance(parent[path[-1]], dict):
        parent[path[-1]][draw(st.text(max_size=8))] = draw(json_values)
    return tree


@FUZZ
@given(data=st.data())
def test_fuzzed_config_files_exit_0_or_2_without_a_traceback(finished, data):
    with workspace(finished) as root:
        config = root / "config.yaml"
        tree = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump(data.draw(mutated_tree(tree, _config_value)), allow_unicode=True))
        check(["run", str(config), "--out", str(root / "new"), "--quiet"], root, snapshot(root))


# ------------------------------------------------------------------ mutated run and model directories


def _safetensors_header(data: bytes) -> tuple[dict, bytes] | None:
    """The JSON header and the tensor bytes of a safetensors file (``None``: not one)."""
    try:
        size = int.from_bytes(data[:8], "little")
        return json.loads(data[8:8 + size]), data[8 + size:]
    except ValueError:
        return None


def _csv_bytes(rows: Any) -> bytes:
    """Rows (lists of cells, or anything a mutation put there) written back as CSV lines."""
    rows = rows if isinstance(rows, list) else [rows]
    return "".join((",".join(map(str, r)) if isinstance(r, list) else str(r)) + "\n" for r in rows).encode("utf-8", "surrogatepass")


def _structured(path: Path, data: bytes) -> tuple[Any, Any] | None:
    """The parsed content of ``path`` and how to write it back (``None``: not structured)."""
    try:
        if path.suffix == ".json":
            return json.loads(data), lambda tree: json.dumps(tree, allow_nan=True).encode()
        if path.suffix == ".yaml":
            return yaml.safe_load(data), lambda tree: yaml.safe_dump(tree, allow_unicode=True).encode()
        if path.suffix == ".csv":
            return [line.split(",") for line in data.decode().splitlines()], _csv_bytes
    except (ValueError, yaml.YAMLError):
        return None
    header = _safetensors_header(data) if path.suffix == ".safetensors" else None
    if header is None:
        return None
    tree, rest = header

    def write(new: Any) -> bytes:
        text = json.dumps(new, allow_nan=True).encode()
        return len(text).to_bytes(8, "little") + text + rest
    return tree, write


@st.composite
def mutation(draw, path: Path) -> str:
    """Damage ``path`` one way (truncated, a flipped byte, another encoding, a node of its JSON,
    YAML, CSV or safetensors header replaced, removed or added, gone, a folder); returns how."""
    data = path.read_bytes()
    how = draw(st.sampled_from(["structured", "truncate", "flip", "encoding", "empty", "delete", "folder", "junk"]))
    parsed = _structured(path, data) if how == "structured" else None
    if parsed is not None:
        tree, write = parsed
        path.write_bytes(write(draw(mutated_tree(tree))))
    elif how in ("truncate", "structured") and data:
        path.write_bytes(data[:draw(st.integers(0, len(data) - 1))])
    elif how == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        path.write_bytes(data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:])
    elif how == "encoding":
        codec = draw(st.sampled_from(["utf-16", "latin-1", "utf-8-sig", "cp1252"]))
        path.write_bytes(data.decode("utf-8", "replace").encode(codec, "replace"))
    elif how == "delete":
        path.unlink()
    elif how == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(b"" if how == "empty" else draw(st.binary(max_size=64)))
    return f"{how} {path.name}"


def commands(root: Path) -> dict[str, list[str]]:
    """Every command that reads a finished run, each writing (if at all) a new file or folder."""
    run, config = str(root / "run"), str(root / "config.yaml")
    return {
        "select": ["select", run, "--k", "1", "--out", str(root / "mask.json"), "--quiet"],
        "select-perturbation": ["select", run, "--k", "1", "--method", "perturbation", "--out", str(root / "mask.json"), "--quiet"],
        "runs": ["runs", run],
        "predict": ["predict", run, "--input", str(root / "texts.txt"), "--output", str(root / "predictions.jsonl")],
        "evaluate": ["evaluate", run, "--split", "dev"],
        "plot": ["plot", run, "--out", str(root / "heatmap.png")],
        "plot-trajectory": ["plot", run, "--kind", "trajectory", "--out", str(root / "trajectory.png")],
        "retrain": ["retrain", config, "--mask", str(root / "run" / "layer_mask.json"), "--out", str(root / "retrained"), "--quiet"],
        "run": ["run", config, "--out", run, "--quiet"],  # the finished run itself: refused, or resumed
    }


RUN_FILES = ["config.yaml", "environment.json", "gates.csv", "layer_mask.json", "metrics.csv", "metrics.json", "status.json",
             "steps.csv", ".spt-manifest.json", "summary.md", "supernet/prompt_config.json", "supernet/prompt_weights.safetensors"]
MODEL_FILES = ["sparse/prompt_config.json", "sparse/prompt_weights.safetensors", "sparse/README.md"]


@FUZZ
@given(data=st.data())
def test_fuzzed_run_directories_exit_0_or_2_and_a_refusal_writes_nothing(finished, data):
    with workspace(finished) as root:
        for name in data.draw(st.lists(st.sampled_from(RUN_FILES), min_size=1, max_size=2, unique=True)):
            if (root / "run" / name).is_file():
                event(data.draw(mutation(root / "run" / name)))
        check(commands(root)[data.draw(st.sampled_from(sorted(commands(root))))], root, snapshot(root))


@FUZZ
@given(data=st.data())
def test_fuzzed_model_directories_exit_0_or_2_and_a_refusal_writes_nothing(finished, data):
    with workspace(finished) as root:
        name = data.draw(st.sampled_from(MODEL_FILES))
        event(data.draw(mutation(root / "run" / name)))
        check(commands(root)[data.draw(st.sampled_from(["predict", "evaluate", "runs"]))], root, snapshot(root))


# ------------------------------------------------------------------ what the fuzzer found


def _rename_key(path: str, old: str, new: str):
    def damage(run: Path) -> None:
        data = json.loads((run / path).read_text())
        data[new] = data.pop(old)
        (run / path).write_text(json.dumps(data))
    return damage


def _set_key(path: str, key: str, value: Any):
    def damage(run: Path) -> None:
        data = json.loads((run / path).read_text())
        data[key] = value
        (run / path).write_text(json.dumps(data))
    return damage


def _a_folder(name: str):
    def damage(run: Path) -> None:
        (run / "status.json").unlink()  # (an unfinished run: `spt run` resumes it)
        if name != "status.json":
            (run / name).unlink()
        (run / name).mkdir()
    return damage


def _drop_key(path: str, section: str, key: str):
    def damage(run: Path) -> None:
        data = json.loads((run / path).read_text())
        del data[section][key]
        (run / path).write_text(json.dumps(data))
    return damage


def _history_not_utf8(run: Path) -> None:
    (run / "status.json").unlink()  # an unfinished run: `spt run` resumes it
    (run / "metrics.csv").write_bytes((run / "metrics.csv").read_bytes() + b"search,1,9,\xff\n")


@pytest.mark.parametrize("command, sets, damage, fragment", [
    ("run", ['task.data_dir="\\ud800\\udc00"'], None, "error: task.data_dir: holds '\\ud800', half of a UTF-16 surrogate pair"),
    ("run", ["hpo.space=&a {x: *a}"], None, "error: hpo.space.x: holds itself (a YAML alias inside its own anchor"),
    ("run", ["task.hf=&a {path: *a}"], None, "error: task.hf.path: holds itself"),
    ("run", ["task.positive_label=nan"], None, "error: task.positive_label: must be one of task.labels ['0', '1'] or null, got 'nan'"),
    ("run", ["=1"], None, "error: --set '=1': expected key=value, e.g. --set search.epochs=2"),
    ("run", ["search.=1"], None, "error: --set 'search.=1': expected key=value"),
    ("run", [], _a_folder("status.json"), "status.json: is a folder (or not a regular file) where spt keeps a file"),
    ("run", [], _a_folder("steps.csv"), "steps.csv: is a folder (or not a regular file) where spt keeps a file"),
    ("predict", [], _drop_key("sparse/prompt_config.json", "head", "template"),
     "head.template: left out is not what prompt_weights.safetensors was saved with (None)"),
    ("run", [], _history_not_utf8, "metrics.csv line 4: byte 0xff is not UTF-8"),
    # (were a KeyError and a TypeError; prompt_config.json's schema refuses them)
    ("select-perturbation", [], _rename_key("supernet/prompt_config.json", "prompt", "pr0mpt"), "supernet/prompt_config.json: prompt: missing"),
    ("predict", [], _rename_key("sparse/prompt_config.json", "labels", "label$"), "sparse/prompt_config.json: labels: missing"),
    ("predict", [], _set_key("sparse/prompt_config.json", "backbone", {}), "sparse/prompt_config.json: backbone: expected a string, got {}"),
], ids=["surrogate", "alias-loop", "alias-loop-hf", "positive-label", "empty-key", "empty-field", "status-folder", "steps-folder",
        "bound-field-left-out", "history-bytes", "supernet-key", "sparse-key", "backbone-dict"])
def test_what_the_fuzzer_found_is_refused_in_one_line_and_writes_nothing(finished, command, sets, damage, fragment):
    with workspace(finished) as root:
        if damage is not None:
            damage(root / "run")
        args = commands(root)[command] if damage is not None else commands(root)["run"][:1] + [
            str(root / "config.yaml"), "--out", str(root / "new"), "--quiet"]
        for item in sets:
            args += ["--set", item]
        code, err = check(args, root, snapshot(root))
        assert code == 2 and fragment in err[-1], err[-3:]


@pytest.mark.parametrize("row, expected", [(b"search,1,9,\xff\n", "metrics.csv line 4: byte 0xff is not UTF-8 text"),
                                           (b"search\n", None)], ids=["bytes", "short-row"])
def test_a_damaged_metrics_history_of_a_resumed_run_is_no_traceback(finished, row, expected):
    """The rows spt keeps from ``metrics.csv`` on resuming: bytes that are not UTF-8 are one
    error line (was a UnicodeDecodeError), a row of one cell is not this stage's (an IndexError)."""
    with workspace(finished) as root:
        (root / "run" / "status.json").unlink()  # an unfinished run: `spt run` resumes it
        (root / "run" / "metrics.csv").write_bytes((root / "run" / "metrics.csv").read_bytes() + row)
        code, err = spt(commands(root)["run"])
        assert "Traceback" not in "\n".join(err)
        assert (code, err[-1:]) == ((2, [f"error: {root / 'run' / 'metrics.csv'}: {root / 'run' / expected}; save the file as UTF-8"])
                                    if expected else (0, err[-1:])), err[-3:]
