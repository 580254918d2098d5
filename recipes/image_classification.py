"""Image classification with context normalization: the paper's classification experiments.

Trains one model per (norm, seed) with ContextTrainer on the same data and
seeds, and writes into --output-dir: metrics.json (every run, every epoch),
report.md (mean ± spread over seeds per norm, both evaluation protocols when
contexts come from labels) and curves.png (training loss and validation
accuracy per epoch, mean over seeds, one line per norm).

Main job (embedded default, offline, a few minutes on a 2-core CPU):

    python recipes/image_classification.py

The paper's settings on GPUs (Hub data and weights reachable):

    # DenseNet-40 / DenseNet-100 on CIFAR-100 with its 20 superclasses as contexts, 200 epochs
    accelerate launch recipes/image_classification.py --dataset cifar100 --contexts superclass \\
        --model densenet121 --norms bn,cn,cnx,acn,mixnorm,modenorm --epochs 200 --batch-size 64 \\
        --lr 0.1 --optimizer sgd --image-size 32 --seeds 0,1,2
    # ViT on CIFAR-100 with K = 20 (superclasses), trained from scratch, batch-mode LayerNorm sites
    accelerate launch recipes/image_classification.py --dataset cifar100 --contexts superclass \\
        --model google/vit-base-patch16-224 --image-size 32 --norms ln,cn,cnx,acn --layer-norm batch \\
        --epochs 200 --batch-size 128 --lr 1e-3
    # k-means contexts on backbone embeddings instead of superclasses
    ... --contexts kmeans-embed --num-contexts 20 --embed-model resnet50 --pretrained

(timm's densenet121 stands in for DenseNet-40/100, which timm does not ship.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from transformers import TrainingArguments

from ctxnorm_hf import ContextTrainer, from_pretrained, load_context_source, push_to_hub
from ctxnorm_hf.contexts import BackboneFeatures, ContextPredictor, ContextSource, KMeansContexts, SuperclassContexts
from ctxnorm_hf.experiment import (
    UNCHANGED,
    WITH_CONTEXT_IDS,
    apply_norm,
    check_at_least,
    end_distributed,
    parse_norms,
    parse_seeds,
    set_seed,
)
from ctxnorm_hf.image_data import LOADERS, ImageData, load_image_data
from ctxnorm_hf.models import build_classifier, is_timm_name, timm_model_args
from ctxnorm_hf.reporting import format_mean_spread, markdown_table, mean_and_spread, plot_curves, write_json
from ctxnorm_hf.runs import RunResult, mean_curves

CONTEXT_KINDS = ("superclass", "kmeans", "kmeans-embed", "none")
DEFAULT_K = 4


class TensorImages(torch.utils.data.Dataset):
    """Examples {"pixel_values": (C, H, W), "labels": ()} from two tensors."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


