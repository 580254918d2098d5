"""Save, reload and push converted models, as PEFT and timm users save theirs.

    save_pretrained(model, "out/dir", context_source=source)
    model = from_pretrained("out/dir")                        # or a Hub repo id
    source = load_context_source("out/dir")                   # None when none was saved
    push_to_hub(model, "user/name", private=True, context_source=source)

A saved folder holds:

- ``model.safetensors``: the converted model's state dict (shared tensors, e.g. tied
  embeddings, stored once);
- ``config.json``: the base model's own config, as its library writes it (a transformers
  config, or timm's ``architecture`` / ``num_classes`` / ``model_args`` / ``pretrained_cfg``);
- ``ctxnorm_config.json``: how it was converted (strategy, K, priors, layer_norm mode, every
  converted module with its original class and its eps / momentum), the context source
  summary and the ctxnorm_hf version;
- ``README.md``: a model card rendered from ``model_cards/ctxnorm_model_card.md``;
- ``context_source.json`` / ``context_source.safetensors`` when a context source is saved.

Loading rebuilds the base model from its config with random weights, converts exactly the
saved modules with the saved options, and loads the weights strictly: a missing or an
unexpected key is an error.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
import tempfile
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .contexts.base import CONFIG_NAME as CONTEXT_SOURCE_CONFIG_NAME
from .contexts.base import TENSORS_NAME as CONTEXT_SOURCE_TENSORS_NAME
from .contexts.base import ContextSource
from .norms.base import IdConditionedNorm
from .surgery import REPORT_ATTRIBUTE, ConversionReport, convert_norms, converted_layers

PathLike = Union[str, "os.PathLike[str]"]

WEIGHTS_NAME = "model.safetensors"
BASE_CONFIG_NAME = "config.json"
CTXNORM_CONFIG_NAME = "ctxnorm_config.json"
MODEL_CARD_NAME = "README.md"
MODEL_CARD_FILE = "ctxnorm_model_card.md"
MODEL_CARD_TEMPLATES = (
    Path(__file__).resolve().parent.parent / "model_cards" / MODEL_CARD_FILE,  # source tree (pip install -e .)
    Path(sys.prefix) / "share" / "ctxnorm_hf" / "model_cards" / MODEL_CARD_FILE,  # pyproject's data-files
)
LIBRARY_NAME = "ctxnorm_hf"
REQUIRED_FILES = (CTXNORM_CONFIG_NAME, BASE_CONFIG_NAME, WEIGHTS_NAME)
CONTEXT_SOURCE_FILES = (CONTEXT_SOURCE_CONFIG_NAME, CONTEXT_SOURCE_TENSORS_NAME)

LAYER_SETTINGS = ("eps", "momentum")
"""Converted-layer attributes that convert_norms sets and the state dict does not hold."""

ResultsLike = Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]


def library_version() -> str:
    """ctxnorm_hf.__version__, read at call time (the package imports this module)."""
    import ctxnorm_hf

    return ctxnorm_hf.__version__


# --- the base model: how each library writes and rebuilds its own config ---------------------


class BaseModelFormat(ABC):
    """How one model library saves a model's own config and rebuilds the model from it."""

    library: str
    example_call: str
    """How a model of this library is called, ``{context}`` standing for the context ids argument (model card)."""

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this library."""

    @abstractmethod
    def architecture(self, model: nn.Module) -> str:
        """The architecture name the config records."""

    def default_base_model(self, model: nn.Module) -> Optional[str]:
        """The Hub id the weights came from, when the model knows it."""
        return None

    @abstractmethod
    def save_config(self, model: nn.Module, folder: Path, model_args: Optional[Dict[str, Any]]) -> None:
        """Write config.json into ``folder``."""

    @abstractmethod
    def build(self, folder: Path) -> nn.Module:
        """The base model (randomly initialised) described by ``folder``'s config.json."""


