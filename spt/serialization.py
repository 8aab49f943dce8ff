"""Save and load prompt models: a JSON config plus safetensors weights, no pickle.

A saved model directory holds ``prompt_config.json`` (what to rebuild),
``prompt_weights.safetensors`` (only the trainable tensors: generators, gates, head) and a
``README.md`` model card with Hugging Face metadata. The frozen backbone is referenced by
name and loaded from its own files (quantized again as ``quantize`` records: a quantized
backbone's weights are never saved). A model can be loaded from a hub repo ("user/name"),
which is downloaded into (or, offline, read from) the Hugging Face cache.

Loading checks every file: each tensor against its checksum, every field of the config
(:data:`MODEL_CONFIG`), and the config against the fields the weights file recorded when it
was saved (:data:`BOUND_FIELDS`), so a damaged or hand-edited model is refused, not loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from .backbone import Backbone, load_backbone
from .backbone.quantize import EXTRA, MODES, check_quantize
from .config import HeadConfig, PromptConfig, config_from_dict, to_dict
from .errors import ConfigError, UserError
from .files import CHECKSUM_KEY, read_text, save_tensors_atomic, tensor_sha256, write_json_atomic, write_text_atomic
from .hub import hub_model_id, is_hub_repo_id, looks_like_path
from .schema import Field, at_least, distinct, validate

if TYPE_CHECKING:  # the model classes import this module to save and load themselves
    from .model import PromptModel

logger = logging.getLogger("spt")

FORMAT = "spt-prompt-model"
# 2: the generators of a model are one stack (generators.down.A holds every layer's A);
# 3: the weights file records the config fields that decide what its tensors mean (BOUND_KEY).
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
BOUND_KEY = "spt_config"  # safetensors metadata: JSON of BOUND_FIELDS as saved
CONFIG_FILE = "prompt_config.json"
WEIGHTS_FILE = "prompt_weights.safetensors"
CARD_FILE = "README.md"
LIBRARY = "spt-search"  # the model card's library_name
CARD_TAGS = ["selective-prompt-tuning", "prompt-tuning", "parameter-efficient-fine-tuning", "text-classification"]


def read_tensor_file(path: Path, what: str = "checkpoint", fix: str = "",
                     checksums: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, every tensor checked against its
    checksum; a missing, corrupt or damaged file is a :class:`UserError` for ``what``
    ending in ``fix`` (what to do about it). ``checksums=False``: a file without a checksum
    list is read unchecked (a model saved before spt-search wrote them)."""
    if not path.is_file():
        raise UserError(what, f"{path} does not exist")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(what, f"{path} is corrupt or not a safetensors file ({exc}){fix}") from None
    verify_checksums(tensors, metadata, path, what, fix, required=checksums)
    return tensors, metadata


def verify_checksums(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, what: str, fix: str = "",
                     required: bool = True) -> None:
    """Compare every tensor with the checksum written beside it. A file without a checksum
    list is refused (unless not ``required``): spt-search writes one into every tensor file,
    so a file without one was altered, and its tensors cannot be trusted."""
    if CHECKSUM_KEY not in metadata:
        if required:
            raise UserError(what, f"{path} has no checksum list ({CHECKSUM_KEY} in its metadata), which spt-search "
                            f"writes into every tensor file: it was altered or not written by spt-search{fix}")
        return
    try:
        expected = json.loads(metadata[CHECKSUM_KEY])
    except json.JSONDecodeError:
        raise UserError(what, f"{path} is damaged (its checksums are unreadable){fix}") from None
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        raise UserError(what, f"{path} is damaged (its tensors do not match its checksum list){fix}")
    for name, tensor in tensors.items():
        if tensor_sha256(tensor) != expected[name]:
            raise UserError(what, f"{path} is damaged: tensor {name} does not match its checksum{fix}")


