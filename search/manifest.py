"""The manifest of a run directory: what spt wrote there, so that ``--force`` deletes
exactly that.

``.spt-manifest.json`` lists the job's stages and every top-level file and folder spt
created in the directory; :class:`~search.runs.RunDir` adds a name the first time a job
writing the directory asks for it. Clearing deletes the listed names (and a ``.tmp`` left
by an interrupted write of one of them), never anything else: a user's own files stay,
and a folder without a manifest is never cleared.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from spt.errors import UserError
from spt.files import read_text, write_json_atomic
from spt.schema import Field, validate

MANIFEST_FILE = ".spt-manifest.json"
STATUS_FILE = "status.json"  # which stages of a run are done (search.runs writes it; clearing and reports read the name)
FORMAT = "spt-run-manifest"


class Manifest:
    """The job's ``stages`` and the ``entries`` (top-level names) spt wrote in ``directory``."""

    def __init__(self, directory: Path, stages: Iterable[str] = (), entries: Iterable[str] = ()) -> None:
        self.directory = directory
        self.stages = sorted(set(stages))
        self.entries = set(entries)

    @property
    def path(self) -> Path:
        return self.directory / MANIFEST_FILE

    @classmethod
    def read(cls, directory: Path) -> Manifest | None:
        """The manifest of ``directory`` (``None``: it has none); a damaged one is a :class:`UserError`."""
        path = directory / MANIFEST_FILE
        if not path.is_file():
            return None
        fix = "restore it, or remove the folder yourself (spt deletes only files a manifest lists)"
        try:
            data = json.loads(read_text(path, "--out"))
        except json.JSONDecodeError as exc:
            raise UserError("--out", f"{path} is damaged (not valid JSON: {exc.msg}); {fix}") from None
        try:
            data = validate(data, MANIFEST, str(path))
        except UserError as exc:  # "--out: <file> is damaged (<field>: <problem>); <fix>"
            raise UserError("--out", f"{path} is damaged ({exc.problem}); {fix}") from None
        return cls(directory, data["stages"], data["entries"])

    def add(self, name: str) -> None:
        """Record that spt writes the top-level entry holding ``name`` (saved at once)."""
        top = Path(name).parts[0]
        if top not in self.entries and top != MANIFEST_FILE:
            self.entries.add(top)
            self.save()

    def add_stages(self, stages: Iterable[str]) -> None:
        self.stages = sorted(set(self.stages) | set(stages))
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, {"format": FORMAT, "version": 1, "stages": self.stages, "entries": sorted(self.entries)})


def _plain_name(entry: object) -> bool:
    """A name inside the directory: no separator, not ``..`` (a manifest never reaches outside)."""
    return isinstance(entry, str) and entry not in ("", ".", "..") and "/" not in entry and "\\" not in entry


MANIFEST = {  # what .spt-manifest.json holds (see spt.schema)
    "format": Field(str, check=lambda v: v == FORMAT, must=repr(FORMAT)),
    "version": Field(int, required=False),
    "stages": Field(list[str]),
    "entries": Field(list[str], check=lambda names: all(map(_plain_name, names)), must="names inside the folder"),
}
