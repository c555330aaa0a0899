"""A seeded synthetic production line: machined flanges on a conveyor, with known defects and exact masks.

Used by `make demo` and by tests on machines with no real data. Everything is drawn from numpy Generators,
so the same seed always gives byte-identical images.

    line = SyntheticLine(seed=0)
    refs = line.good(10)                      # enrollment images
    for part in line.parts(100): ...          # SyntheticPart(part_id, image, mask, defect)

A defective part is a good render followed by `apply_defect(image, kind, rng)`; calling `render_part` and
`apply_defect` on one Generator in that order reproduces exactly what the line yields.
"""
from edge.line.synthetic.defects import apply_defect
from edge.line.synthetic.highres import HIGHRES_FRAME, SMALL_DEFECT_KINDS, HighResLine, apply_small_defect, render_frame
from edge.line.synthetic.line import SyntheticLine, write_good_parts, write_mvtec_dataset
from edge.line.synthetic.render import DEFECT_KINDS, SyntheticPart, render_part

__all__ = ["DEFECT_KINDS", "SMALL_DEFECT_KINDS", "HIGHRES_FRAME", "SyntheticPart", "SyntheticLine", "HighResLine",
           "render_part", "render_frame", "apply_defect", "apply_small_defect", "write_good_parts",
           "write_mvtec_dataset"]
