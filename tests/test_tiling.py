"""High-resolution frames: ROI, alignment, tile grid geometry, tiled enrollment and scoring."""
import math

import cv2
import numpy as np
import pytest

from edge.line.config import ConfigError, parse_config
from edge.errors import StateError
from edge.scoring.roi import RoiError, RoiSpec, estimate_alignment, fixed_box, grey
from edge.line.synthetic import HighResLine, apply_small_defect, render_part
from edge.scoring.factory import build_scorer
from edge.scoring.tiling import Layout, TiledScorer, TileGrid, TilingSpec, prepare, resolve_layout, to_frame_map
from edge.station.tiled_enrollment import build_tiled_state

BASE = {"pack": "packs/default", "state": "state", "source": {"kind": "synthetic"}}
SMALL_FRAME = (1024, 1224)  # (height, width): keeps the tests quick; the benchmark uses 2448x2048


@pytest.mark.parametrize("size", [(558, 559), (224, 224), (100, 300), (1000, 450), (225, 700)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tile_grid_covers_the_roi_with_the_overlap_asked_for(size, overlap):
    grid = TileGrid.cover(size, (224, 224), overlap)
    covered = np.zeros((max(size[0], 224), max(size[1], 224)), int)
    for y, x in grid.origins:
        assert y >= 0 and x >= 0
        covered[y:y + 224, x:x + 224] += 1
    assert (covered[:size[0], :size[1]] >= 1).all()
    assert covered.shape == (max(size[0], 224), max(size[1], 224))  # no tile past the (padded) ROI
    for axis in (0, 1):
        starts = sorted({o[axis] for o in grid.origins})
        for a, b in zip(starts, starts[1:]):
            assert 224 - (b - a) >= math.floor(overlap * 224)


def test_stitched_tiles_give_back_the_roi_exactly():
    roi = np.random.default_rng(0).random((558, 700)).astype(np.float32)
    grid = TileGrid.cover(roi.shape, (224, 224), 0.25)
    tiles = grid.cut(roi)
    assert all(t.shape == (224, 224) for t in tiles)
    np.testing.assert_allclose(grid.blend(np.stack(tiles)), roi, rtol=1e-6)


def test_roi_map_lands_on_the_right_frame_pixels():
    # rect ROI at (300, 200), 900 x 700 frame pixels, scale 2: ROI pixel (u, v) is frame pixel (300 + 2u, 200 + 2v).
    spec = TilingSpec(scale=2, roi=RoiSpec(kind="rect", rect=(300, 200, 900, 700)))
    layout = Layout(spec, (900, 700))
    frame = np.zeros((1600, 2000), np.uint8)
    frame[200 + 2 * 60:200 + 2 * 60 + 2, 300 + 2 * 50:300 + 2 * 50 + 2] = 255  # one ROI pixel, (u, v) = (50, 60)
    roi_img, to_small = prepare(layout, frame)
    assert roi_img.shape == (350, 450)
    np.testing.assert_array_equal(to_small, [[1, 0, 150], [0, 1, 100]])
    assert np.unravel_index(np.argmax(roi_img), roi_img.shape) == (60, 50)
    roi_map = np.zeros((350, 450), np.float32)
    roi_map[60, 50] = 1.0
    frame_map = to_frame_map(roi_map, to_small, (800, 1000))
    assert np.unravel_index(np.argmax(frame_map), frame_map.shape) == (160, 200)
    assert frame_map.sum() == pytest.approx(1.0)


def test_alignment_recovers_a_known_shift_and_rotation():
    ref = grey(render_part(np.random.default_rng(1), 384))
    angle, shift = 3.0, (6.0, -4.0)
    a = cv2.getRotationMatrix2D((192, 192), angle, 1.0)
    a[:, 2] += shift
    moved = cv2.warpAffine(ref, a, (384, 384), borderMode=cv2.BORDER_REPLICATE)  # moved(A p) = ref(p)
    w = estimate_alignment(ref, moved)
    assert math.degrees(math.atan2(w[1, 0], w[0, 0])) == pytest.approx(-angle, abs=0.2)
    centre = w @ [192, 192, 1]
    np.testing.assert_allclose(centre, a @ [192, 192, 1], atol=1.0)


def test_roi_outside_the_frame_is_named_with_the_frame_size():
    with pytest.raises(RoiError, match=r"roi\.rect \[2000, 0, 600, 100\].*outside the 2448x2048 frame"):
        fixed_box(RoiSpec(kind="rect", rect=(2000, 0, 600, 100)), (2048, 2448))
    with pytest.raises(RoiError, match=r"roi\.points .*corners outside the 640x480 frame"):
        fixed_box(RoiSpec(kind="polygon", points=((0, 0), (700, 0), (0, 400))), (480, 640))


@pytest.mark.parametrize("roi, message", [
    ({"kind": "polygon", "points": []}, "roi: points: polygon needs at least 3 corners, got 0"),
    ({"kind": "polygon", "points": [[0, 0], [10, 10], [20, 20]]}, "roi: points: polygon has no area"),
    ({"kind": "rect", "rect": [10, 10, 0, 50]}, "roi: rect [10, 10, 0, 50]: x, y must be >= 0 and width, height > 0"),
    ({"kind": "rect"}, "roi: rect [x, y, width, height] is needed with kind rect"),
])
def test_bad_roi_config_is_named_by_key(tmp_path, roi, message):
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "tiling": {"scale": 3}, "roi": roi}, tmp_path / "station.yaml")
    assert message in str(e.value)


