"""ContextCollator and ContextTrainer on real data (scikit-learn's digits) and real models."""

import datasets
import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader
from transformers import TrainingArguments

from ctxnorm_hf import ContextCollator, ContextTrainer, convert_norms, from_pretrained, load_context_source
from ctxnorm_hf.contexts import ContextPredictor, KMeansContexts, SuperclassContexts
from ctxnorm_hf.surgery import converted_layers

PARITY = SuperclassContexts([0, 1, 0, 1, 0, 1, 0, 1, 0, 1], 2, ["even", "odd"], name="digit-parity")


def _digits(rows: slice) -> datasets.Dataset:
    digits = load_digits()
    return datasets.Dataset.from_dict(
        {"image": digits.images[rows].astype(np.float32) / 16.0, "label": digits.target[rows].astype(np.int64)}
    )


def _to_pixels(batch):
    return {"pixel_values": [torch.tensor(np.asarray(image, dtype=np.float32)).unsqueeze(0) for image in batch["image"]], "label": batch["label"]}


def _train_eval():
    return _digits(slice(0, 384)).with_transform(_to_pixels), _digits(slice(1400, 1528)).with_transform(_to_pixels)


# --- collator -----------------------------------------------------------------------------------


def test_collator_adds_label_derived_ids_in_a_dataloader():
    train, _ = _train_eval()
    source = PARITY.fit(_digits(slice(0, 384))["label"])
    batch = next(iter(DataLoader(train, batch_size=16, collate_fn=ContextCollator(source))))
    assert batch["pixel_values"].shape == (16, 1, 8, 8)
    assert torch.equal(batch["context_ids"], batch["labels"] % 2)


def test_collator_adds_kmeans_ids_from_pixels_and_wraps_a_user_collator():
    train, _ = _train_eval()
    pixels = torch.stack([example["pixel_values"] for example in train])
    source = KMeansContexts(3, seed=0).fit(pixels)
    calls = []

    def user_collator(examples):
        calls.append(len(examples))
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]), "labels": torch.tensor([e["label"] for e in examples])}

    loader = DataLoader(train, batch_size=32, collate_fn=ContextCollator(source, user_collator))
    batch = next(iter(loader))
    assert calls == [32]
    assert torch.equal(batch["context_ids"], source.assign(pixels[:32]))


def test_collator_passes_precomputed_ids_and_explains_missing_keys():
    collator = ContextCollator()
    batch = collator([{"x": torch.zeros(2), "context_ids": 1}, {"x": torch.ones(2), "context_ids": 0}])
    assert batch["context_ids"].tolist() == [1, 0] and batch["context_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="no context_source"):
        collator([{"x": torch.zeros(2)}])
    with pytest.raises(KeyError, match="none of \\['labels', 'label', 'fine_label'\\]"):
        ContextCollator(PARITY)([{"x": torch.zeros(2)}])


# --- trainer ------------------------------------------------------------------------------------


def _arguments(tmp_path, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=32, per_device_eval_batch_size=64, num_train_epochs=3,
        learning_rate=3e-3, weight_decay=0.1, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
        seed=0, dataloader_num_workers=0,
    )
    return TrainingArguments(**{**defaults, **overrides})


def _hf_vit() -> torch.nn.Module:
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10,
    )
    return convert_norms(transformers.ViTForImageClassification(config), "cn", 2, layer_norm="batch")