# --- arguments ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small_convnet", help="small_convnet, small_vit, a timm name, or a transformers id/path")
    parser.add_argument("--pretrained", action="store_true", help="load pretrained weights (needs the Hub)")
    parser.add_argument("--dataset", default="digits", help=f"{', '.join(LOADERS)} or imagefolder:<path>")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--image-size", type=int, default=None, help="resize images (default: keep)")
    parser.add_argument("--train-subset", type=int, default=None, help="at most this many training images")
    parser.add_argument("--test-subset", type=int, default=None, help="at most this many test images")
    parser.add_argument("--contexts", default="kmeans", choices=CONTEXT_KINDS, help="where context ids come from")
    parser.add_argument(
        "--num-contexts", type=int, default=None,
        help=f"K: k-means clusters, ACN/MixNorm/ModeNorm components (default: the number of superclasses, else {DEFAULT_K})",
    )
    parser.add_argument("--embed-model", default="resnet18", help="timm backbone for --contexts kmeans-embed")
    parser.add_argument("--norms", default="bn,cn,cnx,acn", help="comma-separated: bn, ln, cn, cnx, acn, mixnorm, modenorm")
    parser.add_argument("--compare", action="store_true", help="accepted for clarity: several --norms are always compared")
    parser.add_argument("--layer-norm", default="auto", choices=("auto", "token", "batch"), help="LayerNorm sites (auto: token if --pretrained else batch)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per norm and seed")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--output-dir", default="outputs/image_classification")
    parser.add_argument("--save-checkpoints", action="store_true", help="checkpoint every epoch (resumable)")
    parser.add_argument("--resume", action="store_true", help="resume runs from their last checkpoint")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="push the best model with its results")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.norms = parse_norms(args.norms, parser)
    args.seeds = parse_seeds(args.seeds)
    check_at_least(parser, "--epochs", args.epochs)
    check_at_least(parser, "--batch-size", args.batch_size, 2)
    if args.num_contexts is not None:
        check_at_least(parser, "--num-contexts", args.num_contexts)
    if args.dataset not in LOADERS and not args.dataset.startswith("imagefolder:"):
        parser.error(f"unknown dataset {args.dataset!r}; choose from {', '.join(LOADERS)} or imagefolder:<path>")
    if args.contexts == "none":
        needing_ids = [norm for norm in args.norms if norm in WITH_CONTEXT_IDS]
        if needing_ids:
            parser.error(f"{', '.join(needing_ids)} need context ids: choose --contexts superclass, kmeans or kmeans-embed")
    _check_model(parser, args.model)
    if args.push_to_hub and args.model == "small_convnet":
        parser.error("--push-to-hub needs a timm or transformers model (small_convnet is a plain torch module); try --model small_vit or resnet18")
    return args


def _check_model(parser: argparse.ArgumentParser, name: str) -> None:
    import timm

    from ctxnorm_hf.models import BUILT_IN

    if name in BUILT_IN or timm.is_model(name) or "/" in name or os.path.exists(name):
        return
    parser.error(f"unknown model {name!r}: not a built-in ({', '.join(BUILT_IN)}), a timm model name, or a transformers id/path")


# --- data and contexts ----------------------------------------------------------------------------


def load_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ImageData:
    options = {"seed": 0, "image_size": args.image_size or 32}
    if args.data_dir:
        options["directory"] = args.data_dir
    try:
        data = load_image_data(args.dataset, **options)
    except Exception as error:  # noqa: BLE001 - any loading failure ends the program with its reason
        parser.error(f"cannot load {args.dataset}: {str(error).splitlines()[0]}")
    data = data.subset(args.train_subset, args.test_subset, seed=0)
    return data.resized(args.image_size) if args.image_size else data


def make_context_source(args: argparse.Namespace, data: ImageData, parser: argparse.ArgumentParser) -> Optional[ContextSource]:
    """The source of context ids, fitted on the training split only."""
    if args.contexts == "none":
        return None
    if args.contexts == "superclass":
        if data.superclasses is None:
            parser.error(f"--contexts superclass: {data.name} has no built-in superclass map; use kmeans or kmeans-embed")
        source = getattr(SuperclassContexts, data.superclasses)()
        if args.num_contexts not in (None, source.num_contexts):
            parser.error(f"{data.name} has {source.num_contexts} superclasses, not --num-contexts {args.num_contexts}")
        return source.fit(data.train_labels)
    features = "pixels"
    if args.contexts == "kmeans-embed":
        import timm

        backbone = timm.create_model(args.embed_model, pretrained=args.pretrained, num_classes=0, in_chans=data.image_shape[0])
        features = BackboneFeatures(backbone, model_args={"in_chans": data.image_shape[0]})
    return KMeansContexts(args.num_contexts or DEFAULT_K, features, seed=0).fit(data.train_images)


# --- one run ----------------------------------------------------------------------------------------


def _training_arguments(args: argparse.Namespace, run_dir: str, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=run_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 256),
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        optim="sgd" if args.optimizer == "sgd" else "adamw_torch",
        lr_scheduler_type="cosine",
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="epoch" if args.save_checkpoints else "no",
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
    )


