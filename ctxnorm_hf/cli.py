"""ctxnorm-hf: convert a timm or transformers model into a saved converted model, inspect one, push it.

    ctxnorm-hf convert resnet18 out/resnet18-cn --strategy cn -K 20 --num-classes 100
    ctxnorm-hf convert google/vit-base-patch16-224 out/vit-cnx --strategy cnx --context-source contexts/
    ctxnorm-hf convert vit_config/ out/vit-acn --strategy acn -K 8 --architecture ViTForImageClassification
    ctxnorm-hf inspect out/resnet18-cn
    ctxnorm-hf push out/resnet18-cn user/resnet18-cn --private

Bad input (an unknown model, a folder that is not a converted model, a Hub error) ends with
exit status 1 and a one-line reason on stderr; usage errors end with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

from torch import nn

from . import hub
from .contexts.base import ContextSource
from .surgery import LAYER_NORM_MODES, STRATEGIES, convert_norms

PROG = "ctxnorm-hf"

# --- where `convert` gets its model from ----------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """One kind of MODEL argument: how to recognise it and how to build the model (with the Hub id
    of its pretrained weights, if any, for the model card)."""

    description: str
    matches: Callable[[str], bool]
    load: Callable[[str, argparse.Namespace], Tuple[nn.Module, Optional[str]]]


def _transformers_config_file(name: str) -> Optional[Path]:
    path = Path(name)
    candidate = path / "config.json" if path.is_dir() else path
    return candidate if candidate.is_file() and candidate.suffix == ".json" else None


def _is_transformers_path(name: str) -> bool:
    config_file = _transformers_config_file(name)
    if config_file is None:
        return False
    try:
        return "model_type" in json.loads(config_file.read_text())
    except json.JSONDecodeError:
        return False


def _is_timm_name(name: str) -> bool:
    import timm

    return name.startswith("hf-hub:") or timm.is_model(name)


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if "/" not in name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _load_timm(name: str, args: argparse.Namespace) -> Tuple[nn.Module, Optional[str]]:
    import timm

    kwargs = dict(args.model_args)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    model = timm.create_model(name, pretrained=not args.random_init, **kwargs)
    return model, None if args.random_init else model.pretrained_cfg.get("hf_hub_id")


def _load_transformers(name: str, args: argparse.Namespace) -> Tuple[nn.Module, Optional[str]]:
    import transformers

    config_kwargs = dict(args.model_args)
    if args.num_classes is not None:
        config_kwargs["num_labels"] = args.num_classes
    config = transformers.AutoConfig.from_pretrained(name, **config_kwargs)
    architecture = args.architecture or (config.architectures or [None])[0]
    if architecture is None:
        if type(config) not in transformers.MODEL_MAPPING:
            raise ValueError(f"{name} names no architecture; pass --architecture (e.g. ViTForImageClassification).")
        architecture = transformers.MODEL_MAPPING[type(config)].__name__
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise ValueError(f"transformers has no model class {architecture!r}; pass --architecture with one it has.")
    config.architectures = [model_class.__name__]
    if args.random_init or Path(name).is_file():
        return model_class(config), None
    model = model_class.from_pretrained(name, config=config, ignore_mismatched_sizes=args.num_classes is not None)
    return model, None if Path(name).exists() else name


MODEL_SOURCES: Tuple[ModelSource, ...] = (
    ModelSource("a folder or config.json of a transformers model", _is_transformers_path, _load_transformers),
    ModelSource("a timm model name (timm.list_models) or hf-hub:<repo id>", _is_timm_name, _load_timm),
    ModelSource("a transformers model on the Hub (user/name)", _is_repo_id, _load_transformers),
)
"""Tried in order; the first that matches builds the model."""


def load_model(name: str, args: argparse.Namespace) -> Tuple[nn.Module, Optional[str]]:
    """Build the model ``name`` designates; a clear error when no source recognises it."""
    if (Path(name) / hub.CTXNORM_CONFIG_NAME).is_file():
        raise ValueError(
            f"{name} is already a converted model (it has {hub.CTXNORM_CONFIG_NAME}); convert the original."
        )
    for source in MODEL_SOURCES:
        if source.matches(name):
            try:
                return source.load(name, args)
            except TypeError as error:  # an argument the model does not take
                raise ValueError(f"{name} cannot be built with these arguments ({error}); check --model-arg.") from None
    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" Close timm names: {', '.join(close)}." if close else ""
    accepted = "; ".join(source.description for source in MODEL_SOURCES)
    raise ValueError(f"Unknown model {name!r}: it is not {accepted}.{hint}")


# --- argument parsing helpers -----------------------------------------------------------------------


def _key_value(text: str) -> Tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _priors(text: str) -> List[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.5,0.25,0.25, got {text!r}"
        ) from None


def _module_filter(names: Optional[Sequence[str]], regex: Optional[str]) -> Any:
    """PEFT's target_modules semantics: a regex string, or a list of names / name suffixes."""
    return regex if regex is not None else (list(names) if names else None)