def backbone_reference(name: str, directory: Path) -> str:
    """How a saved model names its backbone: an alias or hub id as given; a local model
    directory relative to the saved model's folder (never an absolute path)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return os.path.relpath(path.resolve(), directory.resolve())
    return name


def save_prompt_model(model: PromptModel, directory: str | os.PathLike) -> Path:
    """Write ``model``'s config and trainable weights to ``directory``."""
    from . import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "kind": model.KIND,
        "backbone": backbone_reference(model.backbone.name, directory),
        "backbone_fingerprint": model.backbone.fingerprint(),
        "quantize": model.backbone.quantize,
        "model_type": model.backbone.config.model_type,
        "num_layers": model.backbone.num_layers,
        "hidden_size": model.backbone.hidden_size,
        "vocab_size": model.backbone.config.vocab_size,
        "layers": model.layers,
        "labels": model.labels,
        "max_length": model.max_length,
        "instruction": model.instruction,
        "prompt": to_dict(model.prompt_config),
        "head": to_dict(model.head_config),
        "trainable_params": model.num_trainable_parameters(),
        "spt_search_version": __version__,
    }
    bound = json.dumps({name: config[name] for name in BOUND_FIELDS}, sort_keys=True)
    save_tensors_atomic(model.trainable_state_dict(), directory / WEIGHTS_FILE, {"format": FORMAT, BOUND_KEY: bound})
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


def write_model_card(directory: Path, metrics: dict[str, Any] | None = None, repo_id: str | None = None) -> Path:
    """``README.md`` beside a saved model: YAML metadata the hub reads (library, base model, tags,
    scores) above what it is, how it scores and how to load it (from ``repo_id`` where given,
    else from ``directory``)."""
    from huggingface_hub import ModelCard

    config = read_model_config(directory)
    data = card_data(config, directory, metrics, repo_id)
    body = _card_body(config, metrics, repo_id or str(directory), needs_backbone=data.base_model is None)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")  # parses the YAML back: a bad card fails here
    return write_text_atomic(directory / CARD_FILE, str(card))


def card_data(config: dict[str, Any], directory: Path, metrics: dict[str, Any] | None = None,
              repo_id: str | None = None) -> Any:
    """The model card's metadata (a ``huggingface_hub.ModelCardData``). ``base_model`` is the
    backbone's hub id (an alias's source repo); a backbone saved as a local folder has none."""
    from huggingface_hub import EvalResult, ModelCardData

    reference = config["backbone"]
    base = None if (directory / reference).is_dir() else hub_model_id(reference)
    fields: dict[str, Any] = {}
    if metrics:
        m, task = metrics.get("metric", "accuracy"), metrics.get("task") or "task"
        # The hub names splits train / validation / test; spt's dev split is the validation split.
        scores = [(split, metrics[key][m]) for key, split in (("dev", "validation"), ("test", "test")) if m in metrics.get(key, {})]
        fields["metrics"] = [m]
        fields["model_name"] = (repo_id or f"spt-{task}").split("/")[-1]  # model-index needs a name
        fields["eval_results"] = [
            EvalResult(task_type="text-classification", dataset_type=task, dataset_name=task, dataset_split=split,
                       metric_type=m, metric_value=round(float(value), 4), metric_name=f"{split} {m}")
            for split, value in scores
        ]
    return ModelCardData(library_name=LIBRARY, base_model=base, pipeline_tag="text-classification",
                         tags=CARD_TAGS + [config["model_type"]], **fields)