class TransformersFormat(BaseModelFormat):
    """config.json as ``PretrainedConfig.save_pretrained`` writes it, with ``architectures`` set."""

    library = "transformers"
    example_call = "model(pixel_values=images{context})"

    def matches(self, model: nn.Module) -> bool:
        transformers = sys.modules.get("transformers")  # a transformers model implies transformers is imported
        return transformers is not None and isinstance(model, transformers.PreTrainedModel)

    def architecture(self, model: nn.Module) -> str:
        return type(model).__name__

    def default_base_model(self, model: nn.Module) -> Optional[str]:
        name = model.config.name_or_path
        return name if name and not os.path.exists(name) else None

    def save_config(self, model: nn.Module, folder: Path, model_args: Optional[Dict[str, Any]]) -> None:
        if model_args:
            raise ValueError(
                "model_args is for timm models; a transformers model is rebuilt from its config alone "
                "(set the options on model.config instead)."
            )
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)

    def build(self, folder: Path) -> nn.Module:
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        architectures = config.architectures or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        if model_class is None:
            raise ValueError(
                f"{folder / BASE_CONFIG_NAME} names architectures {architectures}, which transformers does not "
                "provide; ctxnorm_hf rebuilds only models whose class is part of transformers."
            )
        return model_class(config)


class TimmFormat(BaseModelFormat):
    """config.json as timm's own Hub integration writes it (architecture, num_classes, model_args,
    pretrained_cfg); rebuilt with ``timm.create_model("local-dir:<folder>", pretrained=False)``."""

    library = "timm"
    example_call = "model(images{context})"

    def matches(self, model: nn.Module) -> bool:
        pretrained_cfg = getattr(model, "pretrained_cfg", None)
        return isinstance(pretrained_cfg, dict) and "architecture" in pretrained_cfg

    def architecture(self, model: nn.Module) -> str:
        return model.pretrained_cfg["architecture"]

    def save_config(self, model: nn.Module, folder: Path, model_args: Optional[Dict[str, Any]]) -> None:
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, str(folder / BASE_CONFIG_NAME), model_args=model_args)

    def build(self, folder: Path) -> nn.Module:
        import timm

        return timm.create_model(f"local-dir:{folder}", pretrained=False)


BASE_MODEL_FORMATS: Dict[str, BaseModelFormat] = {fmt.library: fmt for fmt in (TransformersFormat(), TimmFormat())}
"""library -> format; the first whose ``matches`` accepts a model saves it. Register new libraries here."""


def _is_converted(model: nn.Module) -> bool:
    return getattr(model, REPORT_ATTRIBUTE, None) is not None and bool(converted_layers(model))


def is_savable(model: nn.Module) -> bool:
    """Whether :func:`save_pretrained` accepts ``model``: converted, and a timm or transformers model."""
    model = _unwrap(model)
    return _is_converted(model) and any(fmt.matches(model) for fmt in BASE_MODEL_FORMATS.values())


def base_model_format(model: nn.Module) -> BaseModelFormat:
    for fmt in BASE_MODEL_FORMATS.values():
        if fmt.matches(model):
            return fmt
    raise ValueError(
        f"{type(model).__name__} is neither a transformers PreTrainedModel nor a timm model, so its config "
        "cannot be saved for a rebuild. Save its state_dict yourself, or convert a timm / transformers model."
    )


# --- ctxnorm_config.json -------------------------------------------------------------------------


