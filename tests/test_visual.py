import cv2
import numpy as np
import pytest

from edge.visual import heatmap_overlay, roc_plot_png, side_by_side


def _square_mask(size, lo, hi):
    mask = np.zeros((size, size), np.uint8)
    mask[lo:hi, lo:hi] = 1
    return mask


def test_heatmap_overlay_shape_dtype_and_gray_input():
    gray = np.full((48, 64), 100, np.uint8)
    out = heatmap_overlay(gray, np.zeros((12, 16), np.float32), vmin=0.0, vmax=1.0)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8


def test_heatmap_overlay_hot_region_is_red_and_cold_region_is_blue():
    image = np.full((32, 32, 3), 128, np.uint8)
    amap = np.zeros((32, 32))
    amap[:, 16:] = 5.0  # clipped to vmax
    out = heatmap_overlay(image, amap, vmin=0.0, vmax=1.0, alpha=0.6).astype(int)
    b, _, r = out[16, 28]
    assert r > b + 50
    b, _, r = out[16, 4]
    assert b > r + 50


def test_heatmap_overlay_mask_contour_pixels_are_white():
    image = np.full((64, 64, 3), 90, np.uint8)
    mask = _square_mask(64, 20, 40)
    out = heatmap_overlay(image, np.zeros((64, 64)), 0.0, 1.0, mask=mask)
    border = np.zeros((64, 64), bool)
    border[20, 20:40] = border[39, 20:40] = border[20:40, 20] = border[20:40, 39] = True
    assert np.all(out[border] == 255)
    assert not np.any(np.all(out[25:35, 25:35] == 255, axis=-1))  # interior untouched


def test_heatmap_overlay_resizes_mask_nearest():
    image = np.full((64, 64), 90, np.uint8)
    small_mask = _square_mask(32, 10, 20) * 255  # -> rows/cols 20..39 at 64 px
    out = heatmap_overlay(image, np.zeros((8, 8)), 0.0, 1.0, mask=small_mask)
    assert np.all(out[20, 20:40] == 255)
    assert np.all(out[20:40, 39] == 255)


def test_heatmap_overlay_rejects_bad_range():
    with pytest.raises(ValueError):
        heatmap_overlay(np.zeros((8, 8), np.uint8), np.zeros((8, 8)), 1.0, 1.0)


def test_roc_plot_png_is_written_readable_sized_and_colourful(tmp_path):
    fpr = np.array([0.0, 0.0, 0.1, 0.3, 1.0])
    tpr = np.array([0.0, 0.6, 0.85, 0.95, 1.0])
    path = tmp_path / "plots" / "nested" / "roc.png"
    roc_plot_png(path, [("padim", fpr, tpr, 0.973), ("patchcore", fpr**1.5, tpr, 0.951)], "bottle ROC")
    img = cv2.imread(str(path))
    assert img is not None
    assert img.shape == (560, 640, 3)  # size is (width, height)
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert len(colours) > 20
    # both curve colours (tab10 blue and orange, BGR) are present
    assert np.any(np.all(img == (180, 119, 31), axis=-1))
    assert np.any(np.all(img == (14, 127, 255), axis=-1))
    assert (img == 255).all(axis=-1).mean() > 0.5  # mostly white background


def test_roc_plot_png_custom_size(tmp_path):
    path = tmp_path / "roc.png"
    roc_plot_png(path, [("a", np.array([0, 1.0]), np.array([0, 1.0]), 0.5)], "t", size=(400, 300))
    assert cv2.imread(str(path)).shape == (300, 400, 3)


def test_roc_plot_png_raises_when_image_cannot_be_written(tmp_path):
    with pytest.raises(OSError, match="imwrite"):
        roc_plot_png(tmp_path / "roc.unknown_ext", [], "t")


def test_side_by_side_keeps_aspect_converts_gray_and_adds_gaps_and_captions():
    a = np.full((100, 200, 3), 50, np.uint8)
    b = np.full((50, 50), 200, np.uint8)
    c = np.zeros((128, 64, 3), np.uint8)
    out = side_by_side([a, b, c], ["image", "overlay", "ground truth"], height=64)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    # widths: 200*64/100 = 128, 64, 64*64/128 = 32; plus two 4 px gaps
    assert out.shape[1] == 128 + 64 + 32 + 2 * 4
    assert out.shape[0] > 64  # caption strip below
    assert np.all(out[:64, 128 + 4 : 128 + 4 + 64] == 200)  # gray panel became BGR
    caption = out[64:, :128]
    assert (caption < 128).any()  # some dark text pixels


def test_side_by_side_label_count_must_match():
    with pytest.raises(ValueError):
        side_by_side([np.zeros((4, 4), np.uint8)], ["a", "b"])