def test_roi_without_tiling_and_bad_tiling_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="roi is used by tiled scoring: add a tiling: section"):
        parse_config({**BASE, "roi": {"kind": "contour"}}, tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match=r"tiling\.overlap: Input should be less than 1"):
        parse_config({**BASE, "tiling": {"scale": 3, "overlap": 1.5}}, tmp_path / "s.yaml")
    c = parse_config({**BASE, "tiling": {"scale": 3, "bank": "per_tile"}, "roi": {"kind": "rect", "rect": [1, 2, 3, 4]}},
                     tmp_path / "s.yaml")
    assert c.tiling_spec() == TilingSpec(scale=3, bank="per_tile", roi=RoiSpec(kind="rect", rect=(1, 2, 3, 4)))


@pytest.fixture(scope="module")
def small_frames():
    line = HighResLine(seed=5, frame_size=SMALL_FRAME)
    refs = line.good(6)
    rng = np.random.default_rng(11)
    test = line.good(7, start=6)[0]
    defective, mask = apply_small_defect(test, "pit", 450.0, rng)
    return refs, test, defective, mask


@pytest.fixture(scope="module")
def tiled_state(default_pack, small_frames):
    spec = TilingSpec(scale=2, roi=RoiSpec(kind="contour", align="ecc"), bank_patches=2048)
    return build_tiled_state(default_pack, small_frames[0], spec, seed=0, quiet=True)


def test_small_defect_found_with_tiling_and_missed_without(default_pack, small_frames, tiled_state):
    from edge.station.enrollment import build_state

    refs, good, defective, mask = small_frames
    assert 400 < mask.sum() < 560  # about 0.04 % of the frame
    tiled = build_scorer(default_pack, tiled_state, tiled_state.tiling_spec)
    whole_state = build_state(default_pack, refs, seed=0, quiet=True)
    whole = build_scorer(default_pack, whole_state, None)

    r_good, r_bad = tiled.score([good, defective])
    assert r_bad.frame_size == SMALL_FRAME and r_bad.map_at_frame().shape == SMALL_FRAME
    assert not r_good.anomalous
    assert r_bad.anomalous
    ys, xs = np.nonzero(mask)
    hit = [r for r in r_bad.regions
           if r.x <= xs.mean() <= r.x + r.width and r.y <= ys.mean() <= r.y + r.height]
    assert hit, f"no region at the defect ({xs.mean():.0f}, {ys.mean():.0f}): {r_bad.regions}"
    assert hit[0].area < 0.01 * mask.size  # reported in frame pixels, about the defect's size

    r_whole = whole.score_one(defective)
    assert not (r_whole.anomalous and (r_whole.mask_at_frame() & mask).any())


