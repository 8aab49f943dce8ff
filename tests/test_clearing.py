"""``--force`` deletes only what spt wrote, all or nothing (issue 29.3).

A user's file inside a folder spt wrote (``sparse/``, ``supernet/``, ``tensorboard/``)
makes ``--force`` refuse, naming the file; a folder that cannot be removed (a mount point,
no permission, a rename that fails) leaves the run exactly as it was, with one error line.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import refused, snapshot, tiny_config

from search.cli import main

IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert):
    """A config and a finished ``spt run`` (TensorBoard events too), copied by each test."""
    root = tmp_path_factory.mktemp("finished")
    config = tiny_config(root, tiny_bert, n_train=16, search={"epochs": 1},
                         runtime={"progress": False, "threads": 1, "tensorboard": True})
    assert main(["run", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    return config, root / "run"


@pytest.fixture
def run(finished, tmp_path):
    config, source = finished
    shutil.copytree(source, tmp_path / "run")
    return config, tmp_path / "run"


def force(config: Path, run: Path) -> list[str]:
    return ["run", str(config), "--out", str(run), "--force", "--quiet"]


@pytest.mark.parametrize("folder", ["sparse", "supernet", "tensorboard/steps-search"])
def test_a_users_file_inside_a_folder_spt_wrote_is_refused_by_name_and_nothing_is_deleted(run, folder, capsys):
    config, path = run
    mine = path / folder / "notes.txt"
    mine.write_text("my notes")
    before = snapshot(path)
    top = path / folder.split("/")[0]
    refused(capsys, force(config, path), f"--out: {mine} was not written by spt, and --force deletes only what spt wrote "
            f"(here the folder {top}); move it out of {mine.parent}, or choose another --out")
    assert snapshot(path) == before


def test_force_deletes_every_file_spt_writes_and_keeps_the_users_own(run, capsys):
    config, path = run
    (path / "sparse" / "prompt_weights.safetensors.tmp").write_bytes(b"an interrupted write")
    (path / "notes.txt").write_text("mine")
    (path / ".spt-trash").mkdir()  # left by a clearing that was killed: emptied by the next one
    (path / ".spt-trash" / "gates.csv").write_text("old")
    assert main(force(config, path)) == 0
    capsys.readouterr()
    assert (path / "notes.txt").read_text() == "mine" and not (path / ".spt-trash").exists()
    assert not (path / "sparse" / "prompt_weights.safetensors.tmp").exists()
    assert (path / "status.json").is_file() and (path / "sparse" / "prompt_weights.safetensors").is_file()


def test_force_clears_what_compare_and_front_write(tmp_path, tiny_bert, capsys):
    """Every file spt writes in the folders of a comparison (a search per seed) and a front
    is one --force may delete: none is refused as a user's."""
    config = tiny_config(tmp_path, tiny_bert, n_train=16, search={"epochs": 1},
                         runtime={"progress": False, "threads": 1, "tensorboard": True})
    for args in (["compare", "--strategies", "spt", "first", "--seeds", "0"], ["front", "--ks", "1"]):
        out = tmp_path / args[0]
        command = [args[0], str(config), "--out", str(out), "--quiet", *args[1:]]
        assert main(command) == 0
        assert main([*command, "--force"]) == 0, capsys.readouterr().err
        assert (out / "status.json").is_file()


def test_a_rename_that_fails_puts_back_what_was_moved(run, monkeypatch, capsys):
    config, path = run
    before = snapshot(path)
    rename, calls = os.rename, []

    def fail_third(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_third)
    line = refused(capsys, force(config, path), "; nothing was deleted")
    assert line == f"error: --out: --force cannot delete {calls[2]}: Device or resource busy; nothing was deleted"
    assert snapshot(path) == before and not (path / ".spt-trash").exists() and not (path / ".spt-lock").exists()


@pytest.fixture
def unremovable(run):
    """``supernet/`` made a folder that cannot be deleted: a mount point (as root), else read-only."""
    config, path = run
    folder = path / "supernet"
    if IS_ROOT:
        saved = {p.name: p.read_bytes() for p in folder.iterdir()}
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        for name, data in saved.items():
            (folder / name).write_bytes(data)
        yield config, path, "it is a mount point"
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield config, path, "no permission to delete what it holds (read-only)"
        folder.chmod(0o755)


def test_a_folder_that_cannot_be_removed_leaves_the_run_as_it_was(unremovable, capsys):
    config, path, problem = unremovable
    before = snapshot(path)
    refused(capsys, force(config, path), f"--out: --force cannot delete {path / 'supernet'}: {problem}; nothing was deleted")
    assert snapshot(path) == before
