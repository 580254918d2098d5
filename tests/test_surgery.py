import copy
import inspect

import pytest
import timm
import torch
from torch import nn

from ctxnorm_hf import ContextNorm, convert_norms, export_context, use_contexts
from ctxnorm_hf.norms import ContextNormX
from ctxnorm_hf.norms.norm_act import ContextNormAct2d
from ctxnorm_hf.norms.token_norm import AdaptiveContextLayerNorm, ContextLayerNorm
from ctxnorm_hf.surgery import converted_layers

from ._models import ALL_CASES, NUM_CLASSES, TIMM_CASES, randomise_norms

K = 3
# ACN's means get a zero-sum perturbation of 1e-3 running std at conversion (symmetry breaking):
# its effect on the output is second order, measured up to ~3e-4 on deep nets (densenet121).
ACN_TOLERANCE = 1e-3


def _converted(name: str, strategy: str, **kwargs):
    case = ALL_CASES[name]
    model = randomise_norms(case.build()).eval()
    return case, model, convert_norms(copy.deepcopy(model), strategy, K, **kwargs)


@pytest.mark.parametrize("name", list(ALL_CASES))
@pytest.mark.parametrize("strategy", ["cn", "cnx", "acn"])
def test_function_preserving_for_every_context(name, strategy):
    case, original, converted = _converted(name, strategy)
    batch = case.inputs(4)
    with torch.no_grad():
        expected = case.output(original, batch)
        for context in range(K):
            out = case.output(converted, batch, context_ids=torch.full((4,), context))
            tolerance = ACN_TOLERANCE if strategy == "acn" else 1e-5
            torch.testing.assert_close(out, expected, atol=tolerance, rtol=0)
    assert converted.ctxnorm_conversion.converted, "nothing converted"
    assert not any(module.training for module in converted.modules()), "converted layers must keep eval mode"


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_converted_model_trains(name):
    case = ALL_CASES[name]
    torch.manual_seed(0)
    model = convert_norms(case.build(), "cn", K).train()
    batch = case.inputs(8)
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        out = case.output(model, batch, context_ids=ids)
        loss = out.float().pow(2).mean() if name == "hf_bert" else nn.functional.cross_entropy(
            out, torch.arange(8) % NUM_CLASSES
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_batch_norm_act_keeps_activation_and_drop():
    model = convert_norms(timm.create_model("efficientnet_b0", pretrained=False), "cn", K)
    layers = [m for m in converted_layers(model).values() if isinstance(m, ContextNormAct2d)]
    assert len(layers) == 49
    activations = {type(layer.act).__name__ for layer in layers}
    assert "SiLU" in activations and "Identity" in activations


def test_layer_norm_sites_map_to_token_layers_and_channels_first():
    model = convert_norms(timm.create_model("convnext_atto", pretrained=False), "acn", K)
    layers = list(converted_layers(model).values())
    assert all(isinstance(layer, AdaptiveContextLayerNorm) for layer in layers)
    assert {layer.channel_dim for layer in layers} == {1}
    vit = convert_norms(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32), "cnx", K)
    assert all(isinstance(layer, ContextLayerNorm) and layer.channel_dim == -1 for layer in converted_layers(vit).values())


def test_layer_norm_batch_mode_uses_batch_statistics():
    model = convert_norms(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5), "cn", K, layer_norm="batch"
    )
    layers = converted_layers(model)
    assert all(type(layer) is ContextNorm and layer.channel_dim == -1 for layer in layers.values())
    model.train()(torch.randn(4, 3, 32, 32), context_ids=torch.tensor([0, 1, 0, 1]))
    assert all(layer.num_batches_tracked.tolist() == [1, 1, 0] for layer in layers.values())


# --- routing --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "levit_128s", "hf_resnet"])
def test_ids_reach_every_layer(name):
    case = ALL_CASES[name]
    model = convert_norms(case.build(), "cn", 4)
    signature = inspect.signature(case.build().forward)
    assert inspect.signature(model.forward) == signature
    layers = [m for m in converted_layers(model).values() if isinstance(m, ContextNorm)]
    before = {id(layer): layer.running_mean.clone() for layer in layers}
    case.output(model.train(), case.inputs(4), context_ids=torch.tensor([0, 2, 2, 0]))
    for layer in layers:
        changed = (layer.running_mean != before[id(layer)]).any(1)
        assert changed.tolist() == [True, False, True, False]
        assert layer.num_batches_tracked.tolist() == [1, 0, 1, 0]


def test_use_contexts_routes_ids_without_touching_the_call():
    case = TIMM_CASES["resnet18"]
    model = randomise_norms(case.build()).eval()
    converted = convert_norms(copy.deepcopy(model), "cn", K)
    with torch.no_grad():
        converted.layer1[0].bn1.weight[1].mul_(2.0)  # make context 1 differ
    x = case.inputs(2)["x"]
    with use_contexts(converted, torch.tensor([1, 1])):
        inside = converted(x)
    torch.testing.assert_close(inside, converted(x, context_ids=torch.tensor([1, 1])))
    assert not torch.allclose(inside, converted(x, context_ids=torch.tensor([0, 0])))