def _card_body(config: dict[str, Any], metrics: dict[str, Any] | None, source: str, needs_backbone: bool) -> str:
    """The human-readable part of the card: a table and how to load the model from ``source``."""
    quantized = f", linear weights quantized to {config['quantize']}" if config.get("quantize", "none") != "none" else ""
    rows = [("kind", config["kind"]), ("backbone", f"`{config['backbone']}` (fingerprint {config.get('backbone_fingerprint')}{quantized})"),
            ("prompt layers", ", ".join(map(str, config["layers"]))), ("labels", ", ".join(config["labels"])),
            ("prompt length", config["prompt"]["length"]), ("max length", config.get("max_length")),
            ("trainable parameters", f"{config['trainable_params']:,}"), ("spt-search", config.get("spt_search_version"))]
    if metrics:
        m = metrics.get("metric", "accuracy")
        rows = [("task", metrics.get("task"))] + rows
        rows += [(f"{split} {m}", f"{metrics[split][m]:.4f}") for split in ("dev", "test") if m in metrics.get(split, {})]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    # A backbone saved as a local folder does not travel with the model: the loader must name it.
    backbone = ', backbone="the backbone it was trained on"' if needs_backbone else ""
    return (f"# Selective prompt tuning model\n\nPrompts generated at layers {config['layers']} of a frozen "
            f"`{config['model_type']}` backbone (spt-search).\n\n| | |\n|---|---|\n{table}\n\n## Use\n\n"
            f"```python\nfrom spt import SparsePromptModel\n\nmodel = SparsePromptModel.from_pretrained({json.dumps(source)}{backbone})\n"
            "print(model.predict([\"a text to classify\"]))\n```\n\nor `spt predict RUN_DIR --input texts.txt`.\n")


# The fields of prompt_config.json that decide what the saved tensors mean: the weights file
# records them (BOUND_KEY), so a config edited to other layers of the same count is refused.
BOUND_FIELDS = ("kind", "backbone_fingerprint", "model_type", "num_layers", "hidden_size", "vocab_size", "layers",
                "labels", "max_length", "instruction", "prompt", "head")
_POSITIVE = {"check": at_least(1), "must": "at least 1"}
MODEL_CONFIG = {  # prompt_config.json (its prompt and head sections: PromptConfig, HeadConfig)
    "kind": Field(str, check=lambda v: v in ("supernet", "sparse"), must="supernet or sparse"),
    "backbone": Field(str, check=bool, must="a backbone name or folder"),
    "backbone_fingerprint": Field(str, required=False),  # older saves lack some fields: see _check_recorded
    # model.quantize of the run (saves before it existed: none); not bound to the weights: the same
    # prompts load on the backbone quantized otherwise (load_prompt_model's quantize=)
    "quantize": Field(str, required=False, check=lambda v: v in MODES, must=f"one of {', '.join(MODES)}"),
    "model_type": Field(str, required=False),
    "num_layers": Field(int, required=False, **_POSITIVE),
    "hidden_size": Field(int, required=False, **_POSITIVE),
    "vocab_size": Field(int, required=False, **_POSITIVE),
    "layers": Field(list[int], check=lambda v: bool(v) and distinct(v) and min(v) >= 0, must="distinct layers, at least one"),
    "labels": Field(list[str], check=lambda v: len(v) >= 2 and distinct(v), must="at least two distinct labels"),
    "max_length": Field(int | None, required=False, **_POSITIVE),
    "instruction": Field(str | None, required=False),
    "prompt": Field(dict),
    "head": Field(dict),
    "trainable_params": Field(int, required=False, check=at_least(0), must="at least 0"),
    "spt_search_version": Field(str, required=False, check=lambda v: re.match(r"\d+\.\d+", v) is not None,
                                must="a version such as 0.2.0"),
}


