"""The README as a user reads it: every `spt` command line it shows parses, and its Python
snippet runs as written (on a tiny run put where the snippet looks)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import tiny_config

from search.cli import build_parser, main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def _command_lines() -> list[str]:
    lines = []
    for language, body in BLOCKS:
        if language != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("spt "):
                lines.append(line[len("spt "):])
            elif " -m search " in line:
                lines.append(line.split(" -m search ", 1)[1])
    return lines


def test_the_readme_shows_commands_of_every_kind():
    shown = {shlex.split(line)[0] for line in _command_lines()}
    assert {"run", "search", "select", "retrain", "predict", "evaluate", "runs", "plot", "compare", "hpo", "models", "estimate"} <= shown


@pytest.mark.parametrize("line", _command_lines())
def test_every_command_line_in_the_readme_parses(line):
    try:
        build_parser().parse_args(shlex.split(line))
    except SystemExit as exc:  # --help and --version exit 0; a bad line exits 2
        assert exc.code == 0, line


def test_the_python_snippets_run_as_written(tmp_path, tiny_bert, monkeypatch, capsys):
    snippets = [body for language, body in BLOCKS if language == "python"]
    config = tiny_config(tmp_path, tiny_bert)
    monkeypatch.chdir(tmp_path)
    for command, out in (("run", "runs/sst2-k2"), ("search", "runs/sst2"), ("search", "runs/rte")):  # where the snippets look
        assert main([command, str(config), "--out", out, "--quiet", "--set", f"task.name={Path(out).name}"]) == 0
    for snippet in snippets:
        capsys.readouterr()
        exec(compile(snippet, "README.md", "exec"), {})
        printed = capsys.readouterr().out.splitlines()
        if "predict" in snippet:
            assert len(printed) == 2 and all(line.split()[0] in ("0", "1") for line in printed)
    assert len(snippets) >= 2 and (tmp_path / "heatmap.pdf").is_file()


def test_the_demo_figures_in_the_readme_are_the_measured_ones():
    import json

    demo = json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "demo" / "demo.json").read_text())
    paragraph = README[README.index("The demo (700"):README.index("Both targets create")]
    for key in ("wall_minutes", "search_seconds", "retrain_seconds", "dev_accuracy", "test_accuracy", "date"):
        assert str(demo[key]) in paragraph, key
    assert str(demo["selected_layers"]) in paragraph


def test_the_test_count_in_the_readme_is_what_pytest_collects():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "tests"],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    collected = re.search(r"^(\d+) tests collected", done.stdout, flags=re.M)
    assert collected, done.stdout[-2000:] + done.stderr[-2000:]
    stated = re.search(r"`make test` runs the suite \((\d+) tests", README)
    assert stated and stated.group(1) == collected.group(1), f"README says {stated and stated.group(1)}, pytest collects {collected.group(1)}"


def test_docs_and_sources_point_only_inside_the_repository():
    """Every Markdown link in README.md and docs/ resolves inside the repository, and no file
    sends a reader to a design document outside it (data under ../shared/data is the one
    thing read from beside the clone)."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    for name in tracked:
        if name.endswith((".py", ".md", ".yaml", ".toml")) and name != "tests/test_readme.py":
            text = (repo / name).read_text(encoding="utf-8", errors="replace")
            assert "DESIGN.md" not in text, f"{name} points to DESIGN.md, outside the repository; point to docs/"
    for page in ["README.md", *[n for n in tracked if n.startswith("docs/") and n.endswith(".md")]]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (repo / page).read_text()):
            if "://" in target:
                continue
            resolved = ((repo / page).parent / target).resolve()
            assert resolved.is_relative_to(repo) and resolved.exists(), f"{page} links to {target}"
