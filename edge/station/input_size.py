"""The size a station's frames are fed to the encoder at: the pack's own (frames squashed to it, as every
station did before), or one of the same area with the frames' aspect ratio kept, for frames far from the
pack's shape (a 500x1250 strip, a 2:1 tile) on a pack whose encoder takes any size (pack.yaml
`input.size_multiple`). Decided once at enrollment from the references and kept in the state
(`input_size`); every frame the station scores is resized to it. Knows shapes, not features.
"""
from __future__ import annotations

import numpy as np

from edge.errors import StateError
from edge.inference.preprocess import aspect_kept_size
from edge.pack import Pack

ASPECT_MODES = ("auto", "keep", "squash")
# auto keeps the aspect ratio where the references' departs from the pack's by at least this factor ...
KEEP_FROM = 1.4
# ... and at least MIN_REFERENCES references show it, every one within SAME_SHAPE of their median (one
# camera, one frame shape). A single reference cannot tell one camera's frames from a set of mixed shapes
# (magnetic_tile: tiles from 1:2.7 to 2.5:1, where a kept 2.4:1 shot cost 0.025 image AUROC), so one shot
# squashes unless told `keep`. Frames of another shape than the station's are resized to it.
SAME_SHAPE = 1.1
MIN_REFERENCES = 2


def station_input_size(pack: Pack, images: list[np.ndarray], mode: str = "auto") -> tuple[tuple[int, int] | None, str]:
    """(height, width) to feed the encoder, or None for the pack's size, and the decision in words."""
    if mode not in ASPECT_MODES:
        raise StateError(f"aspect {mode!r}: expected one of {', '.join(ASPECT_MODES)}")
    spec = pack.input
    if mode == "squash":
        return None, f"squashed to {spec.width}x{spec.height}: as configured"
    if spec.size_multiple is None:
        if mode == "keep":
            raise StateError(f"aspect keep: pack {pack.model_id}'s encoder takes {spec.width}x{spec.height} frames "
                             "only (pack.yaml input has no size_multiple); export the pack again, or enroll with "
                             "aspect squash")
        return None, f"squashed to {spec.width}x{spec.height}: the pack's encoder takes that size only"
    ratios = np.array([img.shape[1] / img.shape[0] for img in images])
    aspect = float(np.median(ratios))
    native = spec.width / spec.height
    if mode == "auto":
        if max(aspect / native, native / aspect) < KEEP_FROM:
            return None, (f"squashed to {spec.width}x{spec.height}: the frames' aspect ratio {aspect:.2f} is within "
                          f"{KEEP_FROM:g}x of the pack's {native:.2f}")
        if len(images) < MIN_REFERENCES:
            return None, (f"squashed to {spec.width}x{spec.height}: one reference cannot show that every frame has "
                          f"its {aspect:.2f} aspect ratio (enroll with aspect keep to keep it)")
        spread = float(max(ratios.max() / aspect, aspect / ratios.min()))
        if spread > SAME_SHAPE:
            return None, (f"squashed to {spec.width}x{spec.height}: the references' aspect ratios differ "
                          f"({ratios.min():.2f} to {ratios.max():.2f}), so no one shape keeps them")
    size = aspect_kept_size(aspect, spec.height * spec.width, spec.size_multiple)
    if size == (spec.height, spec.width):
        return None, f"{spec.width}x{spec.height}: the frames' aspect ratio {aspect:.2f} rounds to the pack's"
    return size, f"aspect ratio {aspect:.2f} kept: frames fed at {size[1]}x{size[0]}"