# --- commands -----------------------------------------------------------------------------------------


def run_convert(args: argparse.Namespace) -> int:
    source = ContextSource.load(args.context_source) if args.context_source else None
    num_contexts = args.num_contexts if args.num_contexts is not None else (source.num_contexts if source else None)
    if num_contexts is None:
        raise ValueError("give the number of contexts with -K, or a --context-source to take it from.")
    if source is not None and source.num_contexts != num_contexts:
        raise ValueError(
            f"-K {num_contexts} disagrees with the context source, which gives {source.num_contexts} contexts."
        )
    priors = args.priors if args.priors is not None else (source.priors.tolist() if source else None)
    model, base_model = load_model(args.model, args)
    convert_norms(
        model,
        args.strategy,
        num_contexts,
        priors=priors,
        target_modules=_module_filter(args.target_modules, args.target_regex),
        exclude_modules=_module_filter(args.exclude_modules, args.exclude_regex),
        layer_norm=args.layer_norm,
        eps=args.eps,
        momentum=args.momentum,
    )
    folder = hub.save_pretrained(
        model,
        args.output,
        context_source=source,
        model_id=args.repo_id,
        base_model=base_model,
        datasets=args.dataset,
        metrics=args.metric,
        license=args.license,
    )
    print(model.ctxnorm_conversion)
    print(f"Saved to {folder}")
    return 0


def _inspect_lines(config: hub.CtxnormConfig, folder: Path, local: bool, sites: bool) -> List[str]:
    base = config.base_model
    lines = [
        f"base model:     {base.get('library')} {base.get('architecture')}"
        + (f" (from {base['name_or_path']})" if base.get("name_or_path") else ""),
        f"strategy:       {config.strategy} ({hub.STRATEGY_TITLES.get(config.strategy, '?')})",
        f"contexts K:     {config.num_contexts}",
        f"layer_norm:     {config.layer_norm}",
        "priors:         "
        + (
            ", ".join(f"{p:.4g}" for p in config.priors)
            if config.priors is not None
            else "learned or per layer (in the weights)"
        ),
    ]
    lines.append(
        f"converted:      {len(config.converted)} layers ({len(config.left_alone)} norm-like layers left alone)"
    )
    lines.extend(f"  {line.strip()}" for line in str(config.report()).splitlines()[1:])
    if sites:
        lines.extend(
            f"    {name}: {site['original_class']} -> {site['class']}" for name, site in config.converted.items()
        )
    source = config.context_source
    lines.append(
        "context source: "
        + (
            f"{source['kind']}, K={source['num_contexts']}"
            + (", ids derived from labels (oracle at test time)" if source.get("label_derived") else "")
            + (f", priors {', '.join(f'{p:.4g}' for p in source['priors'])}" if source.get("priors") else "")
            if source
            else "none"
        )
    )
    if local:
        files = sorted(path for path in folder.iterdir() if path.is_file())
        lines.append("files:          " + ", ".join(f"{path.name} ({_size(path.stat().st_size)})" for path in files))
    lines.append(f"saved with:     ctxnorm_hf {config.ctxnorm_hf_version or '?'}")
    return lines


