"""Scorer results -> facts in words: where, how big, what shape, darker or brighter, how severe.

Everything here is computed by the runtime itself, so that a small language model (or a technician)
is only ever handed facts, never asked to work them out:

    findings = describe(frame, result, mm_per_pixel=0.05, reference=good_part)
    findings.summary()   # "Anomalous: score 0.71 is above the threshold 0.55 (severity 1.29), 1 region. Region 1: ..."
    findings.to_dict()   # JSON-ready

Each region of an `edge.scoring.decide.Result` is traced back to its connected component of the mask (at the
pack's input resolution), brought to frame resolution, and measured there: minimum-area rectangle for
length and width, mean grey inside against the reference image (same pixels) or against a ring of
normal pixels around it. `spoken_number` and `distinct_pair` are how every explanation writes a number.
It only measures: it neither words an answer (edge.explain.runtime_words) nor talks to a model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from edge.scoring.decide import Region, Result
from edge.inference.preprocess import check_frame

PLACES = (("upper-left", "upper", "upper-right"),
          ("left", "centre", "right"),
          ("lower-left", "lower", "lower-right"))
ELONGATED_RATIO = 3.0     # length / width at or above this is "elongated"
CONTRAST_LEVELS = 8.0     # grey levels of difference needed to call a region darker or brighter
SHAPE_WORDS = {"elongated": "scratch- or crack-like", "compact": "spot- or dent-like"}


@dataclass
class RegionFinding:
    index: int                      # 1-based, largest region first
    place: str                      # on a 3x3 grid of the frame, from the region's centroid
    bbox: tuple[int, int, int, int]  # x, y, w, h in frame pixels
    area_px: int
    area_mm2: float | None
    length_px: float                # minimum-area rectangle of the region at frame resolution, length >= width
    width_px: float
    length_mm: float | None
    width_mm: float | None
    shape: str                      # "elongated" or "compact"
    contrast: str                   # "darker", "brighter" or "similar"
    contrast_delta: float           # mean grey inside minus the comparison (reference or surroundings)
    severity: float                 # region max score / threshold

    @property
    def shape_words(self) -> str:
        return SHAPE_WORDS[self.shape]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bbox"] = list(self.bbox)
        d["shape_words"] = self.shape_words
        return _json_ready(d)

    @classmethod
    def from_dict(cls, d: dict) -> "RegionFinding":
        """Inverse of `to_dict` (a stored finding back in hand)."""
        fields = {k: d[k] for k in cls.__dataclass_fields__}
        fields["bbox"] = tuple(int(v) for v in d["bbox"])
        if fields["severity"] is None:  # to_dict writes infinity as null
            fields["severity"] = float("inf")
        return cls(**fields)

    def size_words(self) -> str:
        """'6.2 mm long and 0.4 mm wide (about 2.1 mm²)', in pixels when there is no scale."""
        if self.length_mm is not None:
            return (f"{spoken_number(self.length_mm)} mm long and {spoken_number(self.width_mm)} mm wide "
                    f"(about {spoken_number(self.area_mm2)} mm²)")
        return (f"{spoken_number(self.length_px)} px long and {spoken_number(self.width_px)} px wide "
                f"(about {spoken_number(self.area_px)} px²)")

    def tone_words(self, contrast_basis: str = "reference") -> str:
        than = "the reference" if contrast_basis == "reference" else "its surroundings"
        if self.contrast == "similar":
            return f"similar in brightness to {than}"
        return f"{self.contrast} than {than}"

    def box_words(self) -> str:
        """Where the bounding box lies, in frame pixels from the top-left corner."""
        x, y, w, h = self.bbox
        return f"x {x} to {x + w}, y {y} to {y + h} px (bounding box {w} x {h} px)"

    def sentence(self, contrast_basis: str = "reference") -> str:
        return (f"Region {self.index}: {self.place}, {self.shape} ({self.shape_words}), {self.size_words()}, "
                f"{self.tone_words(contrast_basis)}, severity {spoken_number(self.severity)}.")


@dataclass
class Findings:
    verdict: str                    # "anomalous" or "normal"
    score: float
    threshold: float
    severity: float                 # score / threshold
    regions: list[RegionFinding] = field(default_factory=list)
    frame_size: tuple[int, int] = (0, 0)   # (height, width)
    mm_per_pixel: float | None = None
    contrast_basis: str = "surroundings"   # "reference" when a good reference image was given

    def to_dict(self) -> dict:
        return _json_ready({
            "verdict": self.verdict,
            "score": self.score,
            "threshold": self.threshold,
            "severity": self.severity,
            "frame_size": list(self.frame_size),
            "mm_per_pixel": self.mm_per_pixel,
            "contrast_basis": self.contrast_basis,
            "regions": [r.to_dict() for r in self.regions],
            "summary": self.summary(),
        })

    @classmethod
    def from_dict(cls, d: dict) -> "Findings":
        """Inverse of `to_dict`."""
        return cls(verdict=d["verdict"], score=float(d["score"]), threshold=float(d["threshold"]),
                   severity=float("inf") if d["severity"] is None else float(d["severity"]),
                   regions=[RegionFinding.from_dict(r) for r in d.get("regions", [])],
                   frame_size=tuple(d.get("frame_size", (0, 0))), mm_per_pixel=d.get("mm_per_pixel"),
                   contrast_basis=d.get("contrast_basis", "surroundings"))

    def sentences(self) -> list[str]:
        s, t = distinct_pair(self.score, self.threshold)
        if self.verdict == "normal":
            out = [f"No anomaly: score {s} is below the threshold {t}."]
        else:
            n = len(self.regions)
            located = (f"{n} region{'s' if n != 1 else ''}" if n
                       else "no region large enough to locate")
            out = [f"Anomalous: score {s} is at or above the threshold {t} "
                   f"(severity {spoken_number(self.severity)}), {located}."]
        out += [r.sentence(self.contrast_basis) for r in self.regions]
        return out

    def summary(self) -> str:
        return " ".join(self.sentences())


def describe(frame: np.ndarray, result: Result, mm_per_pixel: float | None = None,
             reference: np.ndarray | None = None) -> Findings:
    """Facts about a scored frame, every number computed here (nothing left for a model to guess)."""
    mpp = _check_scale(mm_per_pixel)
    frame = check_frame(frame)
    fh, fw = frame.shape[:2]
    expected = tuple(int(v) for v in result.frame_size)
    if (fh, fw) != expected:
        raise ValueError(f"frame is {fh}x{fw} (height x width) but the result was scored on a "
                         f"{expected[0]}x{expected[1]} frame; pass the frame that was scored")
    grey = _grey(frame).astype(np.float32)
    ref_grey = None
    if reference is not None:
        ref = _grey(check_frame(reference, "reference"))
        ref_grey = cv2.resize(ref, (fw, fh), interpolation=cv2.INTER_AREA if ref.shape[0] * ref.shape[1] > fh * fw
                              else cv2.INTER_LINEAR).astype(np.float32)

    threshold = float(result.threshold)
    mask = np.asarray(result.mask).astype(bool)
    n, labels, _, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    sy, sx = fh / mask.shape[0], fw / mask.shape[1]

    found = []
    for region in sorted(result.regions, key=lambda r: r.area, reverse=True):
        found.append(_describe_region(region, len(found) + 1, grey, ref_grey, mask, labels, centroids[1:n],
                                      (sx, sy), threshold, mpp))
    return Findings(verdict=result.verdict, score=float(result.score), threshold=threshold,
                    severity=_round(result.severity, 2), regions=found, frame_size=(fh, fw),
                    mm_per_pixel=mpp, contrast_basis="reference" if ref_grey is not None else "surroundings")


# --- one region ---------------------------------------------------------------------------------

def _describe_region(region: Region, index: int, grey: np.ndarray, ref_grey: np.ndarray | None,
                     mask: np.ndarray, labels: np.ndarray, centroids: np.ndarray, scale: tuple[float, float],
                     threshold: float, mpp: float | None) -> RegionFinding:
    fh, fw = grey.shape
    sx, sy = scale
    ring = int(np.clip(round(math.sqrt(max(region.area, 1)) / 2), 3, 25))
    pad = ring + int(math.ceil(max(sx, sy))) + 2
    x0, y0 = max(0, region.x - pad), max(0, region.y - pad)
    x1, y1 = min(fw, region.x + region.width + pad), min(fh, region.y + region.height + pad)
    box = (x0, y0, x1, y1)

    # The region's own component of the mask (find_regions computes the same centroids), at frame resolution.
    label = _match_component(region, centroids, sx, sy)
    if label is not None:
        own = _at_frame(labels == label, box, sx, sy)
    else:  # a hand-made region: whatever of the mask lies in its box
        own = _at_frame(mask, box, sx, sy)
        inside_box = np.zeros_like(own)
        inside_box[region.y - y0:region.y - y0 + region.height, region.x - x0:region.x - x0 + region.width] = True
        own &= inside_box
    if not own.any():
        own = np.zeros((y1 - y0, x1 - x0), bool)
        own[region.y - y0:region.y - y0 + region.height, region.x - x0:region.x - x0 + region.width] = True

    length, width = _min_rect_size(own)
    shape = "elongated" if length >= ELONGATED_RATIO * width else "compact"

    inside = grey[y0:y1, x0:x1][own]
    if ref_grey is not None:
        delta = float(inside.mean() - ref_grey[y0:y1, x0:x1][own].mean())
    else:
        any_anomalous = _at_frame(mask, box, sx, sy) | own
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring + 1, 2 * ring + 1))
        around = cv2.dilate(own.astype(np.uint8), kernel).astype(bool) & ~any_anomalous
        if not around.any():  # the region fills its neighbourhood: compare with the rest of the frame
            rest = np.ones((fh, fw), bool)
            rest[y0:y1, x0:x1] = ~any_anomalous
            around_values = grey[rest]
        else:
            around_values = grey[y0:y1, x0:x1][around]
        delta = float(inside.mean() - around_values.mean()) if around_values.size else 0.0
    contrast = "darker" if delta <= -CONTRAST_LEVELS else "brighter" if delta >= CONTRAST_LEVELS else "similar"

    length_px, width_px = round(length, 2), round(width, 2)
    return RegionFinding(
        index=index, place=_place(region.centroid_x, region.centroid_y, fw, fh),
        bbox=(int(region.x), int(region.y), int(region.width), int(region.height)), area_px=int(region.area),
        area_mm2=None if mpp is None else round(region.area * mpp * mpp, 6),
        length_px=length_px, width_px=width_px,
        length_mm=None if mpp is None else round(length_px * mpp, 6),
        width_mm=None if mpp is None else round(width_px * mpp, 6),
        shape=shape, contrast=contrast, contrast_delta=round(delta, 1),
        severity=_round(region.max_score / threshold if threshold > 0 else float("inf"), 2),
    )


def _match_component(region: Region, centroids: np.ndarray, sx: float, sy: float) -> int | None:
    """Label (1-based) of the mask component whose scaled centroid is the region's, or None."""
    if len(centroids) == 0:
        return None
    d = np.hypot(centroids[:, 0] * sx - region.centroid_x, centroids[:, 1] * sy - region.centroid_y)
    i = int(np.argmin(d))
    return i + 1 if d[i] <= 0.5 * max(sx, sy, 1.0) else None