def read_model_config(directory: Path, fix: str = "") -> dict[str, Any]:
    """A saved model's ``prompt_config.json``, every field checked (:data:`MODEL_CONFIG`, the prompt
    and head sections as configs); a damaged or hand-edited one is a :class:`UserError` naming the
    file and the field, ending in ``fix``."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UserError("model", f"{path} does not exist; is {directory} a saved prompt model?")
    try:
        config = json.loads(read_text(path, "model"))
    except json.JSONDecodeError as exc:
        raise UserError("model", f"{path} is not valid JSON ({exc})") from None
    found = config.get("format") if isinstance(config, dict) else type(config).__name__
    if found != FORMAT:
        raise UserError("model", f"{path} has format {found!r}, expected {FORMAT!r}")
    version = config.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise UserError("model", f"{path} has version {version!r}; this spt-search reads versions {READABLE_VERSIONS}")
    config = validate(config, MODEL_CONFIG, str(path), fix)
    _check_recorded(config, path, fix)
    model_sections(config, path, fix)
    return config


def _check_recorded(config: dict[str, Any], path: Path, fix: str) -> None:
    """What the schema cannot say alone: layers below the backbone's layer count, and a
    fingerprint wherever the saving spt-search recorded its version (both came together)."""
    layers, count = config["layers"], config.get("num_layers")
    if count is not None and max(layers) >= count:
        raise UserError(str(path), f"layers: must be below num_layers ({count}), got {layers}{fix}")
    if "spt_search_version" in config and "backbone_fingerprint" not in config:
        raise UserError(str(path), f"backbone_fingerprint: missing, though spt-search {config['spt_search_version']} "
                        f"records it with every model it saves{fix}")


def model_sections(config: dict[str, Any], path: Path, fix: str = "") -> tuple[PromptConfig, HeadConfig]:
    """The prompt and head sections of a saved model's config, checked as configs are."""
    try:
        return config_from_dict(PromptConfig, config["prompt"], "prompt"), config_from_dict(HeadConfig, config["head"], "head")
    except ConfigError as exc:
        raise UserError(str(path), f"{exc.field}: {exc.problem}{fix}") from None


def _saved_by(config: dict[str, Any]) -> tuple[int, int] | None:
    """The spt-search release that saved ``config`` (major, minor); None where it is not recorded
    (saved by an early 0.1.0 build, before models recorded it)."""
    found = re.match(r"(\d+)\.(\d+)", config.get("spt_search_version") or "")
    return (int(found[1]), int(found[2])) if found else None


def load_weights(directory: Path, config: dict[str, Any], fix: str) -> dict[str, torch.Tensor]:
    """The tensors of a saved model's weights file, each checked against its checksum, and the
    config fields it was saved with checked against ``config``. Only a model saved before
    spt-search 0.2.0 (which wrote checksums into every file) may lack checksums, and only one
    of format version 1 or 2 its record of the config: it loads, with a warning saying how to
    save it again."""
    path = directory / WEIGHTS_FILE
    saved_by = _saved_by(config)
    legacy = config["version"] < 3 and (saved_by is None or saved_by < (0, 2))
    tensors, metadata = read_tensor_file(path, "model weights", fix, checksums=not legacy)
    lacking = [what for what, key in (("checksums", CHECKSUM_KEY), ("a record of its config", BOUND_KEY)) if key not in metadata]
    if lacking and config["version"] < 3:
        logger.warning("%s was saved by an older spt-search without %s, so damage to it cannot be detected; save it again "
                       "to add them: spt.save_prompt_model(spt.load_prompt_model(%r), %r)", path, " or ".join(lacking),
                       str(directory), str(directory))
    _check_bound(config, metadata, directory, fix)
    return upgrade_generator_names(tensors, config["layers"])


def _check_bound(config: dict[str, Any], metadata: dict[str, str], directory: Path, fix: str) -> None:
    """Refuse a config whose :data:`BOUND_FIELDS` are not those the weights were saved with (a
    version-3 model's weights file must record them)."""
    weights = directory / WEIGHTS_FILE
    if BOUND_KEY not in metadata:
        if config["version"] >= 3:
            raise UserError(str(weights), f"{BOUND_KEY}: missing from its metadata, where every version-3 model "
                            f"records the config it was saved with{fix}")
        return
    try:
        saved = json.loads(metadata[BOUND_KEY])
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict):
        raise UserError(str(weights), f"{BOUND_KEY}: not a JSON mapping of config fields{fix}")
    for name in BOUND_FIELDS:
        ours, theirs = config.get(name), saved.get(name)
        if ours == theirs:
            continue
        if isinstance(ours, dict) and isinstance(theirs, dict):  # a section (prompt, head): name its field
            # (a field left out differs from one saved as null: compare presence too)
            key = next(key for key in sorted(set(ours) | set(theirs)) if (key in ours, ours.get(key)) != (key in theirs, theirs.get(key)))
            name, ours, theirs = f"{name}.{key}", ours.get(key, _LEFT_OUT), theirs.get(key, _LEFT_OUT)
        raise UserError(str(directory / CONFIG_FILE), f"{name}: {ours!r} is not what {WEIGHTS_FILE} was saved with "
                        f"({theirs!r}); restore it{fix}")