@dataclass
class CtxnormConfig:
    """The content of ctxnorm_config.json: what is needed to convert the rebuilt base model as
    the saved one was converted, and what the model card and ``ctxnorm-hf inspect`` show.

    ``converted`` maps every converted module name to its ``original_class`` (qualified),
    ``class`` (the context layer) and the LAYER_SETTINGS values; ``priors`` are the lambda_k
    shared by the id-conditioned layers (None for ACN, whose priors are learned, or when the
    layers hold different priors: they are in the weights either way).
    """

    strategy: str
    num_contexts: int
    layer_norm: str
    priors: Optional[List[float]]
    converted: Dict[str, Dict[str, Any]]
    left_alone: Dict[str, str]
    base_model: Dict[str, Any]
    context_source: Optional[Dict[str, Any]] = None
    model_card: Dict[str, Any] = field(default_factory=dict)
    ctxnorm_hf_version: str = ""

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        fmt: BaseModelFormat,
        base_model: Optional[str],
        context_source: Optional[ContextSource],
        model_card: Dict[str, Any],
    ) -> "CtxnormConfig":
        report: ConversionReport = getattr(model, REPORT_ATTRIBUTE)
        layers = converted_layers(model)
        converted = {
            name: {
                "original_class": report.converted[name][0],
                "class": report.converted[name][1],
                **{setting: getattr(layer, setting) for setting in LAYER_SETTINGS if hasattr(layer, setting)},
            }
            for name, layer in layers.items()
        }
        return cls(
            strategy=report.strategy,
            num_contexts=report.num_contexts,
            layer_norm=report.layer_norm,
            priors=_shared_priors(layers.values()),
            converted=converted,
            left_alone=dict(report.skipped),
            base_model={
                "library": fmt.library,
                "architecture": fmt.architecture(model),
                "name_or_path": base_model,
                "dtype": _weights_dtype(model),
            },
            context_source=context_source.to_dict() if context_source is not None else None,
            model_card=model_card,
            ctxnorm_hf_version=library_version(),
        )

    def to_json_file(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def from_json_file(cls, path: Path) -> "CtxnormConfig":
        """Read ctxnorm_config.json; keys written by a newer ctxnorm_hf are ignored with a warning."""
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - data.keys())
        if missing:
            raise ValueError(f"{path} is not a valid {CTXNORM_CONFIG_NAME}: it lacks {', '.join(missing)}.")
        unknown = sorted(data.keys() - known)
        if unknown:
            warnings.warn(
                f"{path} has keys this ctxnorm_hf ({library_version()}) does not know: {', '.join(unknown)} "
                f"(written by ctxnorm_hf {data.get('ctxnorm_hf_version', '?')}). They are ignored; upgrade "
                "ctxnorm_hf if the loaded model does not behave as saved.",
                UserWarning,
                stacklevel=3,
            )
        return cls(**{key: value for key, value in data.items() if key in known})

    def report(self) -> ConversionReport:
        """The ConversionReport of the saved conversion."""
        converted = {name: (site["original_class"], site["class"]) for name, site in self.converted.items()}
        return ConversionReport(self.strategy, self.num_contexts, self.layer_norm, converted, dict(self.left_alone))


def _weights_dtype(model: nn.Module) -> str:
    """The floating dtype of the model's parameters ("float32", "bfloat16", ...)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def _shared_priors(layers: Any) -> Optional[List[float]]:
    """The lambda_k all id-conditioned layers share, renormalised in float64 (a bfloat16 buffer's
    1/3 does not sum to 1), or None."""
    priors = [layer.priors for layer in layers if isinstance(layer, IdConditionedNorm)]
    if priors and all(torch.equal(p, priors[0]) for p in priors):
        shared = priors[0].detach().double().cpu()
        return (shared / shared.sum()).tolist()
    return None


def read_ctxnorm_config(folder: PathLike) -> CtxnormConfig:
    """The CtxnormConfig of a folder written by :func:`save_pretrained`; a clear error otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    path = folder / CTXNORM_CONFIG_NAME
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a converted model: it has no {CTXNORM_CONFIG_NAME}. "
            "Write one with ctxnorm_hf.save_pretrained(model, folder) or `ctxnorm-hf convert`."
        )
    return CtxnormConfig.from_json_file(path)


def check_saved_folder(folder: Path) -> CtxnormConfig:
    """The CtxnormConfig of a complete folder written by :func:`save_pretrained`; a clear error otherwise."""
    config = read_ctxnorm_config(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"{folder} is incomplete: it lacks {', '.join(missing)}. Save the model again with save_pretrained."
        )
    return config