def _at_frame(component: np.ndarray, box: tuple[int, int, int, int], sx: float, sy: float) -> np.ndarray:
    """A map-resolution boolean mask sampled at the frame pixels of `box` (x0, y0, x1, y1).

    Bilinear at 0.5, pixel-centre aligned like cv2.resize; nearest sampling where that loses a thin
    component (frames smaller than the map)."""
    x0, y0, x1, y1 = box
    xs = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / sx - 0.5)
    ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / sy - 0.5)
    map_x, map_y = np.meshgrid(xs, ys)
    src = component.astype(np.float32)
    out = cv2.remap(src, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) >= 0.5
    if not out.any() and component.any():
        out = cv2.remap(src, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE) >= 0.5
    return out


def _min_rect_size(own: np.ndarray) -> tuple[float, float]:
    """(length, width) of the minimum-area rectangle around the pixels' footprints (corners, not centres)."""
    contours, _ = cv2.findContours(own.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    centres = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float32)
    corners = np.concatenate([centres + np.array(o, np.float32) for o in ((0, 0), (1, 0), (0, 1), (1, 1))])
    (_, _), (w, h), _ = cv2.minAreaRect(corners)
    return float(max(w, h)), float(min(w, h))


def _place(cx: float, cy: float, width: int, height: int) -> str:
    col = min(2, max(0, int(3 * cx / width)))
    row = min(2, max(0, int(3 * cy / height)))
    return PLACES[row][col]


# --- helpers ------------------------------------------------------------------------------------

def _check_scale(mm_per_pixel) -> float | None:
    if mm_per_pixel is None:
        return None
    try:
        value = float(mm_per_pixel)
    except (TypeError, ValueError):
        raise ValueError(f"mm_per_pixel must be a positive number of millimetres per pixel, "
                         f"got {mm_per_pixel!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"mm_per_pixel must be a positive finite number of millimetres per pixel, "
                         f"got {mm_per_pixel!r}")
    return value


def _grey(img: np.ndarray) -> np.ndarray:
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


def _round(value: float, digits: int) -> float:
    return round(float(value), digits) if math.isfinite(value) else float(value)


def spoken_number(value) -> str:
    """A measurement as a person would say it: 2 significant figures below 1, one decimal below 100."""
    value = float(value)
    if not math.isfinite(value):
        return "unbounded"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.1f}"
    return f"{value:.2g}"


def distinct_pair(a: float, b: float) -> tuple[str, str]:
    """Two numbers with just enough significant figures (3 at least) to print different and in order."""
    for digits in range(3, 10):
        sa, sb = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if sa != sb and (float(sa) < float(sb)) == (a < b):
            return sa, sb
    return repr(a), repr(b)


def _json_ready(value):
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
