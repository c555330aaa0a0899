"""VisA's layout (split_csv/1cls.csv, one folder per object class) read like MVTec's, frames of any size."""
import csv

import cv2
import numpy as np
import pytest

from edge.evaluation.dataset import open_dataset, read_mask
from edge.errors import DatasetError
from edge.line.synthetic import apply_defect, render_part

ROWS = ("object", "split", "label", "image", "mask")


def write_visa(root, n_train=6, n_good=3, n_bad=3, size=(300, 400), label_value=1):
    """A tiny VisA-layout dataset for object 'flange' (plus a row of another object), masks labelled 1."""
    rows = [("capsules", "train", "normal", "capsules/Data/Images/Normal/000.JPG", "")]
    img_dir, mask_dir = root / "flange" / "Data" / "Images", root / "flange" / "Data" / "Masks" / "Anomaly"
    for d in (img_dir / "Normal", img_dir / "Anomaly", mask_dir):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def frame():
        # Non-square frames: the part on a wider canvas
        part = render_part(rng, size[0])
        out = np.full((*size, 3), 40, np.uint8)
        out[:, :size[0]] = part
        return out

    for i in range(n_train + n_good):
        name = f"flange/Data/Images/Normal/{i:04d}.JPG"
        cv2.imwrite(str(root / name), frame())
        rows.append(("flange", "train" if i < n_train else "test", "normal", name, ""))
    for i in range(n_bad):
        img, mask = apply_defect(frame(), "hole", rng)
        name, mname = f"flange/Data/Images/Anomaly/{i:03d}.JPG", f"flange/Data/Masks/Anomaly/{i:03d}.png"
        cv2.imwrite(str(root / name), img)
        cv2.imwrite(str(root / mname), mask.astype(np.uint8) * label_value)
        rows.append(("flange", "test", "anomaly", name, mname))
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ROWS)
        w.writerows(rows)
    return root


def test_visa_class_folder_opens_like_an_mvtec_category(tmp_path):
    root = write_visa(tmp_path / "visa")
    cat = open_dataset(root / "flange")
    assert len(cat.train_good) == 6 and all("Normal" in p.parts for p in cat.train_good)
    assert [s.kind for s in cat.test] == ["good"] * 3 + ["anomaly"] * 3
    bad = cat.test[-1]
    mask = read_mask(bad, (300, 400))
    assert mask.shape == (300, 400) and 0 < mask.sum() < mask.size  # label 1 counts as defect
    assert not read_mask(cat.test[0], (300, 400)).any()


def test_visa_mistakes_are_named(tmp_path):
    root = write_visa(tmp_path / "visa")
    with pytest.raises(DatasetError, match="a VisA dataset root; name one object class folder"):
        open_dataset(root)
    with pytest.raises(DatasetError, match="no rows for object 'nothing'"):
        open_dataset(root / "nothing")
    text = (root / "split_csv" / "1cls.csv").read_text().replace(",normal,", ",ok,", 1)
    (root / "split_csv" / "1cls.csv").write_text(text)
    with pytest.raises(DatasetError, match=r"1cls.csv line 2: label 'ok' \(expected normal or anomaly\)"):
        open_dataset(root / "capsules")


def test_eval_reads_visa(default_pack, tmp_path):
    from edge.evaluation.evaluate import evaluate

    root = write_visa(tmp_path / "visa")
    r = evaluate(default_pack, root / "flange", shots=None, quiet=True, log=lambda m: None)
    assert r["n_test"] == 6 and r["n_anomalous"] == 3
    assert r["image_auroc"] > 0.8 and r["pixel_auroc"] > 0.8