@pytest.mark.parametrize("strategy", ["cn", "cnx"])
def test_missing_ids_say_how_to_pass_them(strategy):
    model = convert_norms(timm.create_model("resnet18", pretrained=False), strategy, K)
    with pytest.raises(ValueError, match=r"model\(x, context_ids=ids\).*use_contexts"):
        model(torch.randn(2, 3, 32, 32))
    model(torch.randn(2, 3, 32, 32), context_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs context ids"):
        model(torch.randn(2, 3, 32, 32))  # ids of the previous call are not reused


def test_ids_survive_gradient_checkpoint_recomputation():
    case = ALL_CASES["hf_vit"]
    torch.manual_seed(0)
    reference = convert_norms(case.build(), "cn", K, layer_norm="batch").train()
    checkpointed = copy.deepcopy(reference)
    # transformers >= 5 renamed gradient_checkpointing_enable (deprecated alias kept until v6)
    enable = getattr(checkpointed, "activation_checkpointing_enable", None) or checkpointed.gradient_checkpointing_enable
    enable()
    calls = []
    checkpointed.vit.layers[0].layernorm_before.register_forward_hook(lambda *_: calls.append(1))
    batch, ids = case.inputs(4), torch.tensor([0, 1, 2, 1])
    for model in (reference, checkpointed):
        case.output(model, batch, context_ids=ids).pow(2).sum().backward()
    assert len(calls) == 2, "the block was not recomputed in backward"
    for (name, p_ref), p_ckpt in zip(reference.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


# --- reporting and choosing sites -----------------------------------------------------------


def test_report_names_every_site():
    model = convert_norms(timm.create_model("resnet18", pretrained=False), "cn", K)
    report = model.ctxnorm_conversion
    assert report.converted["bn1"] == ("torch.nn.modules.batchnorm.BatchNorm2d", "ContextNorm")
    assert len(report.converted) == 20 and not report.skipped
    assert "converted 20 x torch.nn.modules.batchnorm.BatchNorm2d -> ContextNorm" in str(report)


def test_unknown_norm_classes_are_reported_not_skipped_silently():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), timm.layers.EvoNorm2dS0(4))
    convert_norms(model, "cn", K)
    skipped = model.ctxnorm_conversion.skipped
    assert skipped["2"] == "unsupported norm class torch.nn.modules.normalization.GroupNorm"
    assert skipped["3"].startswith("unsupported norm class timm.layers.evo_norm.EvoNorm2dS0")


def test_nothing_to_convert_lists_the_norm_classes_found():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match=r"found nothing to convert.*1 x torch.nn.modules.normalization.GroupNorm"):
        convert_norms(model, "cn", K)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    with pytest.raises(ValueError, match=r"mixnorm has no per-token mode; pass layer_norm='batch'"):
        convert_norms(vit, "mixnorm", K)


def test_converting_twice_raises():
    model = convert_norms(timm.create_model("resnet18", pretrained=False), "cn", K)
    with pytest.raises(ValueError, match="already converted"):
        convert_norms(model, "cnx", K)


