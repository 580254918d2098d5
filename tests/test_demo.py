import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "digits_demo.py"


def test_digits_demo_runs_every_layer():
    result = subprocess.run(
        [sys.executable, str(DEMO), "--epochs", "1", "--contexts", "3"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "accuracy" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["bn", "cn", "cnx", "acn", "mixnorm", "modenorm"]
    assert all(0.0 <= float(row.split("|")[2]) <= 1.0 for row in rows)


def test_digits_demo_rejects_unknown_norm():
    result = subprocess.run([sys.executable, str(DEMO), "--norms", "bn,foo"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown norms ['foo']" in result.stderr