def _history(log_history: List[Dict[str, float]]) -> Dict[str, List[float]]:
    """Per-epoch curves from Trainer's log history."""
    curves: Dict[str, List[float]] = {}
    for entry in log_history:
        for key, name in (
            ("loss", "train loss"),
            ("eval_loss", "validation loss"),
            ("eval_accuracy", "validation accuracy"),
            ("eval_oracle_accuracy", "validation accuracy (oracle)"),
        ):
            if key in entry:
                curves.setdefault(name, []).append(float(entry[key]))
    return curves


def fit_context_predictor(data: ImageData, source: Optional[ContextSource]) -> Optional[ContextPredictor]:
    """p(k | x) for the honest protocol of label-derived contexts: fitted once on the training split, shared by all runs."""
    if source is None or not source.label_derived:
        return None
    return ContextPredictor(source.num_contexts).fit(data.train_images, source.assign(data.train_labels))


def build_model(norm: str, data: ImageData, source: Optional[ContextSource], args: argparse.Namespace) -> torch.nn.Module:
    """The classifier of --model with its norm layers replaced as ``norm`` says."""
    num_contexts = source.num_contexts if source is not None else args.num_contexts or DEFAULT_K
    model = build_classifier(args.model, data.image_shape, data.num_classes, pretrained=args.pretrained)
    layer_norm = args.layer_norm if args.layer_norm != "auto" else ("token" if args.pretrained else "batch")
    priors = source.priors if source is not None and norm in WITH_CONTEXT_IDS else None
    sync = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return apply_norm(model, norm, num_contexts, priors=priors, layer_norm=layer_norm, sync_stats=sync)


def run_dir_of(args: argparse.Namespace, norm: str, seed: int) -> str:
    return os.path.join(args.output_dir, "runs", f"{norm}-seed{seed}")


def _saving_options(args: argparse.Namespace, data: ImageData) -> Dict[str, Any]:
    """What ctxnorm_hf.save_pretrained needs beyond the model and its context source: timm's create_model
    arguments and model card metadata."""
    model_args = timm_model_args(args.model, data.image_shape) if is_timm_name(args.model) else None
    return {"model_args": model_args, "datasets": [data.name], "tags": ["image-classification"]}


def run_one(
    norm: str,
    seed: int,
    data: ImageData,
    source: Optional[ContextSource],
    predictor: Optional[ContextPredictor],
    args: argparse.Namespace,
) -> RunResult:
    set_seed(seed)
    started = time.perf_counter()
    model = build_model(norm, data, source, args)
    run_dir = run_dir_of(args, norm, seed)
    trainer = ContextTrainer(
        model=model,
        args=_training_arguments(args, run_dir, seed),
        train_dataset=TensorImages(data.train_images, data.train_labels),
        eval_dataset=TensorImages(data.test_images, data.test_labels),
        context_source=source,
        context_predictor=predictor,
        save_options=_saving_options(args, data),
    )
    resume = args.resume and any(entry.startswith("checkpoint-") for entry in os.listdir(run_dir)) if os.path.isdir(run_dir) else False
    trainer.train(resume_from_checkpoint=True if resume else None)
    history = _history(trainer.state.log_history)  # one point per epoch, before the final evaluation adds its own
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(run_dir, "final"))  # main process only; from_pretrained reloads it when converted
    return RunResult(norm, seed, {k: float(v) for k, v in metrics.items()}, history, time.perf_counter() - started)


# --- the report ---------------------------------------------------------------------------------------

PROTOCOL_COLUMNS = (
    ("eval_accuracy", "test accuracy (honest: ids from the input)"),
    ("eval_oracle_accuracy", "test accuracy (oracle: ids from labels)"),
)


def summarise(results: List[RunResult], norms: Sequence[str], label_derived: bool) -> List[Dict[str, str]]:
    """One row per norm: accuracy mean ± std over seeds under each protocol that applies."""
    columns = PROTOCOL_COLUMNS if label_derived else PROTOCOL_COLUMNS[:1]
    rows = []
    for norm in norms:
        runs = [result for result in results if result.norm == norm]
        row = {"norm": norm}
        for key, title in columns:
            values = [run.metrics[key] for run in runs if key in run.metrics]
            # a model that ignores the ids has one protocol: its accuracy holds for both columns
            values = values or [run.metrics["eval_accuracy"] for run in runs]
            row[title] = format_mean_spread(values)
        row["seeds"] = str(len(runs))
        row["seconds / run"] = f"{np.mean([run.seconds for run in runs]):.0f}"
        rows.append(row)
    return rows