def test_tiled_state_round_trips_and_refuses_another_tiling(default_pack, tiled_state, small_frames, tmp_path):
    from edge.station.state import load_state

    tiled_state.save(tmp_path / "state")
    loaded = load_state(tmp_path / "state", default_pack)
    assert loaded.layout.spec == tiled_state.layout.spec
    assert loaded.layout.roi_size == tiled_state.layout.roi_size
    np.testing.assert_array_equal(loaded.layout.reference, tiled_state.layout.reference)
    a = build_scorer(default_pack, loaded, loaded.layout.spec).score_one(small_frames[2])
    b = build_scorer(default_pack, tiled_state, tiled_state.tiling_spec).score_one(small_frames[2])
    assert a.score == pytest.approx(b.score, rel=1e-5)
    other = TilingSpec(scale=3, roi=RoiSpec(kind="contour", align="ecc"), bank_patches=2048)
    with pytest.raises(StateError, match=r"enrolled with tiling scale 2.*asks for tiling scale 3.*enroll again"):
        build_scorer(default_pack, loaded, other)
    with pytest.raises(StateError, match=r"asks for no tiling \(whole frames\)"):
        build_scorer(default_pack, loaded, None)


def test_per_tile_banks_are_saved_and_loaded(default_pack, small_frames, tmp_path):
    from edge.station.state import load_state

    spec = TilingSpec(scale=2, bank="per_tile", bank_patches=256, roi=RoiSpec(kind="rect", rect=(100, 60, 600, 500)))
    state = build_tiled_state(default_pack, small_frames[0][:3], spec, seed=0, quiet=True)
    assert len(state.banks) == len(state.layout.grid(default_pack)) == 4
    state.save(tmp_path / "state")
    loaded = load_state(tmp_path / "state", default_pack)
    assert [len(b) for b in loaded.banks] == [len(b) for b in state.banks]
    assert len(list((tmp_path / "state").glob("bank-*.npz"))) == len({b.features.tobytes() for b in state.banks})
    with pytest.raises(RoiError, match=r"roi\.rect \[100, 60, 600, 500\].*outside the 640x480 frame"):
        build_scorer(default_pack, loaded, loaded.tiling_spec).score_one(np.zeros((480, 640, 3), np.uint8))


def test_runtime_builds_the_tiled_scorer_its_config_asks_for(default_pack_dir, tiled_state, tmp_path):
    import yaml

    from edge.line.config import load_config
    from edge.line.runtime import Runtime
    from station_helpers import write_config

    tiled_state.save(tmp_path / "enrolled")
    tiling = {"scale": 2, "bank_patches": 2048}
    path = write_config(tmp_path, default_pack_dir, tmp_path / "enrolled", 1883, {"kind": "synthetic"},
                        tiling=tiling, roi={"kind": "contour", "align": "ecc"})
    rt = Runtime(load_config(path), path)
    assert isinstance(rt.scorer, TiledScorer) and rt.scorer.threshold == tiled_state.calibration.threshold
    rt.store.close()
    raw = yaml.safe_load(path.read_text())
    raw["tiling"]["scale"] = 3
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StateError, match="enrolled with tiling scale 2.*asks for tiling scale 3"):
        Runtime(load_config(path), path)


def test_template_roi_follows_the_part_like_its_contour(small_frames):
    refs = small_frames[0]
    places = {}
    for kind in ("contour", "template"):
        layout = resolve_layout(TilingSpec(scale=2, roi=RoiSpec(kind=kind)), refs[0])
        assert layout.reference is not None
        places[kind] = [prepare(layout, f)[1][:, 2] for f in refs[1:4]]
    # The parts sit at different columns of the belt; both ways of finding them agree within a few pixels.
    assert np.ptp([p[0] for p in places["contour"]]) > 20
    np.testing.assert_allclose(places["template"], places["contour"], atol=6)
