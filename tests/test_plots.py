"""The pictures of a training run: `loss_curve.png` and the demo's comparison, read back as images."""

from __future__ import annotations

import math
import struct

import numpy as np
from matplotlib import colors as mcolors
from matplotlib import image as mimage

from potstill.student_train.plots import write_comparison, write_loss_curve


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking the signature and the IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def colour_pixels(pixels: np.ndarray, colour: str, tolerance: float = 0.02) -> int:
    """How many pixels are drawn in `colour` (RGB within `tolerance`)."""
    rgb = np.array(mcolors.to_rgb(colour))
    return int(np.sum(np.all(np.abs(pixels[..., :3] - rgb) < tolerance, axis=-1)))


def history(steps: int = 40) -> list[dict]:
    """A log history as the HF Trainer keeps it: train entries with the loss parts, eval entries, a summary."""
    out = []
    for step in range(5, steps + 1, 5):
        kd = 2.0 * math.exp(-step / 15) + 0.1
        ce = 3.0 * math.exp(-step / 20) + 0.5
        out.append({"step": step, "epoch": step / 40, "loss": 0.8 * kd + 0.2 * ce + 0.01 * 40, "kd": kd, "ce": ce,
                    "hidden": 40.0 * math.exp(-step / 30), "learning_rate": 1e-3, "grad_norm": 1.0})
        if step % 20 == 0:
            out.append({"step": step, "epoch": step / 40, "eval_loss": kd + 0.05})
    out.append({"step": steps, "train_loss": 1.0, "train_runtime": 3.0})
    return out


def test_loss_curve_draws_every_part_and_the_eval_points(tmp_path) -> None:
    path = str(tmp_path / "loss_curve.png")
    assert write_loss_curve(path, history(), {"kd_loss": 0.3})
    assert png_size(path) == (800, 450)
    pixels = mimage.imread(path)
    assert pixels.std() > 0.05  # not a blank canvas
    # matplotlib's default cycle: the total loss, KD, CE, hidden, then the eval points, then the final eval
    for colour in ("C0", "C1", "C2", "C3", "C4", "C5"):
        assert colour_pixels(pixels, colour) > 20, colour
    assert colour_pixels(pixels, "C6") == 0  # no seventh series: nothing else was logged


def test_a_run_that_logged_nothing_still_gets_a_picture_saying_so(tmp_path) -> None:
    path = str(tmp_path / "loss_curve.png")
    assert not write_loss_curve(path, [{"step": 3, "train_loss": 1.0}], None)
    pixels = mimage.imread(path)
    assert png_size(path) == (800, 450) and pixels.std() > 0  # the sentence is there
    assert colour_pixels(pixels, "C0") == 0


def test_demo_comparison_has_both_curves_the_bars_and_the_table(tmp_path) -> None:
    path = str(tmp_path / "report.png")
    base = [{k: v for k, v in e.items() if k not in ("kd", "hidden")} for e in history()]
    table = [["teacher", "1,125,504", "100.0%", "-"], ["KD student", "169,280", "99.3%", "354"],
             ["baseline", "169,280", "32.7%", "52"]]
    write_comparison(path, {"KD student": history(), "baseline": base}, table,
                     ["model", "params", "held-out accuracy", "store bytes/token"],
                     {"teacher": 1.0, "KD student": 0.993, "baseline": 0.327})
    assert png_size(path) == (1100, 640)
    pixels = mimage.imread(path)
    for colour in ("#3b6ea5", "#c0504d", "#8c8c8c"):  # KD student, baseline (curves and bars), the teacher's bar
        assert colour_pixels(pixels, colour) > 50, colour