def write_report(args: argparse.Namespace, data: ImageData, source: Optional[ContextSource], results: List[RunResult]) -> str:
    rows = summarise(results, args.norms, source is not None and source.label_derived)
    protocol = (
        "Contexts come from labels (superclasses): the honest column estimates them from the input "
        "(p(y|x) = p(y|x,k=s(y)) p(k=s(y)|x), p(k|x) from a logistic-regression context predictor fitted on the "
        "training split); the oracle column uses the test labels' superclasses, as the paper's tables do."
        if source is not None and source.label_derived
        else "Context ids are computed from the input alone (or not used), so there is one protocol."
    )
    lines = [
        f"# Image classification: {args.model} on {data.name}",
        "",
        f"- data: {len(data.train_labels)} train / {len(data.test_labels)} test images of shape {data.image_shape}, {data.num_classes} classes",
        f"- contexts: {args.contexts}" + (f" (K = {source.num_contexts}, priors {[round(p, 3) for p in source.priors.tolist()]})" if source else ""),
        f"- {args.epochs} epochs, batch {args.batch_size}, {args.optimizer} lr {args.lr}, seeds {list(args.seeds)}; mean ± std over seeds",
        f"- {protocol}",
        "",
        markdown_table(rows),
        "",
        "![curves](curves.png)",
        "",
    ]
    report = "\n".join(lines)
    with open(os.path.join(args.output_dir, "report.md"), "w") as handle:
        handle.write(report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    data = load_data(args, parser)
    source = make_context_source(args, data, parser)
    predictor = fit_context_predictor(data, source)
    results = [run_one(norm, seed, data, source, predictor, args) for norm in args.norms for seed in args.seeds]
    end_distributed()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    write_json(
        os.path.join(args.output_dir, "metrics.json"),
        {
            "config": {k: v for k, v in vars(args).items()},
            "context_source": source.to_dict() if source is not None else None,
            "runs": [asdict(result) for result in results],
            "summary": {
                norm: {key: mean_and_spread([r.metrics[key] for r in results if r.norm == norm and key in r.metrics]) for key, _ in PROTOCOL_COLUMNS if any(key in r.metrics for r in results if r.norm == norm)}
                for norm in args.norms
            },
        },
    )
    plot_curves(mean_curves(results, args.norms), os.path.join(args.output_dir, "curves.png"), f"{args.model} on {data.name}")
    print(write_report(args, data, source, results))
    if args.push_to_hub:
        push_best(args, data, source, results)
    return 0


def push_best(args: argparse.Namespace, data: ImageData, source: Optional[ContextSource], results: List[RunResult]) -> None:
    """Push the converted run with the best honest accuracy to the Hub, with the whole comparison
    (baselines included) as the results table of its model card."""
    converted = [result for result in results if result.norm not in UNCHANGED]
    if not converted:
        print(f"--push-to-hub: every run kept the model's own norms ({', '.join(args.norms)}); nothing converted to push.")
        return
    best = max(converted, key=lambda result: result.metrics["eval_accuracy"])
    folder = os.path.join(run_dir_of(args, best.norm, best.seed), "final")
    model = from_pretrained(folder)
    info = push_to_hub(
        model,
        args.push_to_hub,
        context_source=load_context_source(folder),
        metrics=["accuracy"],
        results=summarise(results, args.norms, source is not None and source.label_derived),
        **_saving_options(args, data),
        commit_message=f"{args.model} with {best.norm} (seed {best.seed}), test accuracy {best.metrics['eval_accuracy']:.4f}",
    )
    print(f"pushed {best.norm} (seed {best.seed}) to {info.commit_url}")


if __name__ == "__main__":
    sys.exit(main())
