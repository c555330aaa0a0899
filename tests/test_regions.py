"""Regions of flagged synthetic parts (issue 17): on the defect, not on the frame border (none for a defect in
the middle of the part), not far wider than it.
Real encoder and head (the session's enrolled 16-shot state), real synthetic defects with exact masks."""
import numpy as np

from edge.line.synthetic import SyntheticLine
from edge.scoring.decide import find_regions
from edge.scoring.factory import build_scorer
from edge.station.state import load_state


def test_regions_of_flagged_synthetic_parts_lie_on_their_defect(default_pack, enrolled_state):
    scorer = build_scorer(default_pack, load_state(enrolled_state, default_pack), None)
    parts = [p for p in SyntheticLine(seed=0, defect_rate=0.2).parts(100) if p.defect is not None]
    side_ratios, old_ratios, checked, mid_part = [], [], 0, 0
    for part, r in zip(parts, scorer.score([p.image for p in parts])):
        if not r.anomalous:
            continue
        h, w = r.frame_size
        ys, xs = np.nonzero(part.mask)
        tw, th = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
        assert r.regions, f"{part.part_id}: flagged with no region"
        for g in r.regions:
            box = part.mask[g.y:g.y + g.height, g.x:g.x + g.width]
            assert box.any(), f"{part.part_id}: region {(g.x, g.y, g.width, g.height)} off the {part.defect} defect"
        if min(xs.min(), ys.min(), w - 1 - xs.max(), h - 1 - ys.max()) >= 50:
            # A defect in the middle of the part: its region stops where the map dips before the encoder's
            # raised border ring (the ring's basins are taken away), so no box reaches the frame's edge
            for g in r.regions:
                assert g.x > 0 and g.y > 0 and g.x + g.width < w and g.y + g.height < h, \
                    f"{part.part_id}: region {(g.x, g.y, g.width, g.height)} of a mid-part {part.defect} on the border"
            mid_part += 1
        biggest = r.regions[0]
        side_ratios.append(max(biggest.width / tw, biggest.height / th))
        old = find_regions(r.anomaly_map, r.anomaly_map >= r.threshold, r.frame_size)[0]  # the old rule's box
        old_ratios.append(max(old.width / tw, old.height / th))
        checked += 1
    assert checked >= 15 and mid_part >= 3, (checked, mid_part)
    # Boxes are far tighter than the components of the map over the image threshold (about 5x the defect's side)
    assert np.median(side_ratios) <= 3.0 < np.median(old_ratios), (side_ratios, old_ratios)
