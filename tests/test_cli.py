"""The ctxnorm-hf command line: from a shell (the console script pip installs) and in-process (main)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard

from ctxnorm_hf.cli import main
from ctxnorm_hf.contexts import DomainContexts
from ctxnorm_hf.hub import from_pretrained, load_context_source
from ctxnorm_hf.surgery import converted_layers

from ._hub_helpers import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "ctxnorm-hf"  # [project.scripts] of pyproject.toml


def _shell(*args: str, env=None) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "NO_PROXY": "127.0.0.1,localhost",
        "HF_HUB_DISABLE_TELEMETRY": "1",  # no registry fetch from the default endpoint in the user agent
        **(env or {}),
    }
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _converted_test_resnet(folder: Path) -> None:
    argv = ["convert", "test_resnet", str(folder), "--strategy", "cnx", "-K", "3", "--random-init"]
    assert main(argv) == 0


def test_help_from_a_shell_and_for_every_command(capsys):
    result = _shell("--help")
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("convert", "inspect", "push"))
    for command, option in [("convert", "--strategy"), ("inspect", "--sites"), ("push", "--private")]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert option in capsys.readouterr().out


def test_convert_then_inspect_from_a_shell(tmp_path):
    folder = tmp_path / "resnet18-cn"
    result = _shell(
        "convert",
        "resnet18",
        str(folder),
        "--strategy",
        "cn",
        "-K",
        "3",
        "--priors",
        "0.5,0.3,0.2",
        "--exclude-modules",
        "layer4.1.bn2",
        "--random-init",
        "--num-classes",
        "7",
        "--dataset",
        "cifar100",
    )
    assert result.returncode == 0, result.stderr
    assert "19 converted" in result.stdout and f"Saved to {folder}" in result.stdout
    assert {path.name for path in folder.iterdir()} == {
        "model.safetensors",
        "config.json",
        "ctxnorm_config.json",
        "README.md",
    }
    config = json.loads((folder / "ctxnorm_config.json").read_text())
    assert (config["strategy"], config["num_contexts"]) == ("cn", 3) and config["priors"] == pytest.approx(
        [0.5, 0.3, 0.2]
    )
    assert "layer4.1.bn2" not in config["converted"] and config["left_alone"] == {"layer4.1.bn2": "in exclude_modules"}
    assert ModelCard.load(folder / "README.md").data.datasets == ["cifar100"]
    model = from_pretrained(folder)
    assert model.num_classes == 7 and type(model.layer4[1].bn2) is torch.nn.BatchNorm2d

    result = _shell("inspect", str(folder))
    assert result.returncode == 0, result.stderr
    for expected in (
        "timm resnet18",
        "strategy:       cn",
        "contexts K:     3",
        "priors:         0.5, 0.3, 0.2",
        "19 layers (1 norm-like layers left alone)",
        "BatchNorm2d -> ContextNorm",
        "context source: none",
        "model.safetensors (",
        "ctxnorm_hf 0.1.0",
    ):
        assert expected in result.stdout


@pytest.mark.parametrize(
    "args, reason",
    [
        (["convert", "resnet18x", "{tmp}/out", "-K", "2"], "Unknown model 'resnet18x'"),
        (["inspect", "{tmp}"], "is not a converted model: it has no ctxnorm_config.json"),
    ],
    ids=["unknown-model", "not-converted"],
)
def test_bad_input_from_a_shell_gives_one_line_and_no_traceback(args, reason, tmp_path):
    result = _shell(*[arg.format(tmp=tmp_path) for arg in args])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ctxnorm-hf {args[0]}: error: ") and reason in lines[0]


def test_bad_input_in_process(tmp_path, capsys):
    source_dir = tmp_path / "source"
    DomainContexts(["a", "b"]).fit({"a": 1, "b": 3}).save(source_dir)
    cases = [
        (["convert", "resnet18", str(tmp_path / "o"), "--random-init"], "give the number of contexts with -K"),
        (
            ["convert", "resnet18", str(tmp_path / "o"), "-K", "3", "--context-source", str(source_dir)],
            "-K 3 disagrees",
        ),
        (
            ["convert", "resnet18", str(tmp_path / "o"), "-K", "2", "--priors", "0.9,0.9", "--random-init"],
            "priors must sum to 1",
        ),
        (
            ["convert", "resnet18", str(tmp_path / "o"), "-K", "2", "--context-source", str(tmp_path)],
            "No context_source.json",
        ),
        (["push", str(tmp_path), "user/name"], "is not a converted model"),
        (["inspect", str(tmp_path / "no" / "such" / "dir")], "neither a folder nor a Hub repo id"),
        (["convert", "resnet18", str(tmp_path / "o"), "-K", "2", "--random-init", "--model-arg", "wings=2"], "wings"),
    ]
    for argv, reason in cases:
        assert main(argv) == 1, argv
        assert reason in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # usage errors are argparse's: status 2
        main(["convert", "resnet18", str(tmp_path / "o"), "--priors", "a,b"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "o").exists()


def test_convert_a_transformers_config_with_a_context_source(tmp_path, capsys):
    config_dir = tmp_path / "vit-config"
    transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(config_dir)
    source_dir = tmp_path / "source"
    source = DomainContexts(["a", "b"]).fit({"a": 1, "b": 3})
    source.save(source_dir)
    out = tmp_path / "vit-cn"
    argv = [
        "convert",
        str(config_dir / "config.json"),
        str(out),
        "--context-source",
        str(source_dir),
        "--architecture",
        "ViTForImageClassification",
        "--num-classes",
        "3",
        "--model-arg",
        "hidden_dropout_prob=0.25",
        "--repo-id",
        "user/vit-cn",
    ]
    assert main(argv) == 0
    assert "5 converted" in capsys.readouterr().out
    model = from_pretrained(out)
    assert type(model).__name__ == "ViTForImageClassification"
    assert model.config.num_labels == 3 and model.config.hidden_dropout_prob == 0.25
    assert all(layer.priors.tolist() == pytest.approx([0.25, 0.75]) for layer in converted_layers(model).values())
    assert load_context_source(out).domains == ["a", "b"]
    assert 'from_pretrained("user/vit-cn")' in (out / "README.md").read_text()

    assert main(["inspect", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (
        printed["context_source"]["kind"] == "domain"
        and printed["base_model"]["architecture"] == "ViTForImageClassification"
    )


def test_convert_a_pretrained_transformers_folder_keeps_its_weights(tmp_path, capsys):
    original = transformers.ResNetForImageClassification(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4)
    ).eval()
    with torch.no_grad():  # pretrained-looking statistics, so that keeping them is visible
        for module in original.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    original.save_pretrained(tmp_path / "pretrained")
    assert main(["convert", str(tmp_path / "pretrained"), str(tmp_path / "cn"), "-K", "2"]) == 0
    converted = from_pretrained(tmp_path / "cn")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = original(pixel_values=x).logits
        for k in range(2):
            got = converted(pixel_values=x, context_ids=torch.full((3,), k)).logits
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_push_from_a_shell_uploads_the_folder(tmp_path):
    folder = tmp_path / "resnet-cnx"
    _converted_test_resnet(folder)
    with FakeHub() as hub:
        result = _shell(
            "push",
            str(folder),
            "me/resnet-cnx",
            "--private",
            "--revision",
            "v1",
            "--commit-message",
            "first",
            "--token",
            "hf_cli_token",
            env={"HF_ENDPOINT": hub.url},
        )
        assert result.returncode == 0, result.stderr
        assert f"{hub.url}/me/resnet-cnx/commit/" in result.stdout
        payload = hub.find("POST", "/api/repos/create")[0].json()
        assert payload["name"] == "resnet-cnx" and (payload.get("visibility") == "private" or payload.get("private"))
        (commit,) = hub.find("POST", "/commit/")
        assert commit.path == "/api/models/me/resnet-cnx/commit/v1"
        assert commit.ndjson()[0]["value"]["summary"] == "first"
        assert all(r.headers.get("authorization") == "Bearer hf_cli_token" for r in hub.requests)
        pushed = hub.files("me/resnet-cnx", "v1")
        assert pushed == {path.name: path.read_bytes() for path in folder.iterdir()}
        assert 'from_pretrained("me/resnet-cnx")' in pushed["README.md"].decode()  # the card names the repo