def _losses(trainer) -> list:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_trains_a_transformers_vit_and_reports_both_protocols(tmp_path):
    train, evaluation = _train_eval()
    source = PARITY.fit(_digits(slice(0, 384))["label"])
    model = _hf_vit()
    layer = next(iter(converted_layers(model).values()))
    seen_ids = []
    layer.register_forward_pre_hook(lambda module, args: seen_ids.append(module.router.context_ids))
    trainer = ContextTrainer(model=model, args=_arguments(tmp_path), train_dataset=train, eval_dataset=evaluation, context_source=source)
    assert trainer.args.remove_unused_columns
    trainer.train()
    losses = _losses(trainer)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert seen_ids and all(ids is not None and set(ids.tolist()) <= {0, 1} for ids in seen_ids)

    seen_ids.clear()
    metrics = trainer.evaluate()
    for key in ("eval_oracle_accuracy", "eval_oracle_loss", "eval_inferred_accuracy", "eval_accuracy", "eval_loss"):
        assert key in metrics, metrics
    assert metrics["eval_accuracy"] == metrics["eval_inferred_accuracy"]
    assert metrics["eval_oracle_accuracy"] > 0.3 and metrics["eval_inferred_accuracy"] > 0.3, metrics
    # oracle passes carry the labels' groups; inferred passes try every context for every sample
    assert any(ids is not None and len(set(ids.tolist())) == 2 for ids in seen_ids)
    assert any(ids is not None and ids.tolist() == [1] * len(ids) for ids in seen_ids)

    seen_ids.clear()
    predictions = trainer.predict(evaluation)
    assert predictions.predictions.shape == (128, 10)
    assert seen_ids and all(ids is not None for ids in seen_ids)


def test_trainer_trains_a_timm_model_and_checkpoints_reload_strictly(tmp_path):
    train, evaluation = _train_eval()
    pixels = torch.stack([example["pixel_values"] for example in train])
    source = KMeansContexts(3, seed=0).fit(pixels)
    build = lambda: convert_norms(timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10), "cn", 3)  # noqa: E731
    torch.manual_seed(0)
    model = build()
    trainer = ContextTrainer(
        model=model,
        args=_arguments(tmp_path, save_strategy="epoch", learning_rate=1e-3),
        train_dataset=train,
        eval_dataset=evaluation,
        context_source=source,
        save_options={"model_args": {"in_chans": 1}},
    )
    trainer.train()
    losses = _losses(trainer)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    metrics = trainer.evaluate()
    assert "eval_accuracy" in metrics and "eval_oracle_accuracy" not in metrics
    assert all(layer.num_batches_tracked.sum() > 0 for layer in converted_layers(model).values())

    checkpoint = sorted(tmp_path.glob("checkpoint-*"))[-1]
    twin = build()
    twin.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=True)
    twin.eval()
    model.eval()
    ids = source.assign(pixels[:8])
    torch.testing.assert_close(twin(pixels[:8], context_ids=ids), model(pixels[:8], context_ids=ids))
    # ... and the plugin's own loader reads the checkpoint folder, context source included
    reloaded = from_pretrained(checkpoint).eval()
    torch.testing.assert_close(reloaded(pixels[:8], context_ids=ids), model(pixels[:8], context_ids=ids))
    assert torch.equal(load_context_source(checkpoint).assign(pixels[:8]), ids)


def test_new_norm_parameters_get_no_weight_decay(tmp_path):
    model = _hf_vit()
    trainer = ContextTrainer(model=model, args=_arguments(tmp_path), train_dataset=_train_eval()[0], context_source=PARITY.fit([0, 1]))
    decayed = set(trainer.get_decay_parameter_names(model))
    norm_parameters = {
        f"{name}.{p}" for name, layer in converted_layers(model).items() for p, _ in layer.named_parameters()
    }
    assert norm_parameters and not (norm_parameters & decayed)
    assert {"classifier.weight", "vit.layers.0.attention.k_proj.weight"} <= decayed
    optimizer = trainer.create_optimizer()
    no_decay = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0.0 for p in group["params"]}
    assert all(id(p) in no_decay for layer in converted_layers(model).values() for p in layer.parameters())


# --- context source errors -----------------------------------------------------------------------


def test_context_source_errors_say_what_to_do():
    with pytest.raises(ValueError, match=r"groups \[5\], outside \[0, 3\)"):
        SuperclassContexts([0, 1, 5], num_contexts=3)
    with pytest.raises(ValueError, match=r"covers no group for labels \[7\]"):
        SuperclassContexts([0, 1, 0]).fit([0, 1, 7])
    with pytest.raises(ValueError, match="asked for 5 clusters but got only 4 samples"):
        KMeansContexts(5).fit(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match=r"not fitted: call \.fit"):
        KMeansContexts(2).assign(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="not fitted"):
        ContextPredictor(2).predict_proba(torch.randn(2, 3))