class _LeftOut:
    """A field absent from one side of a comparison (shown as such in the message)."""

    def __repr__(self) -> str:
        return "left out"


_LEFT_OUT = _LeftOut()


def upgrade_generator_names(tensors: dict[str, torch.Tensor], layers: list[int]) -> dict[str, torch.Tensor]:
    """Version 1 kept one generator per layer (``generators.3.down.A``); stack them as version 2 does."""
    if not any(k.startswith("generators.") and k.split(".")[1].isdigit() for k in tensors):
        return tensors
    out = {k: v for k, v in tensors.items() if not k.startswith("generators.")}
    for part in ("down", "up"):
        for name in ("A", "S", "bias"):
            keys = [f"generators.{layer}.{part}.{name}" for layer in layers]
            if all(k in tensors for k in keys):
                out[f"generators.{part}.{name}"] = torch.stack([tensors[k] for k in keys])
    return out


def resolve_backbone(config: dict[str, Any], directory: Path, with_lm_head: bool, backbone: Backbone | str | None = None,
                     origin: str | None = None, quantize: str | None = None) -> Backbone:
    """The saved model's backbone: ``backbone`` when given (a loaded one, or a name/folder), else
    the recorded reference (relative folders from the model's folder); the fingerprint must match.
    A backbone loaded here is quantized as ``quantize`` says, else as the model records.
    ``origin``: the hub repo the model was downloaded from, for the messages."""
    if isinstance(backbone, Backbone):
        resolved = backbone
    else:
        resolved = _load_backbone_of(config, directory, with_lm_head, backbone, origin, _quantize_mode(config, directory, quantize))
    differences = backbone_differences(config, resolved)
    if differences:
        raise UserError("model.backbone", f"{directory} was trained on another backbone than {resolved.name!r} "
                        f"({'; '.join(differences)}); pass the one it was trained on ({config['backbone']!r})")
    return resolved


def backbone_differences(config: dict[str, Any], backbone: Backbone) -> list[str]:
    """How ``backbone`` differs from the one a saved ``config`` records: ``"<what>: trained on
    <saved>, this one <this>"`` for the model type, layer count, hidden size and vocabulary size
    that differ, and the fingerprint (what was recorded of each; older saves lack some)."""
    this = {"model type": backbone.config.model_type, "layers": backbone.num_layers,
            "hidden size": backbone.hidden_size, "vocabulary size": backbone.config.vocab_size}
    saved = {"model type": config.get("model_type"), "layers": config.get("num_layers"),
             "hidden size": config.get("hidden_size"), "vocabulary size": config.get("vocab_size")}
    differences = [f"{what}: trained on {saved[what]}, this one {this[what]}" for what in this
                   if saved[what] is not None and saved[what] != this[what]]
    expected = config.get("backbone_fingerprint")
    if expected is not None and expected != backbone.fingerprint():
        differences.append(f"fingerprint: trained on {expected}, this one {backbone.fingerprint()}")
    return differences


def _quantize_mode(config: dict[str, Any], directory: Path, quantize: str | None) -> str:
    """``quantize`` when given, else the mode the model records; refused where it cannot run here."""
    mode = config.get("quantize", "none") if quantize is None else quantize
    try:
        check_quantize(mode)
    except UserError as exc:
        if quantize is not None:  # the caller's own choice: its message as it is
            raise
        raise UserError("quantize", f"{directory} was trained on a backbone whose linear weights were quantized to "
                        f"{mode}, which needs bitsandbytes: {EXTRA}; or load it unquantized: quantize='none' "
                        "(spt predict/evaluate --quantize none), which computes slightly different scores") from exc
    return mode