# --- model card --------------------------------------------------------------------------------


STRATEGY_TITLES = {
    "cn": "Context Normalization (CN)",
    "cnx": "Context Normalization Extended (CN-X)",
    "acn": "Adaptive Context Normalization (ACN)",
    "mixnorm": "Mixture Normalization (baseline)",
    "modenorm": "Mode Normalization (baseline)",
}
STRATEGIES_WITH_IDS = {"cn", "cnx"}
ASSIGN_EXAMPLES = {
    "superclass": "source.assign(labels)  # oracle ids: they come from the labels",
    "kmeans": "source.assign(images)  # nearest k-means centroid, from the input alone",
    "domain": 'source.assign("<domain name>", len(images))',
}


def _as_rows(results: Optional[ResultsLike]) -> List[Dict[str, Any]]:
    """Rows of the card's results table: a mapping is one row, a sequence of mappings several;
    numpy / torch scalars become Python numbers so the rows go into JSON."""
    if not results:
        return []
    rows = [results] if isinstance(results, Mapping) else list(results)
    return [{str(key): value.item() if hasattr(value, "item") else value for key, value in row.items()} for row in rows]


def _results_table(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if not rows:
        return None
    columns: List[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    return {"columns": columns, "rows": [[_cell(row.get(column, "")) for column in columns] for row in rows]}


def _priors_text(config: CtxnormConfig) -> str:
    if config.priors is not None:
        return ", ".join(f"{p:.4g}" for p in config.priors)
    return "learned by every layer" if config.strategy == "acn" else "per layer, in the weights"


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_model_card(config: CtxnormConfig, model_id: str) -> str:
    """The README.md of a saved model: YAML metadata, how to load it, conversion and results."""
    from huggingface_hub import ModelCard, ModelCardData

    template = next((path for path in MODEL_CARD_TEMPLATES if path.is_file()), None)
    if template is None:
        raise FileNotFoundError(
            f"The model card template is missing (looked in {', '.join(map(str, MODEL_CARD_TEMPLATES))}); "
            "reinstall ctxnorm_hf (pip install -e . from its source tree)."
        )
    card_info = config.model_card
    base = config.base_model
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base.get("name_or_path"),
        datasets=card_info.get("datasets") or None,
        metrics=card_info.get("metrics") or None,
        license=card_info.get("license"),
        tags=[LIBRARY_NAME, "context-normalization", config.strategy, base["library"], *card_info.get("tags", [])],
    )
    classes: Dict[Tuple[str, str], int] = {}
    for site in config.converted.values():
        key = (site["original_class"], site["class"])
        classes[key] = classes.get(key, 0) + 1
    fmt = BASE_MODEL_FORMATS.get(base["library"])
    source = config.context_source
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_id=model_id,
        architecture=base["architecture"],
        library=base["library"],
        base_model_id=base.get("name_or_path"),
        strategy=config.strategy,
        strategy_title=STRATEGY_TITLES.get(config.strategy, config.strategy),
        uses_ids=config.strategy in STRATEGIES_WITH_IDS,
        num_contexts=config.num_contexts,
        layer_norm=config.layer_norm,
        priors=_priors_text(config),
        call=(fmt.example_call if fmt else "model(inputs{context})").format(
            context=", context_ids=ids" if config.strategy in STRATEGIES_WITH_IDS else ""
        ),
        converted_classes=sorted((original, new, count) for (original, new), count in classes.items()),
        num_converted=len(config.converted),
        num_left_alone=len(config.left_alone),
        source=source,
        assign_example=ASSIGN_EXAMPLES.get(source["kind"], "source.assign(batch)") if source else None,
        results=_results_table(card_info.get("results", [])),
        version=config.ctxnorm_hf_version,
    )
    return str(card)


def write_model_card(folder: PathLike, model_id: Optional[str] = None) -> None:
    """(Re)write ``folder``/README.md from its ctxnorm_config.json; the loading snippet uses
    ``model_id`` (a Hub repo id), or the folder path by default."""
    config = read_ctxnorm_config(folder)
    (Path(folder) / MODEL_CARD_NAME).write_text(render_model_card(config, model_id or str(folder)))