def test_target_and_exclude_modules_follow_peft_semantics():
    build = lambda: timm.create_model("resnet18", pretrained=False)  # noqa: E731
    regex = convert_norms(build(), "cn", K, target_modules=r"layer1\..*")
    assert sorted(regex.ctxnorm_conversion.converted) == [
        "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2",
    ]
    assert regex.ctxnorm_conversion.skipped["bn1"] == "not in target_modules"
    suffixes = convert_norms(build(), "cn", K, target_modules=["bn1"])
    assert len(suffixes.ctxnorm_conversion.converted) == 9  # stem bn1 and every block's bn1
    excluded = convert_norms(build(), "cn", K, exclude_modules=["bn1", "layer4.1.bn2"])
    assert len(excluded.ctxnorm_conversion.converted) == 10
    assert excluded.ctxnorm_conversion.skipped["layer4.1.bn2"] == "in exclude_modules"
    assert type(excluded.layer4[1].bn2) is nn.BatchNorm2d


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"strategy": "foo"}, "Unknown strategy 'foo'"),
        ({"num_contexts": 0}, "num_contexts must be an integer >= 1"),
        ({"layer_norm": "sample"}, "layer_norm must be 'token'"),
        ({"priors": [0.5, 0.6, 0.1]}, "sum to 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    arguments = {"strategy": "cn", "num_contexts": K, **kwargs}
    with pytest.raises(ValueError, match=message):
        convert_norms(timm.create_model("resnet18", pretrained=False), **arguments)


# --- the way back ---------------------------------------------------------------------------

PLAIN_CLASSES = (nn.BatchNorm2d, nn.LayerNorm, timm.layers.BatchNormAct2d)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224", "convnext_atto", "hf_convnext"])
@pytest.mark.parametrize("strategy", ["cn", "cnx"])
def test_export_context_gives_a_plain_model_with_the_same_outputs(name, strategy):
    case, _, converted = _converted(name, strategy, priors=[0.2, 0.3, 0.5])
    batch = case.inputs(6)
    with torch.no_grad():  # make every context's parameters and statistics different
        for layer in converted_layers(converted).values():
            layer.weight.mul_(torch.empty_like(layer.weight).uniform_(0.8, 1.2))
            layer.bias.add_(torch.randn_like(layer.bias) * 0.1)
            for statistic in ("running_mean", "mean"):
                if hasattr(layer, statistic):
                    getattr(layer, statistic).add_(torch.randn_like(getattr(layer, statistic)) * 0.1)
    converted.eval()
    for context in range(K):
        plain = export_context(converted, context).eval()
        assert not converted_layers(plain) and not hasattr(plain, "ctxnorm_router")
        assert not any(isinstance(m, (ContextNorm, ContextNormX, ContextLayerNorm)) for m in plain.modules())
        with torch.no_grad():
            expected = case.output(converted, batch, context_ids=torch.full((6,), context))
            torch.testing.assert_close(case.output(plain, batch), expected, atol=1e-5, rtol=1e-5)
    assert converted_layers(converted), "export_context changed the converted model"


def test_export_refuses_mixtures_and_batch_mode_layer_norms():
    acn = convert_norms(timm.create_model("resnet18", pretrained=False), "acn", K)
    with pytest.raises(ValueError, match="mixes contexts per input"):
        export_context(acn, 0)
    batch_mode = convert_norms(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32), "cn", K, layer_norm="batch")
    with pytest.raises(ValueError, match="layer_norm='batch'"):
        export_context(batch_mode, 0)


def test_single_context_export_is_a_full_unconvert():
    original = randomise_norms(timm.create_model("efficientnet_b0", pretrained=False)).eval()
    plain = export_context(convert_norms(copy.deepcopy(original), "cn", 1), 0).eval()
    assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), original(x), atol=1e-6, rtol=1e-6)


# --- what a converted model survives ---------------------------------------------------------


@pytest.mark.parametrize("strategy", ["cn", "cnx", "acn"])
def test_state_dict_into_a_freshly_converted_twin(strategy):
    case, _, converted = _converted("densenet121", strategy)
    case.output(converted.train(), case.inputs(4), context_ids=torch.tensor([0, 1, 2, 0]))
    twin = convert_norms(case.build(), strategy, K)
    twin.load_state_dict(converted.state_dict(), strict=True)
    batch, ids = case.inputs(3), torch.tensor([2, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(case.output(twin.eval(), batch, context_ids=ids), case.output(converted.eval(), batch, context_ids=ids))


def test_deepcopy_and_float64():
    case, original, converted = _converted("efficientnet_b0", "cn")
    batch, ids = case.inputs(3), torch.tensor([2, 0, 1])
    clone = copy.deepcopy(converted)
    assert clone.ctxnorm_router is not converted.ctxnorm_router
    with torch.no_grad():
        expected = case.output(converted, batch, context_ids=ids)
        torch.testing.assert_close(case.output(clone, batch, context_ids=ids), expected, atol=0, rtol=0)
        as_double = copy.deepcopy(converted).to(torch.float64)
        double_batch = {"x": batch["x"].double()}
        out = case.output(as_double, double_batch, context_ids=ids)
        expected_double = case.output(copy.deepcopy(original).double(), double_batch)
    assert out.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in as_double.parameters())
    # gamma * sqrt(lambda_k) was rounded to float32 at conversion: agreement to float32 precision
    torch.testing.assert_close(out, expected_double, atol=1e-6, rtol=1e-6)
    # the clone routes its own calls
    case.output(clone.train(), case.inputs(4), context_ids=torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="needs context ids"):
        case.output(converted.train(), case.inputs(4))


def test_bf16_autocast():
    case, _, converted = _converted("resnet18", "cn")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = case.output(converted.train(), case.inputs(4), context_ids=torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_torch_compile_matches_eager(name):
    torch._dynamo.reset()
    case, _, converted = _converted(name, "cn")
    compiled = torch.compile(copy.deepcopy(converted))
    batch = case.inputs(4)
    for ids in (torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 1])):
        with torch.no_grad():
            torch.testing.assert_close(
                case.output(compiled.eval(), batch, context_ids=ids),
                case.output(converted.eval(), batch, context_ids=ids),
                atol=1e-4,
                rtol=1e-4,
            )
    # training mode: enough samples per context for well-conditioned batch statistics
    batch, ids = case.inputs(12), torch.arange(12) % K
    out = case.output(compiled.train(), batch, context_ids=ids)
    expected = case.output(converted.train(), batch, context_ids=ids)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