def _load_backbone_of(config: dict[str, Any], directory: Path, with_lm_head: bool, name: str | None,
                      origin: str | None, quantize: str = "none") -> Backbone:
    """Load the backbone ``name``, else the one ``config`` records, with a message saying how to name it."""
    where = f"the hub repo {origin}" if origin else str(directory)
    fix = ("pass the backbone: from_pretrained(..., backbone=NAME_OR_FOLDER), or spt predict/evaluate "
           "--backbone NAME_OR_FOLDER")
    recorded = config["backbone"]
    if name is None and not Path(recorded).expanduser().is_absolute() and (directory / recorded).is_dir():
        name = str((directory / recorded).resolve())
    elif name is None and origin is not None and looks_like_path(recorded):
        # Saved where it was trained: the backbone folder stayed there, it is not in the repo.
        raise UserError("model.backbone", f"{where} was trained on a local backbone folder ({recorded!r}, relative to "
                        f"where it was saved), which is not part of the repo; {fix}")
    try:
        return load_backbone(name or recorded, with_lm_head=with_lm_head, quantize=quantize)
    except UserError as exc:
        if exc.field == "model.quantize":  # (a family that cannot be quantized: the message says what to do)
            raise
        raise UserError("model.backbone", f"cannot load the backbone {recorded!r} that {where} was trained on "
                        f"({exc.problem}); {fix}") from None


def locate_model(name_or_path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                 cache_dir: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """The folder of a saved model and the hub repo it came from (None for a local folder).

    An existing folder comes first; a ``Path`` is always taken as a folder. A string that is no
    folder but a hub repo id ("user/name") is downloaded with ``snapshot_download`` (with
    ``HF_HUB_OFFLINE=1``, read from the Hugging Face cache); anything else is a :class:`UserError`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() or not isinstance(name_or_path, str):
        return path, None
    # a saved prompt model's repo as written: a backbone alias ("minilm-l6") names no prompt model
    repo_id = name_or_path if is_hub_repo_id(name_or_path) else None
    if repo_id is None or "/" not in repo_id:  # what push_to_hub makes is always "user/name"
        raise UserError("model", f"no folder {name_or_path!r} here, and it is not a hub repo id (user/name); give the "
                        "folder save_pretrained wrote, or the hub repo push_to_hub uploaded")
    folder = Path(_download(repo_id, revision, token, cache_dir))
    if not (folder / CONFIG_FILE).is_file():
        raise UserError("model", f"the hub repo {repo_id} holds no {CONFIG_FILE}; it is not a model that spt-search's "
                        "save_pretrained/push_to_hub wrote")
    return folder, repo_id


def _download(repo_id: str, revision: str | None, token: str | bool | None, cache_dir: str | os.PathLike | None) -> str:
    """``snapshot_download`` of a saved model's files, its failures as one :class:`UserError`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    from . import __version__

    try:
        return snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                 allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE],
                                 library_name=LIBRARY, library_version=__version__)
    except (OSError, EntryNotFoundError) as exc:  # hub errors are OSErrors: not found, gated, offline, no network
        reason = (str(exc).strip().splitlines() or [""])[0]
        at = f" at revision {revision!r}" if revision else ""
        raise UserError("model", f"no folder {repo_id!r} here, and the hub repo {repo_id}{at} cannot be fetched "
                        f"({type(exc).__name__}: {reason}); check the folder or repo id, pass token= for a private "
                        "repo, or download it where the hub is reachable (with HF_HUB_OFFLINE=1 only the local "
                        "Hugging Face cache is read)") from None


def load_trainable_state(model: PromptModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load trainable tensors, refusing missing, unexpected or misshapen ones."""
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"checkpoint: {source} does not match the model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UserError("checkpoint", f"{source}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False)