# --- save --------------------------------------------------------------------------------------


def _wrapped_attributes() -> Dict[type, str]:
    """Wrapper class -> the attribute holding the wrapped model."""
    from torch._dynamo.eval_frame import OptimizedModule

    return {OptimizedModule: "_orig_mod", nn.DataParallel: "module", nn.parallel.DistributedDataParallel: "module"}


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / DDP / DataParallel wrappers."""
    wrappers = _wrapped_attributes()
    while type(model) in wrappers:
        model = getattr(model, wrappers[type(model)])
    return model


def save_pretrained(
    model: nn.Module,
    save_directory: PathLike,
    *,
    context_source: Optional[ContextSource] = None,
    model_args: Optional[Dict[str, Any]] = None,
    model_id: Optional[str] = None,
    base_model: Optional[str] = None,
    datasets: Sequence[str] = (),
    metrics: Sequence[str] = (),
    results: Optional[ResultsLike] = None,
    license: Optional[str] = None,
    tags: Sequence[str] = (),
) -> Path:
    """Save a model converted by convert_norms (and its context source) into ``save_directory``.

    Args:
        model: a timm or transformers model converted with :func:`ctxnorm_hf.convert_norms`
            (DDP / torch.compile wrappers are unwrapped).
        save_directory: created if needed; files of a previous save are overwritten, and a
            context source saved there before is removed when none is given now.
        context_source: fitted source of the model's context ids, saved with its own ``save``.
        model_args: timm only: ``create_model`` arguments timm cannot record itself (replacements
            for non-JSON-serialisable ones), as for ``timm.models.push_to_hf_hub``.
        model_id: how the model card's loading snippet names the model (default: the folder).
        base_model: Hub id of the pretrained weights the model started from (model card
            metadata); by default a transformers model's ``name_or_path`` when it is a Hub id.
        datasets, metrics, license, tags: model card metadata.
        results: the card's results table: one row as {column: value} or a list of rows
            (e.g. [{"protocol": "oracle ids", "accuracy": 0.91}, {"protocol": "inferred ids", ...}]).

    Returns:
        The folder path.
    """
    model = _unwrap(model)
    if not _is_converted(model):
        raise ValueError(
            f"{type(model).__name__} is not converted: call ctxnorm_hf.convert_norms(model, strategy, K) first "
            "(a plain model is saved by its own library: model.save_pretrained or timm's save_for_hf)."
        )
    report: ConversionReport = getattr(model, REPORT_ATTRIBUTE)
    if context_source is not None:
        _check_context_source(context_source, report.num_contexts)
    fmt = base_model_format(model)
    card_info = {
        "datasets": list(datasets),
        "metrics": list(metrics),
        "results": _as_rows(results),
        "license": license,
        "tags": list(tags),
    }
    config = CtxnormConfig.from_model(
        model, fmt, base_model or fmt.default_base_model(model), context_source, card_info
    )
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    fmt.save_config(model, folder, model_args)  # first: it rejects arguments it cannot record
    save_model(model, str(folder / WEIGHTS_NAME), metadata={"format": "pt"}, force_contiguous=True)
    config.to_json_file(folder / CTXNORM_CONFIG_NAME)
    if context_source is not None:
        context_source.save(folder)
    else:
        for name in CONTEXT_SOURCE_FILES:
            (folder / name).unlink(missing_ok=True)
    write_model_card(folder, model_id or str(save_directory))
    return folder


def _check_context_source(source: ContextSource, num_contexts: int) -> None:
    if not source.is_fitted:
        raise ValueError(f"{source!r} is not fitted: fit it on the training data before saving it with the model.")
    if source.num_contexts != num_contexts:
        raise ValueError(
            f"The context source gives {source.num_contexts} contexts but the model was converted with "
            f"K={num_contexts}; save the source the model was trained with."
        )


# --- load --------------------------------------------------------------------------------------


@dataclass
class HubLocation:
    """Where to fetch a model that is not a local folder (arguments of huggingface_hub.hf_hub_download)."""

    revision: Optional[str] = None
    token: Union[str, bool, None] = None
    cache_dir: Optional[PathLike] = None
    endpoint: Optional[str] = None


def resolve_folder(name_or_path: PathLike, files: Sequence[str], optional: Sequence[str], hub: HubLocation) -> Path:
    """A local folder holding ``files`` (and ``optional`` files when they exist): ``name_or_path``
    itself when it is a folder, else the cached snapshot of the Hub repo ``name_or_path``."""
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RemoteEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        raise FileNotFoundError(f"{name_or_path} is neither a folder nor a Hub repo id (user/name).") from None

    def download(filename: str) -> Path:
        return Path(
            hf_hub_download(
                str(name_or_path),
                filename,
                revision=hub.revision,
                token=hub.token,
                cache_dir=hub.cache_dir,
                endpoint=hub.endpoint,
                library_name=LIBRARY_NAME,
                library_version=library_version(),
            )
        )

    try:
        folder = download(files[0]).parent
    except RemoteEntryNotFoundError:
        raise ValueError(
            f"The Hub repo {name_or_path} is not a converted model: it has no {files[0]} "
            "(push one with ctxnorm_hf.push_to_hub or `ctxnorm-hf push`)."
        ) from None
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{name_or_path} is not a local folder and could not be fetched from the Hub: {error}"
        ) from None
    for filename in files[1:]:
        download(filename)
    for filename in optional:
        try:
            download(filename)
        except RemoteEntryNotFoundError:
            pass
    return folder


def rebuild(folder: Path, config: CtxnormConfig) -> nn.Module:
    """The saved base model, converted as the saved one was (weights not loaded yet)."""
    fmt = BASE_MODEL_FORMATS.get(config.base_model.get("library"))
    if fmt is None:
        raise ValueError(
            f"{folder / CTXNORM_CONFIG_NAME} describes a {config.base_model.get('library')!r} model; this "
            f"ctxnorm_hf rebuilds {', '.join(BASE_MODEL_FORMATS)} models. Upgrade ctxnorm_hf."
        )
    # The base model's random init and ACN's symmetry-breaking noise are overwritten by the
    # weights: keep the caller's random stream as it was.
    with torch.random.fork_rng(devices=[]):
        model = fmt.build(folder)
        names = list(config.converted)
        convert_norms(
            model,
            config.strategy,
            config.num_contexts,
            priors=config.priors,
            target_modules="|".join(re.escape(name) for name in names),
            layer_norm=config.layer_norm,
        )
    layers = converted_layers(model)
    rebuilt = {name: type(layer).__name__ for name, layer in layers.items()}
    saved = {name: site["class"] for name, site in config.converted.items()}
    if rebuilt != saved:
        differing = sorted(set(rebuilt.items()) ^ set(saved.items()))[:5]
        raise ValueError(
            f"Converting the rebuilt {config.base_model.get('architecture')} does not give the saved layers "
            f"(first differences, name and class: {differing}). The folder was written by another version of "
            "the model or of ctxnorm_hf."
        )
    for name, layer in layers.items():
        for setting in LAYER_SETTINGS:
            if setting in config.converted[name]:
                setattr(layer, setting, config.converted[name][setting])
    setattr(model, REPORT_ATTRIBUTE, config.report())
    return model


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load ``path`` into ``model``; any missing, unexpected or mis-shaped key is an error."""
    try:
        missing, unexpected = load_model(model, path, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"{path} does not fit the model rebuilt from its folder's configs: {error}") from None
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the model rebuilt from its folder's configs: "
            f"missing keys {sorted(missing)[:10]}, unexpected keys {sorted(unexpected)[:10]}"
            f"{' (first 10 shown)' if max(len(missing), len(unexpected)) > 10 else ''}. "
            "Save the model again with ctxnorm_hf.save_pretrained."
        )


