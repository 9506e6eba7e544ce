"""The qualitative panel (scripts.plots.panel_figure / plot_panel): Dice in the title, a scaled deformation grid."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from scripts.plots import label_dice, panel_figure, plot_panel


def _texts(fig) -> str:
    texts = [t.get_text() for t in fig.texts]
    texts += [ax.get_title() for ax in fig.axes]
    return "\n".join(texts)


def _case(nd: int = 2, n: int = 32) -> dict:
    shape = (n,) * nd
    rng = np.random.default_rng(0)
    img = rng.random(shape, dtype=np.float32)[None]
    fixed_label = np.zeros(shape, np.float32)
    warped_label = np.zeros(shape, np.float32)
    fixed_label[(slice(8, 16),) * nd] = 1  # 8^nd pixels
    warped_label[(slice(8, 16),) * (nd - 1) + (slice(10, 18),)] = 1  # shifted by 2: overlap 6/8
    warped_label[(slice(20, 24),) * nd] = 2  # label 2 only in the moving label (myocardium at ED only)
    ddf = np.zeros((nd,) + shape, np.float32)
    ddf[-1] = 3.0  # |z| = 3 px everywhere, except one pixel of 4 px
    ddf[-2][(n // 2,) * nd] = np.sqrt(7.0)
    return {
        "moving": img,
        "fixed": img,
        "warped": img,
        "ddf": ddf,
        "log_var": np.zeros_like(img),
        "weight": np.full_like(img, 0.5),
        "warped_label": warped_label[None],
        "fixed_label": fixed_label[None],
    }


def test_dice_and_grid_scale_in_titles():
    fig = panel_figure(_case(), title="pair", label=None, spacing=[1.5, 1.5])
    try:
        text = _texts(fig)
        assert "Dice(warped moving label, fixed label) [every foreground label > 0]" in text
        assert "label 1: 0.750" in text  # 2 x 48 / (64 + 64)
        assert "label 2: not in the fixed label, no Dice" in text
        assert "grid lines every 2 px = 3 mm" in text
        assert "|z|: max 4.00 px (6 mm), mean 3.00 px" in text
        assert "solid label 1, dashed label 2" in text
        w, h = fig.get_size_inches()
        assert w / 3 >= 3.5 and h / 3 >= 3.5  # 3 x 3 panels of at least 3.5 in
    finally:
        plt.close(fig)


def test_one_label_no_spacing_and_given_dice(tmp_path):
    case = _case()
    fig = panel_figure(case, label=1)
    try:
        text = _texts(fig)
        assert "[label 1]: label 1: 0.750" in text and "label 2" not in text
        assert "grid lines every 2 px\n" in text and "mm" not in text  # no spacing: pixels only
    finally:
        plt.close(fig)
    fig = panel_figure(case, title="case  Dice 0.750 (identity 0.500)", label=1)  # the evaluation's title: once
    try:
        assert _texts(fig).count("Dice") == 1
    finally:
        plt.close(fig)
    assert plot_panel(case, tmp_path / "p.png", label=1) == str(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_3d_whole_volume_dice_and_missing_labels():
    case = _case(nd=3, n=24)
    fig = panel_figure(case, label=None, spacing=[2.0, 1.0, 1.0])
    try:
        text = _texts(fig)
        assert "label 1: 0.750" in text and "(whole volume)" in text
        assert "grid lines every 2 px = 2 mm" in text and "|z| (slice): max" in text
    finally:
        plt.close(fig)
    assert label_dice(None, case["fixed_label"]) == []
    case.pop("warped_label")
    fig = panel_figure(case)
    try:
        assert "Dice" not in _texts(fig)
    finally:
        plt.close(fig)


@pytest.mark.parametrize("spacing, expected", [([1.0, 2.0], "= 4 x 2 mm (x, y)")])
def test_anisotropic_grid_spacing(spacing, expected):
    fig = panel_figure(_case(), spacing=spacing)
    try:
        assert expected in _texts(fig)
    finally:
        plt.close(fig)
