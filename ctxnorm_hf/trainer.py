"""ContextTrainer: transformers.Trainer for converted models, timm ones included.

- keeps the context column (and what the context source reads) that
  ``remove_unused_columns`` would drop, and routes ids to the model;
- trains plain timm models too: logits out, cross-entropy on ``labels`` here;
- gives the parameters of the new norm layers no weight decay;
- evaluates label-derived contexts under two protocols, side by side:
  "oracle" (ids from the labels, as in the paper's tables) and "inferred"
  (p(y | x) = p(y | x, k = s(y)) p(k = s(y) | x), with p(k | x) from a
  ContextPredictor fitted on the training data), reported as
  ``eval_oracle_accuracy`` and ``eval_inferred_accuracy``;
- writes checkpoints that ``from_pretrained`` reloads and Trainer resumes from exactly.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import EvalPrediction

from .contexts import ContextPredictor, ContextSource, SuperclassContexts
from .data import ContextCollator
from .hub import is_savable, save_pretrained
from .norms.base import IdConditionedNorm, NormBase
from .routing import CONTEXT_IDS_KWARG, ROUTER_ATTRIBUTE

logger = logging.getLogger(__name__)

PIXEL_KEYS = ("pixel_values", "x")


def accuracy_metric(prediction: EvalPrediction) -> Dict[str, float]:
    """Top-1 accuracy of logits (N, classes) against labels (N,)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