def from_pretrained(
    name_or_path: PathLike,
    *,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Optional[PathLike] = None,
    endpoint: Optional[str] = None,
) -> nn.Module:
    """Load a model written by :func:`save_pretrained` / :func:`push_to_hub`, in eval mode.

    Args:
        name_or_path: a local folder, or a Hub repo id ("user/name").
        device, dtype: where and in which floating dtype to put the model (default: CPU and the
            dtype of the saved weights).
        revision, token, cache_dir, endpoint: for Hub repos, as in huggingface_hub.hf_hub_download.

    The base model is rebuilt from the saved config.json, the saved modules are converted with
    the saved options, and model.safetensors is loaded strictly. The global random state is
    left as it was. ``model.ctxnorm_conversion`` is the report of the original conversion.
    """
    hub = HubLocation(revision, token, cache_dir, endpoint)
    folder = resolve_folder(name_or_path, REQUIRED_FILES, (), hub)
    config = check_saved_folder(folder)
    model = rebuild(folder, config)
    _load_weights(model, folder / WEIGHTS_NAME)
    saved_dtype = getattr(torch, config.base_model.get("dtype", "float32"))
    return model.to(device=device, dtype=dtype or saved_dtype).eval()


def load_context_source(
    name_or_path: PathLike,
    *,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Optional[PathLike] = None,
    endpoint: Optional[str] = None,
) -> Optional[ContextSource]:
    """The context source saved with a model (local folder or Hub repo id), or None when none was saved."""
    hub = HubLocation(revision, token, cache_dir, endpoint)
    folder = resolve_folder(name_or_path, (CTXNORM_CONFIG_NAME,), CONTEXT_SOURCE_FILES, hub)
    if not (folder / CONTEXT_SOURCE_CONFIG_NAME).is_file():
        return None
    return ContextSource.load(folder)


