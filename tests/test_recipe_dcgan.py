"""recipes/dcgan.py and ctxnorm_hf.frechet: the Frechet distance, a tiny real run with a resume, argument checks."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from ctxnorm_hf import AdaptiveContextNorm, MixtureNorm
from ctxnorm_hf.frechet import GaussianStats, frechet_distance, gaussian_stats
from ctxnorm_hf.image_data import load_image_data

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "dcgan.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOT_INCEPTION = "FD (feature space of a classifier trained on the data, not Inception)"
TINY = [
    "--dataset", "digits", "--train-subset", "96", "--fd-samples", "48", "--batch-size", "32", "--width", "8",
    "--latent-dim", "16", "--classifier-epochs", "1", "--seeds", "0", "--fid-every", "1", "--sample-every", "1",
]


def _recipe():
    """recipes/dcgan.py imported as a module (registered, so its dataclasses resolve their module)."""
    if "dcgan_recipe" not in sys.modules:
        spec = importlib.util.spec_from_file_location("dcgan_recipe", RECIPE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["dcgan_recipe"] = module
        spec.loader.exec_module(module)
    return sys.modules["dcgan_recipe"]


def _run(args, out, timeout=120, launcher=None):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    command = (launcher or [sys.executable]) + [str(RECIPE), "--output-dir", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


# --- the Frechet distance ---------------------------------------------------------------------------------


def test_identical_gaussians_are_at_distance_zero():
    features = np.random.default_rng(0).normal(size=(400, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    stats = gaussian_stats(features)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(stats, gaussian_stats(torch.from_numpy(features).float())) == pytest.approx(0.0, abs=1e-4)


def test_diagonal_gaussians_give_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2.0 * np.sqrt(s1 * s2)).sum()
    distance = frechet_distance(GaussianStats(mu1, np.diag(s1), 10), GaussianStats(mu2, np.diag(s2), 10))
    assert distance == pytest.approx(expected, rel=1e-10)


def test_full_covariances_agree_with_scipy_sqrtm():
    rng = np.random.default_rng(0)
    first = gaussian_stats(rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)))
    second = gaussian_stats(rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 2.0)
    root = scipy.linalg.sqrtm(first.cov @ second.cov).real
    expected = ((first.mean - second.mean) ** 2).sum() + np.trace(first.cov + second.cov - 2.0 * root)
    assert frechet_distance(first, second) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(first, second) == pytest.approx(frechet_distance(second, first), rel=1e-8)


def test_gaussian_stats_are_mean_and_unbiased_covariance():
    features = np.random.default_rng(0).normal(size=(50, 3))
    stats = gaussian_stats(features)
    np.testing.assert_allclose(stats.mean, features.mean(0))
    np.testing.assert_allclose(stats.cov, np.cov(features.T, ddof=1))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(features[:1])


# --- the networks and the feature space -------------------------------------------------------------------


@pytest.mark.parametrize("norm,layer", [("acn", AdaptiveContextNorm), ("mixnorm", MixtureNorm), ("bn", torch.nn.BatchNorm2d)])
def test_generator_normalizes_its_first_three_layers(norm, layer):
    dcgan = _recipe()
    generator = dcgan.Generator(16, 8, 3, dcgan.GENERATOR_NORMS[norm], 3)
    assert [type(generator.get_submodule(name)) for name in ("norm0", "norm1", "norm2")] == [layer] * 3
    images = generator(torch.randn(5, 16))
    assert images.shape == (5, 3, 32, 32) and images.abs().max() <= 1.0
    assert dcgan.Discriminator(8, 3)(images).shape == (5,)


def test_auto_falls_back_to_a_classifier_labelled_as_not_inception(tmp_path, monkeypatch):
    from accelerate import Accelerator

    dcgan = _recipe()
    monkeypatch.setattr(dcgan, "load_inception", lambda: (None, ["pytorch_fid: offline"]))
    args, parser = dcgan.parse_args(["--output-dir", str(tmp_path), "--classifier-epochs", "1"])
    data = load_image_data("digits").subset(64, 32).resized(32)
    space, notes = dcgan.resolve_feature_space(args, data, Accelerator(), parser)
    assert space.name == "classifier" and space.label == NOT_INCEPTION
    assert notes[0] == "Inception not loaded (pytorch_fid: offline)"
    assert space.extractor(data.test_images[:4]).shape == (4, 128)


# --- the recipe end to end ---------------------------------------------------------------------------------


def test_tiny_run_writes_metrics_report_grids_and_curves(tmp_path):
    out = tmp_path / "out"
    result = _run(TINY + ["--norms", "bn,acn", "--epochs", "2"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"config", "distance", "real_test_floor", "runs", "summary"} <= set(metrics)
    assert [(run["norm"], run["seed"]) for run in metrics["runs"]] == [("bn", 0), ("acn", 0)]
    name = metrics["distance"]["name"]
    for run in metrics["runs"]:
        assert len(run["history"][name]) == 2 and run["history"][f"{name} epoch"] == [1, 2]
        assert run["metrics"]["final"] == run["history"][name][-1] >= 0.0
    assert set(metrics["summary"]["acn"]["final"]) == {"mean", "std", "n"}
    report = (out / "report.md").read_text()
    assert "| bn |" in report and "| acn |" in report
    if metrics["distance"]["feature_space"] == "classifier":  # no Inception could be loaded
        assert NOT_INCEPTION in report and metrics["distance"]["label"] == NOT_INCEPTION
    grids = [out / "samples" / f"{norm}-seed0" / f"epoch-000{epoch}.png" for norm in ("bn", "acn") for epoch in (1, 2)]
    for png in [out / "samples" / "real.png", out / "curves.png", *grids]:
        assert png.read_bytes()[:8] == PNG_MAGIC, png


def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    dcgan = _recipe()
    tiny = TINY + ["--output-dir", str(tmp_path), "--norms", "acn", "--fd-features", "classifier"]
    assert dcgan.main(tiny + ["--epochs", "2", "--checkpoint-every", "1"]) == 0
    first = json.loads((tmp_path / "metrics.json").read_text())["runs"][0]
    assert os.listdir(tmp_path / "runs" / "acn-seed0" / "checkpoints") == ["epoch-0002"]  # only the latest is kept
    assert dcgan.main(tiny + ["--epochs", "3", "--resume"]) == 0
    resumed = json.loads((tmp_path / "metrics.json").read_text())["runs"][0]
    assert resumed["history"]["D loss"][:2] == first["history"]["D loss"] and len(resumed["history"]["D loss"]) == 3
    assert resumed["history"]["FD epoch"] == [1, 2, 3]


@pytest.mark.slow
def test_two_gloo_ranks_with_torchrun(tmp_path):
    torchrun = [shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2"]
    result = _run(TINY + ["--norms", "mixnorm,acn", "--epochs", "2", "--checkpoint-every", "1"], tmp_path / "out", timeout=300, launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [run["norm"] for run in metrics["runs"]] == ["mixnorm", "acn"]
    assert all(len(run["history"]["FD"]) == 2 for run in metrics["runs"])


def test_a_bad_argument_ends_the_process_with_code_2_and_one_line(tmp_path):
    result = _run(["--norms", "bn,groupnorm"], tmp_path / "out", timeout=60)
    assert result.returncode == 2
    assert "unknown norm(s) ['groupnorm']" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--norms", "bn,cn"], "cn: not a generator norm"),
        (["--contexts", "0"], "--contexts must be >= 1"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--dataset", "mnist_full"], "unknown dataset 'mnist_full'"),
        (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
        (["--dataset", "imagefolder:/no/such/folder"], "cannot load imagefolder:/no/such/folder"),
    ],
)
def test_bad_arguments_exit_with_code_2_and_a_one_line_reason(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _recipe().main(args + ["--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
