"""save_pretrained / from_pretrained / load_context_source / push_to_hub on real timm and
transformers models, real files and a Hub stand-in on 127.0.0.1 (tests/_hub_helpers.FakeHub)."""

import copy
import json

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from torch import nn

import ctxnorm_hf
from ctxnorm_hf import convert_norms
from ctxnorm_hf.contexts import DomainContexts, KMeansContexts, SuperclassContexts
from ctxnorm_hf.hub import from_pretrained, load_context_source, push_to_hub, save_pretrained
from ctxnorm_hf.surgery import converted_layers

from ._hub_helpers import HUB_CASES, NUM_CLASSES, FakeHub, loopback_only

K = 3
IDS = torch.arange(12) % 3  # four samples per context: per-context batch statistics stay tame
SAVED_FILES = {
    "model.safetensors",
    "config.json",
    "ctxnorm_config.json",
    "README.md",
    "context_source.json",
    "context_source.safetensors",
}


def _train_one_step(case, model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(case.output(model, x, context_ids=IDS), torch.arange(len(x)) % NUM_CLASSES)
    loss.backward()
    optimizer.step()


def _eval_outputs(case, model: nn.Module, x: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return [case.output(model, x, context_ids=torch.full((len(x),), k)) for k in range(K)]


def _trained(name: str, strategy: str, **convert_kwargs):
    case = HUB_CASES[name]
    model = convert_norms(case.build(), strategy, K, **convert_kwargs)
    x = case.inputs(len(IDS))
    before = _eval_outputs(case, copy.deepcopy(model), x)
    _train_one_step(case, model, x)
    after = _eval_outputs(case, model, x)
    assert all(torch.isfinite(out).all() for out in after)
    assert not all(torch.equal(b, a) for b, a in zip(before, after)), "the training step changed nothing"
    return case, model, x


def _superclass_source() -> SuperclassContexts:
    return SuperclassContexts([0, 1, 2, 0], K, ["a", "b", "c"], name="toy").fit([0, 1, 2, 3, 3, 0, 1, 1])


@pytest.mark.parametrize("strategy", ["cn", "cnx", "acn"])
@pytest.mark.parametrize("name", list(HUB_CASES))
def test_round_trip_gives_the_same_model_and_context_source(name, strategy, tmp_path):
    case, model, x = _trained(name, strategy)
    source = KMeansContexts(K, seed=0).fit(case.inputs(24))
    save_pretrained(model, tmp_path, context_source=source)

    loaded = from_pretrained(tmp_path)
    assert not loaded.training
    for expected, got in zip(_eval_outputs(case, model, x), _eval_outputs(case, loaded, x)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert loaded.ctxnorm_conversion.converted == model.ctxnorm_conversion.converted
    loaded_source = load_context_source(tmp_path)
    assert isinstance(loaded_source, KMeansContexts)
    probe = case.inputs(16)
    assert torch.equal(loaded_source.assign(probe), source.assign(probe))
    torch.testing.assert_close(loaded_source.priors, source.priors)


def test_folder_holds_weights_base_config_ctxnorm_config_and_card_for_timm(tmp_path):
    case, model, _ = _trained("vit_tiny_patch16_224", "cn", priors=[0.5, 0.3, 0.2])
    source = _superclass_source()
    save_pretrained(model, tmp_path, context_source=source)
    assert {path.name for path in tmp_path.iterdir()} == SAVED_FILES

    base = json.loads((tmp_path / "config.json").read_text())
    assert base["architecture"] == "vit_tiny_patch16_224"
    assert base["num_classes"] == NUM_CLASSES
    assert base["model_args"]["img_size"] == [32, 32]
    assert base["pretrained_cfg"]["input_size"] == [3, 32, 32]

    config = json.loads((tmp_path / "ctxnorm_config.json").read_text())
    assert config["ctxnorm_hf_version"] == ctxnorm_hf.__version__
    assert (config["strategy"], config["num_contexts"], config["layer_norm"]) == ("cn", K, "token")
    assert config["priors"] == pytest.approx([0.5, 0.3, 0.2])
    assert config["base_model"] == {
        "library": "timm",
        "architecture": "vit_tiny_patch16_224",
        "name_or_path": None,
        "dtype": "float32",
    }
    report = model.ctxnorm_conversion
    assert {
        name: (site["original_class"], site["class"]) for name, site in config["converted"].items()
    } == report.converted
    assert config["converted"]["norm"] == {
        "original_class": "timm.layers.norm.LayerNorm",
        "class": "ContextLayerNorm",
        "eps": 1e-6,
    }
    assert config["context_source"] == json.loads(json.dumps(source.to_dict()))


def test_transformers_folder_holds_its_own_config(tmp_path):
    _, model, _ = _trained("hf_resnet", "cnx")
    save_pretrained(model, tmp_path)
    base = json.loads((tmp_path / "config.json").read_text())
    assert base["architectures"] == ["ResNetForImageClassification"]
    assert base["model_type"] == "resnet" and len(base["id2label"]) == NUM_CLASSES
    assert json.loads((tmp_path / "ctxnorm_config.json").read_text())["base_model"]["library"] == "transformers"
    assert {path.name for path in tmp_path.iterdir()} == SAVED_FILES - {
        "context_source.json",
        "context_source.safetensors",
    }


def test_model_card_has_metadata_loading_snippet_and_results(tmp_path):
    _, model, _ = _trained("resnet18", "cn")
    save_pretrained(
        model,
        tmp_path,
        context_source=_superclass_source(),
        model_id="user/resnet18-cn",
        base_model="timm/resnet18.a1_in1k",
        datasets=["cifar100"],
        metrics=["accuracy"],
        license="apache-2.0",
        results=[
            {"protocol": "oracle ids", "accuracy": 0.912},
            {"protocol": "inferred ids", "accuracy": torch.tensor(0.85)},
        ],
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "ctxnorm_hf"
    assert {"ctxnorm_hf", "cn", "timm"} <= set(card.data.tags)
    assert card.data.base_model == "timm/resnet18.a1_in1k"
    assert (
        card.data.datasets == ["cifar100"] and card.data.metrics == ["accuracy"] and card.data.license == "apache-2.0"
    )
    assert 'model = from_pretrained("user/resnet18-cn")' in card.text
    assert 'source = load_context_source("user/resnet18-cn")' in card.text
    assert "outputs = model(images, context_ids=ids)" in card.text
    assert "| protocol | accuracy |" in card.text
    assert "| oracle ids | 0.912 |" in card.text and "| inferred ids | 0.85 |" in card.text
    assert "derived from the labels" in card.text  # superclass ids are an oracle at test time


def test_model_card_without_ids_or_results(tmp_path):
    _, model, _ = _trained("hf_vit", "acn")
    save_pretrained(model, tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.datasets is None and card.data.metrics is None
    assert "outputs = model(pixel_values=images)" in card.text
    assert "context_ids" not in card.text and "## Results" not in card.text
    assert f'from_pretrained("{tmp_path}")' in card.text


def _edit_weights(folder, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda tensors: tensors.pop("layer1.0.bn1.running_mean"), r"missing keys \['layer1.0.bn1.running_mean'\]"),
        (lambda tensors: tensors.update(extra=torch.zeros(2)), r"unexpected keys \['extra'\]"),
        (lambda tensors: tensors.update({"fc.bias": torch.zeros(NUM_CLASSES + 1)}), "size mismatch"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_loading_is_strict(edit, message, tmp_path):
    _, model, _ = _trained("resnet18", "cn")
    save_pretrained(model, tmp_path)
    _edit_weights(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        from_pretrained(tmp_path)


def test_unknown_config_keys_from_a_newer_version_warn(tmp_path):
    case, model, x = _trained("resnet18", "cnx")
    save_pretrained(model, tmp_path)
    path = tmp_path / "ctxnorm_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "ctxnorm_hf_version": "9.0.0", "future_option": {"a": 1}}))
    with pytest.warns(UserWarning, match=r"future_option.*9\.0\.0"):
        loaded = from_pretrained(tmp_path)
    torch.testing.assert_close(_eval_outputs(case, loaded, x), _eval_outputs(case, model, x))


def test_clear_errors_for_what_cannot_be_saved_or_loaded(tmp_path):
    plain = HUB_CASES["resnet18"].build()
    with pytest.raises(ValueError, match="not converted: call ctxnorm_hf.convert_norms"):
        save_pretrained(plain, tmp_path / "plain")
    with pytest.raises(ValueError, match="not a converted model: it has no ctxnorm_config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hub repo id"):
        from_pretrained(tmp_path / "missing" / "deeper" / "path")

    model = convert_norms(HUB_CASES["resnet18"].build(), "cn", K)
    with pytest.raises(ValueError, match="gives 2 contexts but the model was converted with K=3"):
        save_pretrained(model, tmp_path / "m", context_source=DomainContexts(["a", "b"]).fit({"a": 1, "b": 1}))
    with pytest.raises(ValueError, match="not fitted"):
        save_pretrained(model, tmp_path / "m", context_source=SuperclassContexts([0, 1, 2]))

    save_pretrained(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete: it lacks model.safetensors"):
        from_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "ctxnorm_config.json").read_text())
    del config["converted"]
    (tmp_path / "m" / "ctxnorm_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks converted"):
        from_pretrained(tmp_path / "m")


def test_conversion_options_are_restored(tmp_path):
    """eps / momentum overrides, excluded sites and layer_norm='batch' survive the round trip."""
    case, model, x = _trained(
        "vit_tiny_patch16_224", "cn", layer_norm="batch", eps=1e-3, momentum=0.3, exclude_modules=r"blocks\.0\..*"
    )
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    layers = converted_layers(loaded)
    assert set(layers) == set(converted_layers(model)) and "blocks.0.norm1" not in layers
    assert type(loaded.blocks[0].norm1) is type(model.blocks[0].norm1)
    assert type(model.blocks[0].norm1).__name__ == "LayerNorm"
    assert all(layer.eps == 1e-3 and layer.momentum == 0.3 for layer in layers.values())
    assert loaded.ctxnorm_conversion.layer_norm == "batch"
    assert loaded.ctxnorm_conversion.skipped == model.ctxnorm_conversion.skipped
    torch.testing.assert_close(_eval_outputs(case, loaded, x), _eval_outputs(case, model, x))


def test_context_source_is_optional_and_a_stale_one_is_removed(tmp_path):
    _, model, _ = _trained("resnet18", "cn")
    save_pretrained(model, tmp_path, context_source=_superclass_source())
    assert isinstance(load_context_source(tmp_path), SuperclassContexts)
    save_pretrained(model, tmp_path)
    assert load_context_source(tmp_path) is None
    assert not (tmp_path / "context_source.safetensors").exists()
    assert json.loads((tmp_path / "ctxnorm_config.json").read_text())["context_source"] is None


def test_tied_weights_are_stored_once_and_tied_again(tmp_path):
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = convert_norms(transformers.BertForMaskedLM(config), "cnx", K)
    tokens = torch.randint(0, 50, (len(IDS), 7))
    model.train()
    model(input_ids=tokens, labels=tokens, context_ids=IDS).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    save_pretrained(model, tmp_path)

    stored = load_file(tmp_path / "model.safetensors")
    tied = {"bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"}
    assert len(tied & stored.keys()) == 1
    loaded = from_pretrained(tmp_path)
    assert loaded.cls.predictions.decoder.weight.data_ptr() == loaded.bert.embeddings.word_embeddings.weight.data_ptr()
    model.eval()
    for k in range(K):
        ids = torch.full((len(IDS),), k)
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(input_ids=tokens, context_ids=ids).logits, model(input_ids=tokens, context_ids=ids).logits
            )


def test_device_dtype_wrappers_and_random_state(tmp_path):
    case, model, x = _trained("hf_resnet", "cn")
    save_pretrained(torch.compile(model), tmp_path)  # the compiled wrapper is saved as the model it wraps
    assert not any(key.startswith("_orig_mod") for key in load_file(tmp_path / "model.safetensors"))
    state = torch.random.get_rng_state()
    loaded = from_pretrained(tmp_path, device="cpu", dtype=torch.float64)
    assert torch.equal(torch.random.get_rng_state(), state), "loading must not move the global random stream"
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    expected = _eval_outputs(case, model, x)
    got = _eval_outputs(case, loaded, x.double())
    torch.testing.assert_close([g.float() for g in got], expected, rtol=1e-4, atol=1e-5)

    save_pretrained(model.to(torch.bfloat16), tmp_path / "bf16")  # by default a model loads in its saved dtype
    loaded = from_pretrained(tmp_path / "bf16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    torch.testing.assert_close(_eval_outputs(case, loaded, x.bfloat16()), _eval_outputs(case, model, x.bfloat16()))


def test_push_to_hub_sends_the_saved_folder_and_reloads_from_it(tmp_path, monkeypatch):
    refused = loopback_only(monkeypatch)
    case, model, x = _trained("hf_resnet", "cn")  # small weights: they travel inline, base64
    source = DomainContexts(["mnist", "svhn", "usps"]).fit({"mnist": 60, "svhn": 70, "usps": 7})
    local = save_pretrained(model, tmp_path / "local", context_source=source, model_id="user/name")
    with FakeHub() as hub:
        info = push_to_hub(
            model,
            "user/name",
            private=True,
            token="hf_test_token",
            revision="dev",
            commit_message="Add CN ResNet",
            context_source=source,
            endpoint=hub.url,
        )
        assert info.commit_url.startswith(f"{hub.url}/user/name/commit/")

        (create,) = hub.find("POST", "/api/repos/create")
        payload = create.json()
        assert (payload["organization"], payload["name"]) == ("user", "name")
        assert payload.get("visibility") == "private" or payload.get("private") is True
        assert hub.find("POST", "/api/models/user/name/branch/dev")
        (commit,) = hub.find("POST", "/commit/")
        assert commit.path == "/api/models/user/name/commit/dev"
        header, *operations = commit.ndjson()
        assert header == {"key": "header", "value": {"summary": "Add CN ResNet", "description": ""}}
        assert {op["value"]["path"] for op in operations} == SAVED_FILES
        assert all(r.headers.get("authorization") == "Bearer hf_test_token" for r in hub.requests)
        assert all("ctxnorm_hf/" in r.headers.get("user-agent", "") for r in hub.requests)
        pushed = hub.files("user/name", "dev")
        assert pushed == {name: (local / name).read_bytes() for name in SAVED_FILES}

        cache = tmp_path / "cache"
        loaded = from_pretrained("user/name", revision="dev", token="hf_test_token", endpoint=hub.url, cache_dir=cache)
        torch.testing.assert_close(_eval_outputs(case, loaded, x), _eval_outputs(case, model, x))
        loaded_source = load_context_source("user/name", revision="dev", endpoint=hub.url, cache_dir=cache)
        assert loaded_source.domains == source.domains and torch.equal(
            loaded_source.assign("svhn", 2), torch.tensor([1, 1])
        )

        # A second push to the default branch of the existing repo, public by default, no source.
        push_to_hub(model, "user/name", token="hf_test_token", endpoint=hub.url)
        assert set(hub.files("user/name", "main")) == SAVED_FILES - {
            "context_source.json",
            "context_source.safetensors",
        }
        assert load_context_source("user/name", endpoint=hub.url, cache_dir=cache) is None
        hub.files("user/name", "dev").pop("ctxnorm_config.json")
        with pytest.raises(ValueError, match="Hub repo user/name is not a converted model"):
            from_pretrained("user/name", revision="dev", endpoint=hub.url, cache_dir=tmp_path / "fresh")
    assert not refused, f"connections outside loopback: {refused}"