# --- push --------------------------------------------------------------------------------------


def push_folder_to_hub(
    folder: PathLike,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Union[str, bool, None] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    endpoint: Optional[str] = None,
) -> Any:
    """Upload a folder written by :func:`save_pretrained` to the Hub repo ``repo_id``.

    The repo is created if needed (``private`` applies only then), and so is the branch
    ``revision``. Every file of the folder is uploaded in one commit. Returns the
    huggingface_hub CommitInfo (``.commit_url``, ``.oid``, ``.pr_url``).
    """
    from huggingface_hub import HfApi

    config = check_saved_folder(Path(folder))
    api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=library_version())
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
    message = commit_message or (
        f"Upload {config.base_model.get('architecture')} converted with ctxnorm_hf "
        f"({config.strategy}, K={config.num_contexts})"
    )
    return api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=str(folder),
        commit_message=message,
        revision=revision,
        create_pr=create_pr,
    )


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Union[str, bool, None] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    context_source: Optional[ContextSource] = None,
    endpoint: Optional[str] = None,
    **save_kwargs: Any,
) -> Any:
    """Save ``model`` (and ``context_source``) as :func:`save_pretrained` does and upload exactly
    that folder to the Hub repo ``repo_id``; the model card's loading snippet uses ``repo_id``.

    Args:
        private: make the repo private when it is created (None: the Hub's default).
        token: Hub token (default: the saved login or HF_TOKEN).
        revision: branch to push to, created from main if missing.
        commit_message: summary of the commit.
        create_pr: open a pull request instead of committing to the branch.
        endpoint: Hub endpoint (default: HF_ENDPOINT or https://huggingface.co).
        save_kwargs: save_pretrained's model card and model_args arguments.

    Returns:
        huggingface_hub's CommitInfo.
    """
    with tempfile.TemporaryDirectory(prefix="ctxnorm_hf-") as folder:
        save_pretrained(model, folder, context_source=context_source, model_id=repo_id, **save_kwargs)
        return push_folder_to_hub(
            folder,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            endpoint=endpoint,
        )
