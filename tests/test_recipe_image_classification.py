"""Smoke tests of recipes/image_classification.py: tiny real runs, two gloo ranks, argument checks."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ctxnorm_hf import from_pretrained, load_context_source

from ._hub_helpers import FakeHub

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "image_classification.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--epochs", "1", "--seeds", "0", "--train-subset", "192", "--test-subset", "96", "--batch-size", "32"]


def _run(args, tmp_path, launcher=None, timeout=300, env=None):
    command = (launcher or [sys.executable]) + [str(RECIPE), "--output-dir", str(tmp_path / "out"), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    """IDX files in Fashion-MNIST's layout: class-dependent blobs so there is something to learn."""
    rng = np.random.default_rng(0)
    directory = tmp_path / "fashion"
    directory.mkdir()
    for prefix, count in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 60, (count, 28, 28))
        for index, label in enumerate(labels):
            images[index, 2 * label : 2 * label + 8, 4:24] += 180
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


def test_kmeans_contexts_on_digits_write_report_metrics_and_curves(tmp_path):
    result = _run(TINY + ["--norms", "bn,cn,acn"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {run["norm"] for run in metrics["runs"]} == {"bn", "cn", "acn"}
    assert all("eval_accuracy" in run["metrics"] and run["history"]["train loss"] for run in metrics["runs"])
    assert all(len(run["history"]["validation accuracy"]) == len(run["history"]["train loss"]) == 1 for run in metrics["runs"])
    assert metrics["context_source"]["kind"] == "kmeans"
    report = (out / "report.md").read_text()
    assert "| cn |" in report and "honest" in report and "oracle" not in report.split("|---")[0].split("\n")[-1]
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_superclass_contexts_report_both_protocols(tmp_path, fashion_dir):
    result = _run(
        TINY + ["--dataset", "fashion_mnist", "--data-dir", str(fashion_dir), "--contexts", "superclass", "--norms", "bn,cn"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    cn_run = next(run for run in metrics["runs"] if run["norm"] == "cn")
    assert {"eval_oracle_accuracy", "eval_inferred_accuracy", "eval_accuracy"} <= set(cn_run["metrics"])
    assert metrics["context_source"]["name"] == "fashion-mnist-groups" and metrics["context_source"]["num_contexts"] == 3
    report = (tmp_path / "out" / "report.md").read_text()
    assert "oracle: ids from labels" in report and "honest: ids from the input" in report


@pytest.mark.parametrize("model", ["small_convnet", "small_vit"])  # a plain torch module, a transformers model
def test_resume_continues_from_the_last_checkpoint(model, tmp_path):
    small = ["--model", model, "--seeds", "0", "--train-subset", "128", "--test-subset", "64", "--batch-size", "32",
             "--norms", "cn", "--save-checkpoints"]
    first = _run(small + ["--epochs", "1", "--lr", "0.01"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "out" / "runs" / "cn-seed0"
    assert [entry.name for entry in run_dir.iterdir() if entry.name.startswith("checkpoint-")] == ["checkpoint-4"]
    first_run = json.loads((tmp_path / "out" / "metrics.json").read_text())["runs"][0]

    # Nothing left to train: the resumed run evaluates exactly the weights of the checkpoint.
    again = _run(small + ["--epochs", "1", "--lr", "0.01", "--resume"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "missing keys" not in again.stderr
    resumed = json.loads((tmp_path / "out" / "metrics.json").read_text())["runs"][0]
    assert resumed["metrics"]["eval_loss"] == first_run["metrics"]["eval_loss"]

    # A different learning rate: a run started afresh would log another first-epoch loss.
    second = _run(small + ["--epochs", "2", "--lr", "0.003", "--resume"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    run = json.loads((tmp_path / "out" / "metrics.json").read_text())["runs"][0]
    assert run["metrics"]["epoch"] == 2.0 and len(run["history"]["train loss"]) == 2
    assert run["history"]["train loss"][0] == first_run["history"]["train loss"][0]


def test_two_gloo_ranks_with_torchrun(tmp_path):
    torchrun = [shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2"]
    result = _run(TINY + ["--norms", "cn"], tmp_path, launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [run["norm"] for run in metrics["runs"]] == ["cn"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "no_such_model"], "unknown model 'no_such_model'"),
        (["--norms", "bn,groupnorm"], "unknown norm(s) ['groupnorm']"),
        (["--num-contexts", "0"], "--num-contexts must be >= 1"),
        (["--contexts", "superclass"], "digits has no built-in superclass map"),
        (["--contexts", "none", "--norms", "cn"], "cn need context ids"),
        (["--dataset", "mnist_full"], "unknown dataset 'mnist_full'"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--push-to-hub", "user/name"], "--push-to-hub needs a timm or transformers model"),
    ],
)
def test_bad_arguments_exit_with_a_one_line_reason(args, message, tmp_path):
    result = _run(args, tmp_path, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in result.stderr


def test_push_to_hub_sends_the_best_converted_run_with_the_comparison_in_its_card(tmp_path):
    hub_env = {"HF_TOKEN": "hf_recipe_token", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with FakeHub() as hub:
        result = _run(
            TINY + ["--model", "small_vit", "--norms", "ln,cn", "--push-to-hub", "user/best"],
            tmp_path,
            env={**hub_env, "HF_ENDPOINT": hub.url},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        pushed = hub.repos["user/best"]["branches"]["main"]
    assert all(r.headers.get("authorization") == "Bearer hf_recipe_token" for r in hub.requests)
    folder = tmp_path / "pushed"
    folder.mkdir()
    for name, content in pushed.items():
        (folder / name).write_bytes(content)
    config = json.loads((folder / "ctxnorm_config.json").read_text())
    assert config["strategy"] == "cn" and config["context_source"]["kind"] == "kmeans"
    card = (folder / "README.md").read_text()
    assert "| ln |" in card and "| cn |" in card and "user/best" in card

    model = from_pretrained(folder)  # strict: every weight of the trained run is there
    run_weights = load_file(tmp_path / "out" / "runs" / "cn-seed0" / "final" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, run_weights[name], rtol=0, atol=0)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert json.loads(json.dumps(load_context_source(folder).to_dict())) == metrics["context_source"]