class ContextTrainer(Trainer):
    """A transformers.Trainer for models converted with convert_norms.

    Args (on top of Trainer's):
        context_source: a fitted source; the data collator is wrapped in a ContextCollator
            that adds its ids to every batch (unless it is one already).
        context_predictor: p(k | x) for the "inferred" protocol of label-derived sources;
            fitted on up to ``predictor_samples`` training samples at the first evaluation
            when not given.
        predictor_samples: how many training samples fit the default predictor.
        save_options: further :func:`ctxnorm_hf.save_pretrained` arguments for checkpoints and
            ``save_model`` (timm ``model_args`` the model was created with, model card metadata).

    Without ``compute_metrics``, evaluation reports accuracy.
    """

    def __init__(
        self,
        *args: Any,
        context_source: Optional[ContextSource] = None,
        context_predictor: Optional[ContextPredictor] = None,
        predictor_samples: int = 5000,
        save_options: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        collator = kwargs.get("data_collator")
        if context_source is not None and not isinstance(collator, ContextCollator):
            kwargs["data_collator"] = ContextCollator(context_source, collator)
        kwargs.setdefault("compute_metrics", accuracy_metric)
        super().__init__(*args, **kwargs)
        self.context_source = context_source
        self.context_predictor = context_predictor
        self.predictor_samples = predictor_samples
        self.save_options = dict(save_options or {})
        if not self._is_transformers_model and self.args.label_names is None:
            self.label_names = ["labels"]

    @property
    def _is_transformers_model(self) -> bool:
        return isinstance(self.accelerator.unwrap_model(self.model), PreTrainedModel)

    @property
    def _routes_contexts(self) -> bool:
        """The model was converted: its root takes ``context_ids`` (an unconverted baseline does not)."""
        return hasattr(self.accelerator.unwrap_model(self.model), ROUTER_ATTRIBUTE)

    @property
    def _uses_context_ids(self) -> bool:
        """Some layer of the model is told its context (CN, CN-X), so the protocols differ."""
        return any(isinstance(module, IdConditionedNorm) for module in self.accelerator.unwrap_model(self.model).modules())

    # --- columns and loss ----------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._model_input_names = set(self._signature_columns) | {CONTEXT_IDS_KWARG}
            kept = [CONTEXT_IDS_KWARG, "labels", "label", *PIXEL_KEYS]
            if self.context_source is not None:
                kept += list(self.context_source.input_keys)
            self._signature_columns += [column for column in kept if column not in self._signature_columns]

    def _remove_unused_columns(self, dataset: Any, description: Optional[str] = None) -> Any:
        # A dataset with an on-the-fly transform needs its raw columns; the collator-level
        # removal that Trainer also applies works on the transformed examples instead.
        if getattr(dataset, "format", {}).get("type") == "custom":
            return dataset
        return super()._remove_unused_columns(dataset, description)

    def _model_inputs(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        """The batch without the columns kept only for the context source (a transformers model rejects them)."""
        self._set_signature_columns_if_needed()
        accepted = self._model_input_names if self._routes_contexts else self._model_input_names - {CONTEXT_IDS_KWARG}
        return {key: value for key, value in inputs.items() if key in accepted}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[torch.Tensor] = None,
    ) -> Any:
        if self._is_transformers_model:
            return super().compute_loss(model, self._model_inputs(inputs), return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs.pop("label")
        routed = {CONTEXT_IDS_KWARG: inputs.get(CONTEXT_IDS_KWARG)} if self._routes_contexts else {}
        logits = model(_pixels(inputs), **routed)
        loss = nn.functional.cross_entropy(logits, labels)
        return (loss, {"logits": logits}) if return_outputs else loss

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Save as Trainer does, then, for a converted timm / transformers model, as ctxnorm_hf.save_pretrained
        does (same folder): the weights under the module's own names, the context source and what
        ``from_pretrained`` needs. transformers 5 saves its models under checkpoint names that differ
        from the module's, and Trainer's resume (``load_state_dict(strict=False)``) then silently
        loads none of them; the module's own names reload exactly."""
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        # A state dict given by save_model comes from a sharded model (FSDP, DeepSpeed): keep Trainer's format.
        if state_dict is None and self.args.should_save and is_savable(model):
            save_pretrained(model, output_dir or self.args.output_dir, context_source=self.context_source, **self.save_options)

    def get_decay_parameter_names(self, model: nn.Module) -> List[str]:
        norm_parameters = {
            f"{name}.{parameter_name}" if name else parameter_name
            for name, module in model.named_modules()
            if isinstance(module, NormBase)
            for parameter_name, _ in module.named_parameters()
        }
        return [name for name in super().get_decay_parameter_names(model) if name not in norm_parameters]

    # --- evaluation protocols --------------------------------------------------------------------

    def evaluate(
        self,
        eval_dataset: Optional[Any] = None,
        ignore_keys: Optional[List[str]] = None,
        metric_key_prefix: str = "eval",
    ) -> Dict[str, float]:
        """Metrics of the model; for label-derived contexts, under both protocols.

        Label-derived source and a model told its contexts (CN, CN-X): ``{prefix}_oracle_*`` (ids from
        labels), ``{prefix}_inferred_accuracy`` (ids estimated from the input) and ``{prefix}_accuracy`` =
        the inferred one. Otherwise the ids come from the input (k-means), are known (domains) or are
        not used: one protocol.
        """
        if not (self.context_source is not None and self.context_source.label_derived and self._uses_context_ids):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        oracle = super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_oracle")
        inferred = self._inferred_accuracy(eval_dataset if eval_dataset is not None else self.eval_dataset)
        metrics = {
            **oracle,
            f"{metric_key_prefix}_loss": oracle[f"{metric_key_prefix}_oracle_loss"],
            f"{metric_key_prefix}_inferred_accuracy": inferred,
            f"{metric_key_prefix}_accuracy": inferred,
        }
        self.log({key: value for key, value in metrics.items() if key not in oracle})
        return metrics

    def _fit_context_predictor(self) -> ContextPredictor:
        pixels, labels = [], []
        seen = 0
        for batch in self.get_train_dataloader():
            pixels.append(_pixels(batch).cpu())
            labels.append(_labels(batch).cpu())
            seen += len(labels[-1])
            if seen >= self.predictor_samples:
                break
        groups = self.context_source.assign(torch.cat(labels))
        logger.info("Fitting the context predictor p(k | x) on %d training samples", len(groups))
        return ContextPredictor(self.context_source.num_contexts).fit(torch.cat(pixels), groups)

    @torch.no_grad()
    def _inferred_accuracy(self, dataset: Any) -> float:
        """Accuracy of argmax_y p(y | x, k = s(y)) p(k = s(y) | x): K passes per batch, no label used."""
        if self.context_predictor is None:
            self.context_predictor = self._fit_context_predictor()
        source = self.context_source
        if not isinstance(source, SuperclassContexts):
            raise TypeError(f"The inferred protocol needs a fine label -> group map, not {type(source).__name__}.")
        model = self.model.eval()
        correct, total = 0, 0
        for batch in self.get_eval_dataloader(dataset):
            batch = self._prepare_inputs(batch)
            pixels, labels = _pixels(batch), _labels(batch)
            log_context = self.context_predictor.predict_proba(pixels.cpu()).clamp_min(1e-12).log().to(pixels.device)
            per_context = torch.stack(
                [
                    self._logits(model, batch, torch.full_like(labels, k)).float().log_softmax(-1)
                    for k in range(source.num_contexts)
                ]
            )  # (K, N, classes)
            group_of_class = source.groups_of(torch.arange(per_context.shape[-1])).to(pixels.device)
            scores = per_context[group_of_class, :, torch.arange(per_context.shape[-1])].transpose(0, 1)
            scores = scores + log_context[:, group_of_class]
            predictions, labels = self.accelerator.gather_for_metrics((scores.argmax(-1), labels))
            correct += int((predictions == labels).sum())
            total += len(labels)
        return correct / max(total, 1)

    def _logits(self, model: nn.Module, batch: Dict[str, Any], context_ids: torch.Tensor) -> torch.Tensor:
        if self._is_transformers_model:
            inputs = {key: value for key, value in self._model_inputs(batch).items() if key not in ("labels", CONTEXT_IDS_KWARG)}
            return model(**inputs, context_ids=context_ids).logits
        return model(_pixels(batch), context_ids=context_ids)


def _pixels(batch: Dict[str, Any]) -> torch.Tensor:
    for key in PIXEL_KEYS:
        if key in batch:
            return batch[key]
    raise KeyError(f"The batch has no image tensor under {PIXEL_KEYS}; its keys are {sorted(batch)}.")


def _labels(batch: Dict[str, Any]) -> torch.Tensor:
    return batch["labels"] if "labels" in batch else batch["label"]
