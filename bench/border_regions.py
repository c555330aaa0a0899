"""Regions on the frame border and false alarms on the synthetic line (16 good parts enrolled, as `make
run`): the mean good-part map over the threshold by distance from the frame border, where good parts
peak, false alarms, caught defects, regions touching the border and regions off the defect.

    python bench/border_regions.py PACK MARGIN N [old|new]

MARGIN: 0, or input pixels of reflected margin around the frame before the encoder (features of the
margin cropped away: an experiment on the encoder's zero padding). old: without the head's border-ring
offsets and scales; new: with them (edge.station.few_shot_enrollment.BORDER_OFFSETS / BORDER_SCALES)."""
import sys
import cv2
import numpy as np
import edge.scoring.scorer as sc
import edge.station.few_shot_enrollment as es
from edge.pack import load_pack
from edge.scoring.factory import build_scorer
from edge.station.enrollment import build_state
from edge.line.synthetic import SyntheticLine

pack = load_pack(sys.argv[1])
margin = int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
orig = sc.FeatureExtractor.patch_features
stride = pack.encoder.stride


def padded(self, images):
    s = self.pack.input
    ih, iw = s.height - 2 * margin, s.width - 2 * margin
    imgs = [cv2.copyMakeBorder(cv2.resize(im, (iw, ih), interpolation=cv2.INTER_AREA), margin, margin, margin, margin,
                               cv2.BORDER_REFLECT_101) for im in images]
    f = orig(self, imgs)
    c = margin // stride
    return np.ascontiguousarray(f[:, c:f.shape[1] - c, c:f.shape[2] - c])


es.BORDER_OFFSETS = es.BORDER_SCALES = "new" in sys.argv
if margin:
    sc.FeatureExtractor.patch_features = padded
line = SyntheticLine(seed=0, defect_rate=0.2)
state = build_state(pack, SyntheticLine(seed=0).good(16), seed=0, quiet=True)
scorer = build_scorer(pack, state)
t = state.calibration.threshold
maps, fa, regs, border, caught, nd = [], 0, 0, 0, 0, 0
spurious = spurious_border = 0
for part in line.parts(n):
    r = scorer.score_one(part.image)
    H, W = r.frame_size
    for g in r.regions:
        regs += 1
        on_border = g.x <= 1 or g.y <= 1 or g.x + g.width >= W - 1 or g.y + g.height >= H - 1
        on_truth = part.mask[g.y:g.y + g.height, g.x:g.x + g.width].any()
        border += on_border
        spurious_border += on_border and not on_truth
        spurious += not on_truth
    if part.defect is None:
        maps.append(r.anomaly_map / t); fa += r.anomalous
    else:
        nd += 1; caught += r.anomalous
m = np.mean(maps, 0)
h = m.shape[0]
d = np.minimum.outer(np.minimum(np.arange(h), h - 1 - np.arange(h)), np.minimum(np.arange(h), h - 1 - np.arange(h)))
prof = [float(m[(d >= a) & (d < b)].mean()) for a, b in ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 200))]
peak = [np.unravel_index(np.argmax(x), x.shape) for x in maps]
inband = np.mean([min(y, x, h - 1 - y, h - 1 - x) < 16 for y, x in peak])
print(f"margin {margin}: threshold {t:.3f}; good map/threshold by border distance 0-4,4-8,8-16,16-32,32-64,64+:",
      " ".join(f"{v:.3f}" for v in prof), f"| good peaks within 16 px of the border {inband:.0%}",
      f"| false alarms {fa}/{len(maps)} | caught {caught}/{nd} | regions {regs}, touching the border {border}, "
      f"off the defect {spurious} (of which on the border {spurious_border})")