def _size(num_bytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


def run_inspect(args: argparse.Namespace) -> int:
    location = hub.HubLocation(revision=args.revision, token=args.token)
    folder = hub.resolve_folder(args.model, (hub.CTXNORM_CONFIG_NAME,), (), location)
    config = hub.read_ctxnorm_config(folder)
    if args.json:
        print(json.dumps(dataclasses.asdict(config), indent=2))
    else:
        print("\n".join(_inspect_lines(config, folder, Path(args.model).is_dir(), args.sites)))
    return 0


def run_push(args: argparse.Namespace) -> int:
    config = hub.check_saved_folder(Path(args.folder))
    if not args.keep_card:
        hub.write_model_card(args.folder, args.repo_id)
    info = hub.push_folder_to_hub(
        args.folder,
        args.repo_id,
        private=args.private,
        token=args.token,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )
    summary = f"{config.base_model.get('architecture')} ({config.strategy}, K={config.num_contexts})"
    print(f"Pushed {summary} to {info.commit_url}")
    if info.pr_url:
        print(f"Pull request: {info.pr_url}")
    return 0


# --- the parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert timm / transformers models to context normalization (CN, CN-X, ACN), "
        "inspect converted folders, push them to the Hugging Face Hub.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert",
        help="convert a model and save it as a folder",
        description="Build a model, replace its normalization layers with context layers (convert_norms) "
        "and save it with save_pretrained: model.safetensors, config.json, ctxnorm_config.json, README.md.",
    )
    convert.add_argument(
        "model",
        help="a timm model name (resnet18, vit_tiny_patch16_224.augreg_in21k, hf-hub:timm/...), a transformers "
        "Hub repo id (google/vit-base-patch16-224) or folder (pretrained weights are loaded unless --random-init), "
        "or a transformers config.json (random weights)",
    )
    convert.add_argument("output", help="folder to write")
    convert.add_argument("--strategy", choices=STRATEGIES, default="cn", help="context layer (default: cn)")
    convert.add_argument("-K", "--num-contexts", type=int, help="number of contexts (default: the context source's)")
    convert.add_argument(
        "--priors",
        type=_priors,
        help="lambda_k, comma-separated, summing to 1 (default: the context source's shares, else uniform)",
    )
    convert.add_argument(
        "--layer-norm",
        choices=LAYER_NORM_MODES,
        default="token",
        help="LayerNorm sites: token (per-token statistics, function preserving; default) or batch",
    )
    target = convert.add_mutually_exclusive_group()
    target.add_argument(
        "--target-modules", nargs="+", metavar="NAME", help="convert only these modules (names or name suffixes)"
    )
    target.add_argument("--target-regex", metavar="REGEX", help="convert only modules whose full name matches REGEX")
    exclude = convert.add_mutually_exclusive_group()
    exclude.add_argument(
        "--exclude-modules", nargs="+", metavar="NAME", help="never convert these modules (names or name suffixes)"
    )
    exclude.add_argument("--exclude-regex", metavar="REGEX", help="never convert modules whose full name matches REGEX")
    convert.add_argument("--eps", type=float, help="eps of every converted layer (default: each keeps its own)")
    convert.add_argument(
        "--momentum", type=float, default=0.1, help="running-statistics momentum of sites that have none (default 0.1)"
    )
    convert.add_argument(
        "--context-source", metavar="FOLDER", help="a saved context source (ContextSource.save) to store with the model"
    )
    convert.add_argument(
        "--num-classes", type=int, help="new classifier size (timm num_classes, transformers num_labels)"
    )
    convert.add_argument(
        "--model-arg",
        dest="model_args",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra timm create_model argument or transformers config field (VALUE is JSON when it parses), repeatable",
    )
    convert.add_argument(
        "--architecture", help="transformers model class (default: the config's architectures, else the base model)"
    )
    convert.add_argument(
        "--random-init", action="store_true", help="do not load pretrained weights: build from the config"
    )
    convert.add_argument(
        "--repo-id", help="Hub repo id the model card's loading snippet uses (default: the output folder)"
    )
    convert.add_argument("--dataset", action="append", default=[], help="model card metadata, repeatable")
    convert.add_argument("--metric", action="append", default=[], help="model card metadata, repeatable")
    convert.add_argument("--license", help="model card metadata")
    convert.set_defaults(run=run_convert)

    inspect = commands.add_parser(
        "inspect",
        help="show what a converted folder or Hub repo holds",
        description="Show the base model, strategy, K, priors, converted layers and context source of a "
        "folder written by save_pretrained (or of a Hub repo), from its ctxnorm_config.json.",
    )
    inspect.add_argument("model", help="a folder or a Hub repo id")
    inspect.add_argument("--sites", action="store_true", help="list every converted module")
    inspect.add_argument("--json", action="store_true", help="print ctxnorm_config.json")
    inspect.add_argument("--revision", help="Hub branch, tag or commit")
    inspect.add_argument("--token", help="Hub token (default: the saved login or HF_TOKEN)")
    inspect.set_defaults(run=run_inspect)

    push = commands.add_parser(
        "push",
        help="upload a converted folder to the Hub",
        description="Upload a folder written by save_pretrained / `ctxnorm-hf convert` to a Hub repo (created "
        "if missing). The model card README.md is first re-rendered so its loading snippet names REPO_ID.",
    )
    push.add_argument("folder", help="a folder written by save_pretrained")
    push.add_argument("repo_id", help="user/name")
    push.add_argument("--private", action="store_true", default=None, help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created from main if missing)")
    push.add_argument("--commit-message", help="commit summary")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--token", help="Hub token (default: the saved login or HF_TOKEN)")
    push.add_argument("--keep-card", action="store_true", help="upload README.md as it is")
    push.set_defaults(run=run_push)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ctxnorm-hf command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
