"""The package as it is installed: ``python -m build`` makes a wheel and an sdist, the wheel holds
every module, and its ``spt`` starts (``--version``, ``--help``) without torch or any other
dependency installed; in this checkout, the same commands leave torch unimported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import spt

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("spt", "search", "analysis")
HEAVY = ("torch", "transformers", "yaml", "numpy", "optuna", "huggingface_hub", "matplotlib")

# Runs the CLI in a fresh interpreter and prints which heavy modules it imported.
PROBE = f"""
import sys
from search.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("loaded:", sorted(m for m in {HEAVY!r} if m in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["select", "--help"], ["compare", "--help"], ["models", "--help"]])
def test_version_and_help_do_not_import_torch(args):
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "loaded: []", done.stdout[-500:]
    if args == ["--version"]:
        assert done.stdout.splitlines()[0] == f"spt-search {spt.__version__}"
    if args == ["select", "--help"]:  # the names come from torch-free modules, not a copy
        from search.rankers import RANKERS

        assert "{" + ",".join(RANKERS) + "}" in done.stdout.replace("\n", "").replace(" ", "")


def _source_modules() -> set[str]:
    return {str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def _source_copy(target: Path) -> Path:
    """What the build reads, copied: setuptools' build/ folder in the checkout could hold stale
    modules that would end up in the wheel, and other jobs may use the checkout meanwhile."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, target / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_the_wheel_installs_alone_and_its_spt_runs(tmp_path):
    dist = tmp_path / "dist"
    source = _source_copy((tmp_path / "source").resolve())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    build = subprocess.run([sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", str(dist), str(source)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = dist.glob(f"spt_search-{spt.__version__}-py3-none-any.whl")
    (sdist,) = dist.glob(f"spt_search-{spt.__version__}.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"spt_search-{spt.__version__}.dist-info/METADATA").decode()
    assert _source_modules() <= names, sorted(_source_modules() - names)
    assert not any(n.startswith(("tests/", "configs/", "benchmarks/")) for n in names)
    assert "Requires-Dist: torch>=2.6" in metadata and "Requires-Dist: huggingface_hub>=1.0" in metadata
    with tarfile.open(sdist) as archive:
        members = {m.split("/", 1)[1] for m in archive.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md"} | _source_modules() <= members

    venv = tmp_path / "venv"  # no torch, no dependencies at all: only the wheel
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)],
                             capture_output=True, text=True, env=env)
    assert install.returncode == 0, install.stderr
    for args, expected in ((["--version"], f"spt-search {spt.__version__}\n"), (["--help"], "usage: spt ")):
        done = subprocess.run([str(venv / "bin" / "spt"), *args], cwd=tmp_path, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(expected)
