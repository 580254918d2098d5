"""recipes/domain_adaptation.py: tiny real runs (one process, resume, two gloo ranks), argument checks, AdaMatch's parts."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctxnorm_hf.contexts import DomainContexts

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "domain_adaptation.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--epochs", "2", "--steps-per-epoch", "2", "--train-subset", "64", "--test-subset", "48",
    "--batch-size", "8", "--uratio", "1", "--image-size", "8", "--seeds", "0",
]


def _run(args, out, launcher=None, timeout=120, **env):
    command = (launcher or [sys.executable]) + [str(RECIPE), "--output-dir", str(out), *args]
    # one thread: the tiny network is fastest single-threaded, and parallel test jobs do not oversubscribe the cores
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("domain_adaptation_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


# --- end to end ----------------------------------------------------------------------------------------


def test_digits_to_mnist_sample_writes_metrics_report_and_curves(tmp_path):
    result = _run(TINY + ["--norms", "bn,cn", "--ema-decay", "0.9"], tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    keys = {f"{domain}_{name}" for domain in ("source", "target") for name in ("accuracy", "precision", "recall", "f1")}
    assert [run["norm"] for run in metrics["runs"]] == ["bn", "cn"]
    for run in metrics["runs"]:
        assert set(run["metrics"]) == keys and all(0.0 <= value <= 1.0 for value in run["metrics"].values())
        assert len(run["history"]["target test accuracy"]) == 2 and len(run["history"]["mask rate"]) == 2
    assert set(metrics["summary"]) == {"bn", "cn"} and set(metrics["summary"]["cn"]) == keys
    assert metrics["context_source"]["kind"] == "domain" and metrics["context_source"]["domains"] == ["digits", "mnist_sample"]
    report = (out / "report.md").read_text()
    assert "| bn |" in report and "| cn |" in report and "target f1" in report and "digits -> mnist_sample" in report
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "| cn |" in result.stdout  # the table is printed too


def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    first = _run(TINY + ["--norms", "cn", "--epochs", "1", "--checkpoint-every", "1", "--source", "mnist_sample", "--target", "digits"], tmp_path / "out")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "out" / "runs" / "cn-seed0" / "checkpoints"
    assert [path.name for path in checkpoints.iterdir()] == ["epoch-0001"]
    second = _run(TINY + ["--norms", "cn", "--checkpoint-every", "1", "--resume", "--source", "mnist_sample", "--target", "digits"], tmp_path / "out")
    assert second.returncode == 0, second.stderr[-3000:]
    assert [path.name for path in checkpoints.iterdir()] == ["epoch-0002"]  # only the latest is kept
    run = json.loads((tmp_path / "out" / "metrics.json").read_text())["runs"][0]
    assert len(run["history"]["train loss"]) == 2  # epoch 1 from the checkpoint, epoch 2 trained now


def test_two_gloo_ranks_with_torchrun(tmp_path):
    torchrun = [shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2"]
    result = _run(TINY + ["--norms", "cn"], tmp_path / "out", launcher=torchrun, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [run["norm"] for run in metrics["runs"]] == ["cn"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--norms", "bn,groupnorm"], "unknown norm(s) ['groupnorm']"),
        (["--paper"], "cannot load mnist"),  # the Hub pair, offline
    ],
)
def test_bad_arguments_exit_with_a_one_line_reason(args, message, tmp_path):
    result = _run(args, tmp_path / "out", HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--norms", "ln"], "the wide ResNet has no LayerNorm"),
        (["--num-components", "0"], "--num-components must be >= 1"),
        (["--source", "usps"], "unknown dataset 'usps' for --source"),
        (["--source", "digits", "--target", "digits"], "--source and --target are both 'digits'"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--depth", "12"], "depth must be 6n + 4"),
        (["--tau", "1.5"], "--tau must be in [0.0, 1.0]"),
        (["--batch-size", "5000"], "digits has 1347 training images, fewer than its batch of 5000"),
    ],
)
def test_bad_arguments_end_the_program_before_training(recipe, args, message, capsys, tmp_path):
    """The same checks in process (parser.error: exit status 2, one line), without paying a start-up each."""
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(args + ["--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


# --- the parts -----------------------------------------------------------------------------------------


def test_paper_flag_sets_the_paper_settings_and_later_flags_win(recipe):
    args, _ = recipe.parse_args(["--paper", "--epochs", "3"])
    assert (args.source, args.target, args.depth, args.widen_factor, args.image_size, args.channels) == ("mnist", "svhn", 28, 2, 32, 3)
    assert (args.batch_size, args.uratio, args.tau, args.lr, args.ema_decay) == (64, 3, 0.9, 0.03, 0.999)
    assert args.norms == ["bn", "cn", "cnx", "acn", "mixnorm", "modenorm"] and args.epochs == 3


def test_unlabeled_weight_warms_up_over_the_first_half(recipe):
    assert [recipe.unlabeled_weight(t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    assert recipe.learning_rate(0.03, 0.25, 1.0) == pytest.approx(0.0075) and recipe.learning_rate(0.03, 0.25, 0.0) == 0.03


def test_distribution_alignment_and_relative_threshold(recipe):
    source = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    target = torch.tensor([[0.2, 0.8], [0.4, 0.6]])
    aligned = recipe.align_distribution(target, source)
    ratio = source.mean(0) / target.mean(0)
    expected = target * ratio / (target * ratio).sum(1, keepdim=True)
    assert torch.allclose(aligned, expected, atol=1e-5) and torch.allclose(aligned.sum(1), torch.ones(2))
    assert torch.allclose(recipe.align_distribution(source, source), source, atol=1e-5)
    assert recipe.relative_threshold(source, 0.9).item() == pytest.approx(0.9 * 0.8)


def test_adamatch_loss_masks_unconfident_target_pseudo_labels(recipe):
    labels = torch.tensor([0, 1])
    source = torch.tensor([[4.0, -4.0], [-4.0, 4.0]]).repeat(2, 1)  # confident source: threshold ~ 0.9
    target = torch.tensor([[0.1, 0.0], [0.0, 0.1]]).repeat(2, 1)  # unconfident target
    out = recipe.adamatch_loss(source, target, labels, tau=0.9, progress=1.0)
    assert out.mask_rate == 0.0 and out.target_loss == 0.0
    assert out.loss.item() == pytest.approx(out.source_loss)
    confident = recipe.adamatch_loss(source, source, labels, tau=0.9, progress=0.0)
    assert confident.mask_rate == 1.0 and confident.loss.item() == pytest.approx(confident.source_loss)  # mu(0) = 0


def test_interpolated_logits_lie_between_the_two_passes(recipe):
    joint, alone = torch.zeros(64, 10), torch.ones(64, 10)
    mixed = recipe.interpolate_logits(joint, alone)
    assert (mixed >= 0).all() and (mixed <= 1).all() and mixed.std() > 0.2


def test_augmentations_keep_shape_and_range(recipe):
    torch.manual_seed(0)
    images = torch.rand(32, 3, 16, 16)
    for op in recipe.STRONG_OPS.values():
        out = op(images, torch.rand(32) * 2 - 1)
        assert out.shape == images.shape and out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    weak, strong = recipe.weak_augment(images), recipe.strong_augment(images)
    assert weak.shape == strong.shape == images.shape and not torch.equal(strong, images)
    one = torch.zeros(1, 1, 8, 8)
    one[0, 0, 4, 4] = 1.0
    assert recipe.weak_augment(one).sum().item() == pytest.approx(1.0)  # whole-pixel shifts: the pixel moves, intact


def _model(recipe, norm):
    args, _ = recipe.parse_args(["--image-size", "8", "--channels", "1"])
    domains = DomainContexts(["digits", "mnist_sample"]).fit({"digits": 1, "mnist_sample": 3})
    return recipe.build_model(args, norm, 10, domains), recipe.DomainRouting(domains, norm in ("cn", "cnx"))


def test_source_only_pass_leaves_running_statistics_and_passes_gradients(recipe):
    model, _ = _model(recipe, "bn")
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    alone = recipe.call_with_frozen_buffers(model, torch.rand(8, 1, 8, 8) + 5)
    assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())
    joint = model(torch.rand(8, 1, 8, 8))  # the joint pass updates them; one backward through both passes
    assert not torch.equal(model.bn.running_mean, before["bn.running_mean"])
    (alone.sum() + joint.sum()).backward()
    assert model.stem.weight.grad is not None and model.stem.weight.grad.abs().sum() > 0


def test_with_cn_the_source_logits_do_not_depend_on_the_target_in_the_batch(recipe):
    """What AdaMatch's random logit interpolation approximates for BN, CN with domain contexts does exactly."""
    torch.manual_seed(0)
    model, routing = _model(recipe, "cn")
    source, target = torch.rand(6, 1, 8, 8), torch.rand(10, 1, 8, 8) * 3
    alone = recipe.call_with_frozen_buffers(model, source, **routing.kwargs([(0, 6)], source.device))
    joint = model(torch.cat([source, target]), **routing.kwargs([(0, 6), (1, 10)], source.device))
    assert torch.allclose(joint[:6], alone, atol=1e-5)
    bn, _ = _model(recipe, "bn")
    bn_alone = recipe.call_with_frozen_buffers(bn, source)
    assert not torch.allclose(bn(torch.cat([source, target]))[:6], bn_alone, atol=1e-3)
    assert math.isclose(routing.domains.priors[1].item(), 0.75, rel_tol=1e-6)
