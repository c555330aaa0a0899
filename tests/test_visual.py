import cv2
import numpy as np
import pytest

from edge.scoring.visual import heatmap_overlay, roc_plot_png, side_by_side


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


def test_result_overlay_has_a_legend_and_tells_truth_from_prediction():
    from edge.scoring.decide import decide
    from edge.scoring.visual import LEGEND_HEIGHT, PREDICTION_COLOUR, TRUTH_COLOUR, result_overlay

    amap = np.zeros((64, 64), np.float32)
    amap[10:20, 40:56] = 3.0   # region 1 (larger)
    amap[44:50, 8:14] = 3.0    # region 2
    r = decide(amap, score=3.0, threshold=2.0, frame_size=(128, 128))
    assert [g.area for g in r.regions] == sorted((g.area for g in r.regions), reverse=True) and len(r.regions) == 2
    image = np.full((128, 128), 90, np.uint8)
    truth = np.zeros((128, 128), bool)
    truth[22:38, 82:110] = True
    out = result_overlay(image, r, truth=truth)
    assert out.shape == (128 + LEGEND_HEIGHT, 128, 3)
    frame, legend = out[:128], out[128:]

    def has(img, colour):
        return bool((np.abs(img.astype(int) - colour).sum(axis=2) == 0).any())

    assert has(frame, PREDICTION_COLOUR) and has(frame, TRUTH_COLOUR)
    assert not has(frame, (255, 255, 255))  # no white outline left to confuse the two
    # the legend: the colour bar's two ends (JET dark blue and dark red) and the verdict text in red
    assert has(legend, tuple(int(v) for v in cv2.applyColorMap(np.uint8([[0]]), cv2.COLORMAP_JET)[0, 0]))
    assert has(legend, tuple(int(v) for v in cv2.applyColorMap(np.uint8([[255]]), cv2.COLORMAP_JET)[0, 0]))
    assert (legend == 255).all(axis=2).mean() > 0.5
    # region numbers sit on the boxes in findings order: "1" above the larger box
    box1 = r.regions[0]
    above = frame[max(0, box1.y - 14):box1.y, box1.x:box1.x + 12]
    assert has(above, PREDICTION_COLOUR)
    normal = decide(np.zeros((64, 64), np.float32), score=1.0, threshold=2.0, frame_size=(128, 128))
    assert not has(result_overlay(image, normal)[:128], PREDICTION_COLOUR)


def test_roc_plot_marks_the_operating_point(tmp_path):
    from edge.scoring.visual import roc_plot_png

    fpr, tpr = np.linspace(0, 1, 50), np.sqrt(np.linspace(0, 1, 50))
    roc_plot_png(tmp_path / "a.png", [("image", fpr, tpr, 0.8)], "t")
    roc_plot_png(tmp_path / "b.png", [("image", fpr, tpr, 0.8)], "t", points=[("automatic threshold 2.5", 0.1, 0.6)])
    a, b = cv2.imread(str(tmp_path / "a.png")), cv2.imread(str(tmp_path / "b.png"))
    diff = np.abs(a.astype(int) - b.astype(int)).sum(axis=2) > 0
    ys, xs = np.nonzero(diff)
    # the marker lies where (0.1, 0.6) falls inside the plot's axes (78 px left margin, 48 px top)
    assert diff.any() and xs.min() < 78 + 0.1 * (640 - 102) + 8 < xs.max() + 8
    assert ys.min() <= 48 + 0.4 * (560 - 112) + 8
