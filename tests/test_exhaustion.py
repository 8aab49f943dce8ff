"""Running out of the machine (issue 29, item 4): a full disk or a failed write during the
search, the retraining, a checkpoint, a plot or predict, and out of memory in a step.

Each ends with one ``error:`` line (the path and the space needed, or the setting to
lower), exit status 2 and no traceback; no ``.tmp`` file stays, the run directory keeps
its last good checkpoint, and the same command run again finishes with the gates of an
uninterrupted run.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import assert_same_gates, refused, snapshot, tiny_config

import search.callbacks
import spt.files
from search.cli import main
from search.runs import setup_logging
from spt.model import PromptSupernet, SparsePromptModel

NO_SPACE = "no space left on device; free space on that disk"


def leftovers(folder: Path) -> list[str]:
    """Temporary files and locks under ``folder``: none may stay after a failure."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name in (".spt-lock", ".spt-trash"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert):
    """A config and the run it makes without any failure."""
    root = tmp_path_factory.mktemp("reference")
    config = tiny_config(root, tiny_bert, n_train=16, search={"epochs": 1})
    assert main(["run", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    return config, root / "run"


def assert_resumes_to_the_reference(config: Path, run: Path, reference: Path, capsys) -> None:
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    assert_same_gates(reference, run)
    done, expected = json.loads((run / "metrics.json").read_text()), json.loads((reference / "metrics.json").read_text())
    assert done["selected_layers"] == expected["selected_layers"]
    for split in ("dev", "test"):
        assert done[split] == pytest.approx(expected[split], abs=1e-6)
    assert leftovers(run) == []


class FullDisk:
    """The disk fills at the ``occurrence``-th write (an atomic write or a CSV append) of a file
    named ``name``: that write raises ``OSError(ENOSPC)`` as the real one would."""

    def __init__(self, monkeypatch, kind: str, name: str, occurrence: int = 1) -> None:
        self.kind, self.name, self.left, self.failed = kind, name, occurrence, None
        publish, append = spt.files._publish, search.callbacks.append_text
        monkeypatch.setattr(spt.files, "_publish", lambda tmp, path: self._hit("write", path) or publish(tmp, path))
        monkeypatch.setattr(search.callbacks, "append_text",
                            lambda path, text, create=True: self._hit("append", path) or append(path, text, create))

    def _hit(self, kind: str, path: Path) -> None:
        if kind == self.kind and Path(path).name == self.name:
            self.left -= 1
            if self.left == 0:
                self.failed = Path(path)
                # as the write raises it: a file's write names no file, spt.files.append_text names it
                raise OSError(errno.ENOSPC, "No space left on device", *([str(path)] if kind == "append" else []))


# One failure per file a run writes, in the order a run first writes them: the search's
# histories, checkpoint and supernet, the selection, the retraining's, and the report.
WRITES = [("write", ".spt-manifest.json", 1), ("write", "config.yaml", 1), ("write", "gates.csv", 1),
          ("append", "gates.csv", 2), ("append", "metrics.csv", 1), ("append", "steps.csv", 1),
          ("write", "checkpoint.safetensors", 1), ("write", "prompt_weights.safetensors", 1), ("write", "status.json", 1),
          ("write", "layer_mask.json", 1), ("append", "steps.csv", 2), ("write", "retrain_checkpoint.safetensors", 1),
          ("write", "prompt_weights.safetensors", 2), ("write", "metrics.json", 1), ("write", "README.md", 1)]


@pytest.mark.parametrize("kind, name, occurrence", WRITES, ids=[f"{k}-{n}-{o}" for k, n, o in WRITES])
def test_a_full_disk_at_any_write_ends_in_one_line_and_the_run_resumes(reference, tmp_path, monkeypatch, capsys,
                                                                       kind, name, occurrence):
    config, ref = reference
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        disk = FullDisk(patch, kind, name, occurrence)
        line = refused(capsys, ["run", str(config), "--out", str(run), "--quiet"], NO_SPACE)
    assert line.startswith(f"error: {disk.failed}: {NO_SPACE}")
    resumable = (run / ".spt-manifest.json").is_file()
    assert line.endswith("MB more) and run the same command again to resume" if resumable else "run the same command again")
    assert leftovers(tmp_path) == []
    assert_resumes_to_the_reference(config, run, ref, capsys)


class FullStream(io.StringIO):
    """A log file on a full disk: every write fails as a real one does."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_log_ends_in_one_line_not_a_logging_traceback(reference, tmp_path, monkeypatch, capsys):
    config, ref = reference
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(logging.FileHandler, "_open", lambda self: FullStream())
        line = refused(capsys, ["run", str(config), "--out", str(run), "--quiet"], NO_SPACE)
    assert line.startswith(f"error: {run / 'log.txt'}: {NO_SPACE} (the run needs about ")
    assert_resumes_to_the_reference(config, run, ref, capsys)


def test_a_full_disk_at_the_summary_of_a_finished_run_says_the_run_finished(reference, tmp_path, monkeypatch, capsys):
    config, ref = reference
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        FullDisk(patch, "write", "summary.md")
        refused(capsys, ["run", str(config), "--out", str(run), "--quiet"],
                f"error: {run / 'summary.md'}: no space left on device; free space on that disk: the run itself finished "
                f"(its results are in {run}), only this file was not written")
    assert (run / "metrics.json").is_file() and leftovers(tmp_path) == []


def test_the_space_a_run_needs_is_twice_its_largest_file(reference, tmp_path, monkeypatch, capsys):
    config, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    (run / "status.json").unlink()  # an unfinished run: the retraining resumes
    (run / "big.bin").write_bytes(b"\0" * (3 * 1024 * 1024 + 1))  # 3 MB and a byte: 7 MB twice, rounded up
    with monkeypatch.context() as patch:
        FullDisk(patch, "write", "metrics.json")
        refused(capsys, ["run", str(config), "--out", str(run), "--quiet"],
                f"error: {run / 'metrics.json'}: {NO_SPACE} (the run needs about 7 MB more) and run the same command again to resume")


@pytest.fixture
def small_disk(tmp_path):
    """A 40 kB tmpfs (as root, where mounting is allowed): a tiny run fills it mid-way."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        setup_logging(None, verbose=False)  # closes the run's log.txt, or the disk is busy
        if subprocess.run(["umount", str(disk)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_a_real_full_disk_ends_in_one_line_and_the_run_resumes_once_space_is_freed(reference, small_disk, capsys):
    config, ref = reference
    run = small_disk / "run"
    code = main(["run", str(config), "--out", str(run), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f": {NO_SPACE}" in err[0] and err[0].startswith(f"error: {run}"), err
    assert err[0].endswith("MB more) and run the same command again to resume")
    assert leftovers(small_disk) == []
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # space freed
    assert_resumes_to_the_reference(config, run, ref, capsys)


def test_a_full_disk_in_plot_predict_and_select_leaves_nothing_behind(reference, tmp_path, monkeypatch, capsys):
    config, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    (tmp_path / "texts.txt").write_text("a great film\n")
    before = snapshot(tmp_path)
    commands = {"heatmap.png": ["plot", str(run), "--out", str(tmp_path / "heatmap.png")],
                "predictions.jsonl": ["predict", str(run), "--input", str(tmp_path / "texts.txt"), "--output",
                                     str(tmp_path / "predictions.jsonl")],
                "mask.json": ["select", str(run), "--k", "1", "--out", str(tmp_path / "mask.json"), "--quiet"]}
    for name, args in commands.items():
        with monkeypatch.context() as patch:
            FullDisk(patch, "write", name)
            code = main(args)
        err = capsys.readouterr().err.strip().splitlines()  # (select warns first that the choice is uncertain)
        assert code == 2 and err[-1] == f"error: {tmp_path / name}: {NO_SPACE} and run the same command again", err
        assert not any("Traceback" in line or line.startswith("error:") for line in err[:-1])
        assert snapshot(tmp_path) == before


def test_a_tensor_file_that_does_not_fit_is_an_os_error_naming_it_and_leaves_no_tmp(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    path = tmp_path / "weights.safetensors"
    spt.files.save_tensors_atomic({"a": torch.zeros(2)}, path)
    before = path.read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError) as caught:
        spt.files.save_tensors_atomic({"a": torch.ones(2)}, path)
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(path))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


def test_an_append_that_does_not_fit_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "gates.csv"
    path.write_text("step,epoch,layer,alpha\n")
    write, calls = spt.files.os.write, []

    def half_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return write(fd, bytes(data[:5]))  # a short write: part of the row is on disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spt.files.os, "write", half_then_full)
    with pytest.raises(OSError) as caught:
        spt.files.append_text(path, "12,0,1,0.500000\r\n")
    monkeypatch.undo()
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(path))
    assert path.read_text() == "step,epoch,layer,alpha\n"


def test_a_lock_that_cannot_be_written_is_removed(tmp_path, monkeypatch):
    from search import lock

    def full(fd, mode, encoding):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.os, "fdopen", full)
    with pytest.raises(OSError) as caught:
        lock.acquire(tmp_path)
    assert caught.value.filename == str(tmp_path / lock.LOCK_FILE) and not (tmp_path / lock.LOCK_FILE).exists()


# ------------------------------------------------------------------ out of memory


def _raise(exc: BaseException):
    def forward(*args, **kwargs):
        raise exc
    return forward


@pytest.mark.parametrize("model, exc, args, expected", [
    (PromptSupernet, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), ["run"],
     "error: search.batch_size: out of GPU memory in the search; lower search.batch_size, search.eval_batch_size, "
     "model.max_length or runtime.frozen_cache_mb, or set runtime.activation_checkpointing=prompted (--set KEY=VALUE) "
     "and run the same command again to resume; `spt estimate CONFIG --memory SIZE` gives the largest batch that fits"),
    (SparsePromptModel, RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes."),
     ["run"], "error: retrain.batch_size: out of memory in the retraining; lower retrain.batch_size, search.eval_batch_size, "
     "model.max_length or runtime.frozen_cache_mb, or set runtime.activation_checkpointing=prompted (--set KEY=VALUE) "
     "and run the same command again to resume; `spt estimate CONFIG --memory SIZE` gives the largest batch that fits"),
    (SparsePromptModel, MemoryError(), ["predict"],
     "error: --batch-size: out of memory with --batch-size 32; pass a smaller --batch-size and run the same command again"),
], ids=["cuda-search", "cpu-retrain", "predict"])
def test_out_of_memory_in_a_step_names_the_setting_to_lower(reference, tmp_path, monkeypatch, capsys, model, exc, args, expected):
    config, ref = reference
    if args == ["predict"]:
        (tmp_path / "texts.txt").write_text("a great film\n")
        args = ["predict", str(ref), "--input", str(tmp_path / "texts.txt")]
    else:
        args = [*args, str(config), "--out", str(tmp_path / "run"), "--quiet"]
    monkeypatch.setattr(model, "forward", _raise(exc))
    assert refused(capsys, args, "out of") == expected
    assert leftovers(tmp_path) == []


def test_an_error_that_is_not_out_of_memory_is_not_disguised_as_one(reference, tmp_path, monkeypatch):
    config, _ = reference
    monkeypatch.setattr(PromptSupernet, "forward", _raise(RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"])
