"""The synthetic production line: determinism, defect masks that match what changed, MVTec export."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from edge.line.synthetic import (
    DEFECT_KINDS,
    SyntheticLine,
    SyntheticPart,
    apply_defect,
    render_part,
    write_mvtec_dataset,
)


def _part_disc(good: np.ndarray, tol: float = 2.5) -> np.ndarray:
    """The part's silhouette in a good render, found independently of the module: bright metal's enclosing circle."""
    grey = cv2.cvtColor(good, cv2.COLOR_BGR2GRAY)
    contours, _ = cv2.findContours((grey > 80).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    (cx, cy), r = cv2.minEnclosingCircle(max(contours, key=cv2.contourArea))
    yy, xx = np.mgrid[: grey.shape[0], : grey.shape[1]]
    return np.hypot(xx - cx, yy - cy) <= r + tol


def _metal(good: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(good, cv2.COLOR_BGR2GRAY) > 80


def test_good_render_is_a_bright_disc_on_a_dark_belt():
    img = render_part(np.random.default_rng(0), 256)
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    disc = _part_disc(img)
    r = np.sqrt(disc.sum() / np.pi)
    assert 0.34 * 256 < r < 0.42 * 256
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    assert grey[:20, :20].mean() < 70  # belt corner
    assert grey[_metal(img)].mean() > 120


def test_same_seed_gives_identical_stream_and_different_seed_differs():
    a = list(SyntheticLine(seed=3, size=128).parts(6))
    b = list(SyntheticLine(seed=3, size=128).parts(6))
    c = list(SyntheticLine(seed=4, size=128).parts(6))
    for pa, pb in zip(a, b):
        assert pa.part_id == pb.part_id and pa.defect == pb.defect
        assert np.array_equal(pa.image, pb.image) and np.array_equal(pa.mask, pb.mask)
    assert any(not np.array_equal(pa.image, pc.image) for pa, pc in zip(a, c))
    assert [p.part_id for p in a] == [f"syn-{i:06d}" for i in range(1, 7)]


def test_parts_start_skips_ahead_consistently():
    line = SyntheticLine(seed=1, size=96, defect_rate=0.5)
    whole = list(line.parts(5))
    tail = list(line.parts(2, start=3))
    assert [p.part_id for p in tail] == ["syn-000004", "syn-000005"]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(whole[3:], tail))


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_every_defect_kind_appears_within_first_20_parts(seed):
    parts = list(SyntheticLine(seed=seed, size=64, defect_rate=0.5).parts(20))
    kinds = {p.defect for p in parts if p.defect}
    assert kinds == set(DEFECT_KINDS)
    assert sum(p.defect is not None for p in parts) == 10


def test_default_defect_rate_holds_and_good_parts_have_empty_masks():
    parts = list(SyntheticLine(seed=5, size=64).parts(40))
    assert sum(p.defect is not None for p in parts) == 8
    for p in parts:
        assert isinstance(p, SyntheticPart)
        assert p.mask.dtype == bool and p.mask.shape == p.image.shape[:2]
        assert p.mask.any() == (p.defect is not None)
        assert p.defect is None or p.defect in DEFECT_KINDS


def test_line_part_equals_good_render_plus_apply_defect_on_same_rng():
    line = SyntheticLine(seed=2, size=128, defect_rate=1.0)
    part = next(line.parts(1))
    rng = np.random.default_rng([2, 1, 0])  # the line's per-part stream for part 0
    good = render_part(rng, 128)
    img, mask = apply_defect(good, part.defect, rng)
    assert np.array_equal(img, part.image) and np.array_equal(mask, part.mask)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_mask_is_non_empty_on_the_part_and_marks_a_visible_change(kind):
    for i in range(6):
        rng = np.random.default_rng(100 + i)
        good = render_part(rng, 256)
        before = good.copy()
        img, mask = apply_defect(good, kind, rng)
        assert np.array_equal(good, before)  # input untouched
        assert mask.dtype == bool and mask.shape == (256, 256) and img.shape == good.shape
        assert mask.sum() >= 30
        # On the part: missing_chunk removes former part area, the others sit on the metal surface.
        assert _part_disc(good)[mask].all()
        if kind != "missing_chunk":
            assert _metal(good)[mask].mean() > 0.97
        diff = np.abs(img.astype(np.int16) - good).max(axis=2)
        assert diff[mask].mean() > 20
        if kind in ("scratch", "hole"):  # hard-edged defects change nothing outside their mask
            assert not diff[~mask].any()


def test_good_parts_vary_slightly_but_far_less_than_a_defect():
    goods = SyntheticLine(seed=0, size=256).good(6)
    pair_mad = [np.abs(goods[i].astype(np.int16) - goods[j]).mean() for i in range(6) for j in range(i + 1, 6)]
    assert min(pair_mad) > 0.5  # not pixel-identical
    assert max(pair_mad) < 20
    rng = np.random.default_rng(9)
    good = render_part(rng, 256)
    img, mask = apply_defect(good, "hole", rng)
    local = np.abs(img.astype(np.int16) - good)[mask].mean()
    assert local > 2 * max(pair_mad)


def test_good_stream_is_independent_of_parts_stream():
    line = SyntheticLine(seed=0, size=96)
    goods = line.good(3)
    assert len(goods) == 3 and all(g.shape == (96, 96, 3) for g in goods)
    assert all(np.array_equal(a, b) for a, b in zip(goods, line.good(3)))
    assert not any(np.array_equal(g, p.image) for g, p in zip(goods, line.parts(3)))


def test_unknown_defect_kind_and_bad_rate_are_rejected():
    with pytest.raises(ValueError):
        apply_defect(render_part(np.random.default_rng(0), 64), "dent", np.random.default_rng(0))
    with pytest.raises(ValueError):
        SyntheticLine(defect_rate=1.5)


def test_write_mvtec_dataset_writes_layout_with_matching_masks(tmp_path):
    root = write_mvtec_dataset(tmp_path / "flange", n_train=3, n_test_good=2, n_test_per_defect=2, size=96, seed=1)
    assert root == tmp_path / "flange"
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
    assert sorted(p.name for p in (root / "test" / "good").iterdir()) == ["000.png", "001.png"]
    for kind in DEFECT_KINDS:
        assert sorted(p.name for p in (root / "test" / kind).iterdir()) == ["000.png", "001.png"]
        for i in range(2):
            img = cv2.imread(str(root / "test" / kind / f"{i:03d}.png"), cv2.IMREAD_UNCHANGED)
            gt = cv2.imread(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), cv2.IMREAD_UNCHANGED)
            assert img.shape == (96, 96, 3) and gt.shape == (96, 96) and gt.dtype == np.uint8
            assert set(np.unique(gt)) == {0, 255}
    first = cv2.imread(str(root / "test" / "hole" / "000.png"))
    # Idempotent: a smaller rewrite leaves no stale files and reproduces the same images.
    write_mvtec_dataset(root, n_train=2, n_test_good=1, n_test_per_defect=2, size=96, seed=1)
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == ["000.png", "001.png"]
    assert np.array_equal(cv2.imread(str(root / "test" / "hole" / "000.png")), first)


def test_rendering_is_fast():
    rng = np.random.default_rng(0)
    render_part(rng, 256)
    t0 = time.perf_counter()
    for _ in range(10):
        render_part(rng, 256)
    assert (time.perf_counter() - t0) / 10 < 0.05  # target is well under 20 ms; slack for loaded CI machines
