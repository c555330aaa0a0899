"""Images for people: heat-map overlays, ROC plots, side-by-side panels (OpenCV only)."""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

__all__ = ["heatmap_overlay", "legend_strip", "result_overlay", "roc_plot_png", "side_by_side"]

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_TEXT = (40, 40, 40)
_GRID = (225, 225, 225)
_AXIS = (90, 90, 90)
# Distinct BGR colours (the "tab10" palette).
_PALETTE = [
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
    (194, 119, 227),
    (127, 127, 127),
    (34, 189, 188),
    (207, 190, 23),
]


def _to_bgr(image: np.ndarray, name: str = "image") -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {img.dtype}")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 3:
        return np.ascontiguousarray(img)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    raise ValueError(f"{name} must be HxW or HxWx3 (1/4 channels accepted), got shape {img.shape}")


# --------------------------------------------------------------------------- overlay


def heatmap_overlay(
    image_bgr_or_gray: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend a JET heat map of anomaly_map (scaled vmin..vmax, clipped) over the image.

    The map is resized to the image bilinearly; the optional ground-truth mask
    (any size, resized nearest) is outlined in white. Returns uint8 HxWx3.
    """
    base = _to_bgr(image_bgr_or_gray)
    h, w = base.shape[:2]
    if not vmax > vmin:
        raise ValueError(f"vmax must be greater than vmin, got vmin={vmin}, vmax={vmax}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D, got shape {amap.shape}")
    amap = np.nan_to_num(amap, nan=float(vmin))
    if amap.shape != (h, w):
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    norm = np.clip((amap - vmin) / (vmax - vmin), 0.0, 1.0)
    heat = cv2.applyColorMap(np.round(norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(base, 1.0 - alpha, heat, alpha, 0.0)

    if mask is not None:
        m = np.asarray(mask)
        if m.ndim == 3:
            m = m[:, :, 0]
        if m.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {np.asarray(mask).shape}")
        m = (m > 0).astype(np.uint8)
        if m.shape != (h, w):
            m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        thickness = 1 if min(h, w) < 384 else 2
        # LINE_8, not anti-aliased: outline pixels stay pure white.
        cv2.drawContours(out, contours, -1, _WHITE, thickness, lineType=cv2.LINE_8)
    return out


# --------------------------------------------------------------------------- ROC plot


def _put_text_centered(img, text, center_x, baseline_y, scale, color=_TEXT, thickness=1):
    (tw, _), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    cv2.putText(img, text, (int(round(center_x - tw / 2)), int(baseline_y)), _FONT, scale, color, thickness, cv2.LINE_AA)


def _dashed_line(img, p0, p1, color, dash=8, gap=6, thickness=1):
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    length = float(np.hypot(*(p1 - p0)))
    if length == 0:
        return
    direction = (p1 - p0) / length
    pos = 0.0
    while pos < length:
        a = p0 + direction * pos
        b = p0 + direction * min(pos + dash, length)
        cv2.line(img, tuple(int(round(v)) for v in a), tuple(int(round(v)) for v in b), color, thickness, cv2.LINE_AA)
        pos += dash + gap


TRUTH_COLOUR = (0, 220, 0)        # BGR green: the ground-truth outline (demo, eval)
PREDICTION_COLOUR = (255, 0, 255)  # BGR magenta: the station's anomalous mask and its numbered regions
LEGEND_HEIGHT = 44


def result_overlay(image: np.ndarray, result, truth: np.ndarray | None = None) -> np.ndarray:
    """The one look of a scored frame everywhere (demo, score --overlays, eval, the line's stored
    overlay.jpg): the map over the frame, coloured from half to one and a half times the threshold;
    the anomalous mask outlined in magenta with each region's box numbered as in the findings (largest
    first); the ground truth, when given, outlined in green; below, a legend with score, threshold,
    verdict and the colour bar (the threshold marked on it)."""
    th = float(result.threshold)
    out = heatmap_overlay(image, result.map_at_frame(), vmin=th * 0.5, vmax=th * 1.5)
    h, w = out.shape[:2]
    thickness = 1 if min(h, w) < 384 else 2
    if truth is not None:
        _outline(out, truth, TRUTH_COLOUR, thickness)
    if result.anomalous:
        _outline(out, result.mask_at_frame(), PREDICTION_COLOUR, thickness)
        for i, r in enumerate(sorted(result.regions, key=lambda g: g.area, reverse=True), 1):
            cv2.rectangle(out, (r.x, r.y), (r.x + r.width - 1, r.y + r.height - 1), PREDICTION_COLOUR, 1, cv2.LINE_8)
            label_y = r.y - 3 if r.y >= 14 else min(h - 3, r.y + r.height + 12)
            cv2.putText(out, str(i), (max(0, r.x), label_y), _FONT, 0.45, _BLACK, 3, cv2.LINE_AA)
            cv2.putText(out, str(i), (max(0, r.x), label_y), _FONT, 0.45, PREDICTION_COLOUR, 1, cv2.LINE_AA)
    return np.vstack([out, legend_strip(w, result.score, th, result.verdict, truth is not None)])


def _outline(img: np.ndarray, mask: np.ndarray, colour, thickness: int) -> None:
    m = np.asarray(mask)
    m = (m[:, :, 0] if m.ndim == 3 else m) > 0
    h, w = img.shape[:2]
    if m.shape != (h, w):
        m = cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(img, contours, -1, colour, thickness, lineType=cv2.LINE_8)


def legend_strip(width: int, score: float, threshold: float, verdict: str, with_truth: bool = False) -> np.ndarray:
    """A LEGEND_HEIGHT-pixel strip: "score 3.12 / threshold 2.55  ANOMALOUS", the JET bar from 0.5x to
    1.5x the threshold with the threshold marked, and what the outline colours mean."""
    strip = np.full((LEGEND_HEIGHT, width, 3), 255, np.uint8)
    scale = 0.4 if width >= 320 else 0.3
    flagged = verdict == "anomalous"
    text = f"score {score:.3g} / threshold {threshold:.3g}  {verdict.upper()}"
    cv2.putText(strip, text, (4, 14), _FONT, scale, (0, 0, 200) if flagged else (0, 120, 0), 1, cv2.LINE_AA)
    bar_x0, bar_x1 = 4, max(40, width // 2)
    ramp = np.linspace(0, 255, bar_x1 - bar_x0).astype(np.uint8)[None, :]
    strip[22:32, bar_x0:bar_x1] = cv2.applyColorMap(np.repeat(ramp, 10, axis=0), cv2.COLORMAP_JET)
    mid = (bar_x0 + bar_x1) // 2
    cv2.line(strip, (mid, 19), (mid, 34), _BLACK, 1)
    for x, label in ((bar_x0, f"{0.5 * threshold:.3g}"), (mid - 6, "thr"), (bar_x1 - 24, f"{1.5 * threshold:.3g}")):
        cv2.putText(strip, label, (max(0, x), 42), _FONT, 0.3, _TEXT, 1, cv2.LINE_AA)
    keys = [("found", PREDICTION_COLOUR)] + ([("truth", TRUTH_COLOUR)] if with_truth else [])
    x = bar_x1 + 8
    for name, colour in keys:
        if x + 50 > width:
            break
        cv2.rectangle(strip, (x, 23), (x + 12, 31), colour, 2)
        cv2.putText(strip, name, (x + 16, 31), _FONT, 0.33, _TEXT, 1, cv2.LINE_AA)
        x += 56
    return strip


def roc_plot_png(
    path,
    curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]],
    title: str,
    size: tuple[int, int] = (640, 560),
    points: Sequence[tuple[str, float, float]] = (),
) -> None:
    """Write a ROC plot PNG. size is (width, height) in pixels.

    curves: (name, fpr, tpr, auc) each; the legend reads "name (AUROC 0.973)". points: (label, fpr, tpr)
    operating points marked with a filled circle and their label (eval: the automatic threshold).
    Creates the parent directory; raises OSError if the image cannot be written.
    """
    width, height = int(size[0]), int(size[1])
    if width < 200 or height < 200:
        raise ValueError(f"size too small for a legible plot: {size}")
    img = np.full((height, width, 3), 255, np.uint8)

    left, right, top, bottom = 78, 24, 48, 64
    x0, x1 = left, width - right
    y0, y1 = top, height - bottom
    pw, ph = x1 - x0, y1 - y0

    def to_px(fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        return np.stack([x0 + np.asarray(fx, float) * pw, y1 - np.asarray(fy, float) * ph], axis=-1)

    # Grid, ticks, tick labels.
    for v in np.linspace(0.0, 1.0, 6):
        xp = int(round(x0 + v * pw))
        yp = int(round(y1 - v * ph))
        cv2.line(img, (xp, y0), (xp, y1), _GRID, 1, cv2.LINE_AA)
        cv2.line(img, (x0, yp), (x1, yp), _GRID, 1, cv2.LINE_AA)
        cv2.line(img, (xp, y1), (xp, y1 + 5), _AXIS, 1, cv2.LINE_AA)
        cv2.line(img, (x0 - 5, yp), (x0, yp), _AXIS, 1, cv2.LINE_AA)
        label = f"{v:.1f}"
        _put_text_centered(img, label, xp, y1 + 22, 0.45)
        (tw, th), _ = cv2.getTextSize(label, _FONT, 0.45, 1)
        cv2.putText(img, label, (x0 - 9 - tw, yp + th // 2), _FONT, 0.45, _TEXT, 1, cv2.LINE_AA)

    _dashed_line(img, (x0, y1), (x1, y0), (150, 150, 150))
    cv2.rectangle(img, (x0, y0), (x1, y1), _AXIS, 1, cv2.LINE_AA)

    # Curves; fixed-point coordinates (shift=4) keep them smooth.
    shift = 4
    for i, (name, fpr, tpr, _auc) in enumerate(curves):
        fpr, tpr = np.asarray(fpr, float).ravel(), np.asarray(tpr, float).ravel()
        if fpr.shape != tpr.shape or fpr.size == 0:
            raise ValueError(f"curve {name!r}: fpr and tpr must be non-empty and equally long")
        pts = np.round(to_px(np.clip(fpr, 0, 1), np.clip(tpr, 0, 1)) * (1 << shift)).astype(np.int32)
        cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, _PALETTE[i % len(_PALETTE)], 2, cv2.LINE_AA, shift)

    for label, fx, fy in points:
        cx, cy = (int(round(v)) for v in to_px(min(max(fx, 0.0), 1.0), min(max(fy, 0.0), 1.0)))
        cv2.circle(img, (cx, cy), 6, (0, 0, 200), -1, cv2.LINE_AA)
        cv2.circle(img, (cx, cy), 6, _BLACK, 1, cv2.LINE_AA)
        (tw, _), _ = cv2.getTextSize(label, _FONT, 0.45, 1)
        tx = cx + 10 if cx + 10 + tw < x1 else cx - 10 - tw
        cv2.putText(img, label, (tx, min(y1 - 6, cy + 18)), _FONT, 0.45, (0, 0, 160), 1, cv2.LINE_AA)

    # Legend, lower right (ROC curves rarely pass there).
    if curves:
        scale, row_h, swatch = 0.45, 20, 22
        entries = [f"{name} (AUROC {float(auc):.3f})" for name, _, _, auc in curves]
        text_w = max(cv2.getTextSize(e, _FONT, scale, 1)[0][0] for e in entries)
        box_w = text_w + swatch + 24
        box_h = row_h * len(entries) + 10
        bx1, by1 = x1 - 10, y1 - 10
        bx0, by0 = max(x0 + 2, bx1 - box_w), max(y0 + 2, by1 - box_h)
        cv2.rectangle(img, (bx0, by0), (bx1, by1), _WHITE, -1)
        cv2.rectangle(img, (bx0, by0), (bx1, by1), (180, 180, 180), 1, cv2.LINE_AA)
        for i, entry in enumerate(entries):
            cy = by0 + 5 + row_h * i + row_h // 2
            colour = _PALETTE[i % len(_PALETTE)]
            cv2.line(img, (bx0 + 8, cy), (bx0 + 8 + swatch, cy), colour, 2, cv2.LINE_AA)
            cv2.putText(img, entry, (bx0 + 14 + swatch, cy + 5), _FONT, scale, _TEXT, 1, cv2.LINE_AA)

    # Title and axis labels.
    _put_text_centered(img, title, width / 2, 30, 0.6, _BLACK, 1)
    _put_text_centered(img, "false positive rate", x0 + pw / 2, height - 16, 0.5)
    label = "true positive rate"
    (tw, th), base = cv2.getTextSize(label, _FONT, 0.5, 1)
    strip = np.full((th + base + 6, tw + 6, 3), 255, np.uint8)
    cv2.putText(strip, label, (3, th + 3), _FONT, 0.5, _TEXT, 1, cv2.LINE_AA)
    strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    sy = int(max(0, y0 + ph / 2 - strip.shape[0] / 2))
    sh = min(strip.shape[0], height - sy)
    img[sy : sy + sh, 8 : 8 + strip.shape[1]] = strip[:sh]

    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        ok = cv2.imwrite(path, img)
    except cv2.error as exc:
        raise OSError(f"cv2.imwrite could not write ROC plot to {path!r}: {exc}") from exc
    if not ok:
        raise OSError(f"cv2.imwrite failed to write ROC plot to {path!r}")


# --------------------------------------------------------------------------- panels


def side_by_side(images: Sequence[np.ndarray], labels: Sequence[str], height: int = 256) -> np.ndarray:
    """Resize each image to `height` (aspect kept), caption it, join with 4 px gaps.

    Returns uint8 BGR of height `height` + caption strip.
    """
    if len(images) == 0:
        raise ValueError("no images given")
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    height = int(height)
    if height < 1:
        raise ValueError(f"height must be positive, got {height}")

    gap, strip_h = 4, max(18, min(32, height // 8))
    scale_max = strip_h / 40.0
    panels = []
    for i, (image, label) in enumerate(zip(images, labels)):
        img = _to_bgr(image, f"images[{i}]")
        h, w = img.shape[:2]
        new_w = max(1, int(round(w * height / h)))
        interp = cv2.INTER_AREA if height < h else cv2.INTER_LINEAR
        img = cv2.resize(img, (new_w, height), interpolation=interp)

        strip = np.full((strip_h, new_w, 3), 255, np.uint8)
        text, scale = str(label), scale_max
        fits = lambda t, s: cv2.getTextSize(t, _FONT, s, 1)[0][0] <= new_w - 6  # noqa: E731
        while scale > 0.3 and not fits(text, scale):
            scale -= 0.05
        while len(text) > 1 and not fits(text, scale):
            text = text[:-3] + ".." if len(text) > 3 else text[:-1]
        (tw, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
        cv2.putText(strip, text, (max(3, (new_w - tw) // 2), (strip_h + th) // 2), _FONT, scale, _TEXT, 1, cv2.LINE_AA)
        panels.append(np.vstack([img, strip]))

    spacer = np.full((height + strip_h, gap, 3), 255, np.uint8)
    parts = []
    for i, panel in enumerate(panels):
        if i:
            parts.append(spacer)
        parts.append(panel)
    return np.hstack(parts)
