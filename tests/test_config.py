"""The configuration: one home for each default, typed fields, self-checking sections."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import tiny_config

from search.cli import main
from search.config import SECTIONS, SearchConfig, load_config
from spt.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

# What configs/defaults.yaml sets differently from the dataclasses, and why (the file says so too).
DELIBERATE_OVERRIDES = {"task.data_dir": "our task configs read ../shared/data beside the project"}


def test_defaults_yaml_only_holds_documented_overrides():
    data = yaml.safe_load((REPO / "configs" / "defaults.yaml").read_text())
    for section, values in data.items():
        assert section in SECTIONS, section
        default = SECTIONS[section]()
        for key, value in values.items():
            name = f"{section}.{key}"
            assert hasattr(default, key), f"{name} is not a field"
            if name not in DELIBERATE_OVERRIDES:
                assert value == getattr(default, key), f"{name}: {value!r} in defaults.yaml, {getattr(default, key)!r} in the dataclass"


def test_every_shipped_config_loads_and_demo_builds_on_defaults():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if path.name != "defaults.yaml":  # a base, not a runnable config
            load_config(path)
    assert yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["base"] == "defaults.yaml"


def test_numbers_are_typed_from_yaml_1_1_text(tmp_path, tiny_bert):
    config = load_config(tiny_config(tmp_path, tiny_bert), ["search.lr=1e-3", "retrain.lr=2E-4", "search.epochs=3.0"])
    assert config.search.lr == 0.001 and isinstance(config.search.lr, float)
    assert config.retrain.lr == 0.0002 and config.search.epochs == 3 and isinstance(config.search.epochs, int)
    path = tmp_path / "typed.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(tiny_config(tmp_path, tiny_bert).read_text()), "seed": 3}).replace("epochs: 2", "epochs: '2'"))
    assert load_config(path).search.epochs == 2


@pytest.mark.parametrize("override, message", [
    ("search.lr=abc", "search.lr: expected a number, got 'abc'"),
    ("search.lr=-1e-3", "search.lr: must be > 0, got -0.001"),
    ("prompt.length=ten", "prompt.length: expected an integer, got 'ten'"),
    ("model.max_length=12.5", "model.max_length: expected an integer, got 12.5"),
    ("task.max_train=many", "task.max_train: expected an integer or null, got 'many'"),
    ("runtime.threads=two", "runtime.threads: expected an integer or null, got 'two'"),
    ("search.d1_fraction=half", "search.d1_fraction: expected a number, got 'half'"),
    ("prompt.dropout=1.5", "prompt.dropout: must be in [0, 1), got 1.5"),
    ("search.grad_clip=-1", "search.grad_clip: must be >= 0, got -1.0"),
    ("task.labels=ab", "task.labels: expected a list of strings, got 'ab'"),
    ("runtime.progress=maybe", "runtime.progress: expected true or false, got 'maybe'"),
    ("search.arch_betas=[0.5]", "search.arch_betas: must be two numbers in [0, 1)"),
])
def test_bad_values_name_the_field_exit_2_and_write_nothing(tmp_path, tiny_bert, capsys, override, message):
    config = tiny_config(tmp_path, tiny_bert)
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_sections_check_themselves_when_built_in_python():
    with pytest.raises(ConfigError, match=r"search.warmup_epochs: must be in \[0, epochs=2\), got 2"):
        SearchConfig(epochs=2, warmup_epochs=2)
    assert SearchConfig(lr="3e-4").lr == 3e-4


def test_every_config_field_is_documented_and_the_reference_is_current():
    from search.reference import reference_markdown, undocumented

    assert undocumented() == []
    assert (REPO / "docs" / "config.md").read_text() == reference_markdown(), "regenerate: python -m search.reference > docs/config.md"


def _reference_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (REPO / "docs" / "config.md").read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            assert len(cells) == 4, f"a row with {len(cells)} cells (a '|' inside a docstring?): {line[:80]}"
            rows[cells[0].strip("`")] = cells
    return rows


def _attribute_entries(cls: type) -> dict[str, str]:
    """Each field's entry read by indentation alone: an entry line sits at the section's indent
    (``    name: text`` or ``    a, b: text``), every deeper line continues it."""
    import inspect

    lines = inspect.getdoc(cls).split("Attributes:", 1)[1].splitlines()
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in lines:
        if line.startswith("    ") and not line.startswith("     "):
            head, text = line.strip().split(": ", 1)
            names = head.split(", ")
            entries.update({name: text for name in names})
        elif line.strip():
            entries.update({name: entries[name] + " " + line.strip() for name in names})
    return entries


def test_each_config_reference_row_is_its_fields_whole_docstring_entry_and_default():
    """Row by row against the dataclasses: the meaning is the field's whole ``Attributes:``
    entry (continuation lines that hold ``word:`` of their own included) and the default is
    the dataclass's."""
    import dataclasses

    rows = _reference_rows()
    for section, cls in SECTIONS.items():
        entries = _attribute_entries(cls)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            assert key in rows, f"docs/config.md has no row for {key}"
            assert rows[key][3] == entries[f.name], f"{key}: the row's meaning is not the field's docstring entry"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert rows[key][2] in (f"`{default}`", ""), f"{key}: default {rows[key][2]} in the reference, {default!r} in the class"
