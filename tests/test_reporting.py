"""The recipes' report helpers: curves that keep one colour per run across panels."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ctxnorm_hf.reporting import plot_curves  # noqa: E402


def test_a_run_keeps_its_colour_in_a_panel_the_others_lack(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    histories = {
        "bn": {"loss": [1.0, 0.5]},
        "cn": {"loss": [1.0, 0.4], "accuracy (oracle)": [0.5, 0.6]},
    }
    plot_curves(histories, str(tmp_path / "curves.png"), "title")
    (figure,) = figures
    colours = {(axis.get_title(), line.get_label()): line.get_color() for axis in figure.axes for line in axis.lines}
    assert colours[("accuracy (oracle)", "cn")] == colours[("loss", "cn")] != colours[("loss", "bn")]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
