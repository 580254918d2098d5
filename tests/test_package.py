"""The public namespace: every exported name resolves, and importing the layers does not import the Trainer."""

import subprocess
import sys

import ctxnorm_hf


def test_every_exported_name_resolves():
    missing = [name for name in ctxnorm_hf.__all__ if getattr(ctxnorm_hf, name, None) is None]
    assert not missing


def test_importing_the_package_leaves_transformers_trainer_unimported():
    code = (
        "import sys, ctxnorm_hf; assert 'transformers.trainer' not in sys.modules; "
        "ctxnorm_hf.ContextTrainer; assert 'transformers.trainer' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
