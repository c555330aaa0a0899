"""Aspect-kept input vs the pack's square squash, few-shot subspace head, image AUROC.

Exports the default pack's EfficientNet-Lite0 encoder once more with dynamic height and width
(checked against PyTorch at non-square sizes), then scores an MVTec-layout category twice: frames
squashed to 224x224 (what the pack does) and frames resized to the same area keeping their aspect
ratio (each side a multiple of 32). References: K shots as eval draws them, `rot8` views, the
subspace head of edge.scoring.fewshot; the map is upsampled to the frame's input size before the top-5% score.

    python bench/aspect_ablation.py --data ../shared/data/magnetic_tile --shots 1,4,16 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.evaluation import metrics  # noqa: E402
from edge.evaluation.dataset import open_dataset  # noqa: E402
from edge.scoring.decide import image_score  # noqa: E402
from edge.scoring.fewshot import SubspaceHead, few_shot_views  # noqa: E402
from edge.inference.preprocess import choose_shots, read_image  # noqa: E402
from edge.scoring.scorer import upsample_maps  # noqa: E402


def export_dynamic(path: Path) -> float:
    """The default encoder with dynamic H/W; returns the max abs error against PyTorch at 3 sizes."""
    import onnxruntime as ort
    import torch

    from export import assets
    from export.default_pack import build_encoder

    model, _ = build_encoder(assets.fetch(assets.EFFICIENTNET_LITE0, log=lambda m: None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 224, 224),), str(path), input_names=["image"],
                          output_names=["features"], opset_version=17, dynamo=False,
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "features": {0: "batch", 2: "h", 3: "w"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    err = 0.0
    for hw in [(160, 352), (224, 448), (128, 320)]:
        x = np.random.default_rng(0).uniform(-1, 1, (1, 3, *hw)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        err = max(err, float(np.abs(sess.run(["features"], {"image": x})[0] - want).max()))
    return err


def area_kept_size(h: int, w: int, side: int = 224, multiple: int = 32) -> tuple[int, int]:
    s = side / np.sqrt(h * w)
    return (max(multiple, int(round(h * s / multiple)) * multiple), max(multiple, int(round(w * s / multiple)) * multiple))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--shots", default="1,4,16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default="square,aspect")
    args = ap.parse_args()
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "encoder_dynamic.onnx"
        print(f"dynamic H/W export: max abs error vs PyTorch {export_dynamic(path):.2e}", file=sys.stderr)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def features(img, mode):
        rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img[:, :, ::-1]
        h, w = (224, 224) if mode == "square" else area_kept_size(*img.shape[:2])
        x = (cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) - 127) / 128
        f = sess.run(["features"], {"image": x.transpose(2, 0, 1)[None]})[0][0]
        return np.ascontiguousarray(f.transpose(1, 2, 0)), (h, w)

    category = open_dataset(args.data)
    labels = np.array([int(s.anomalous) for s in category.test])
    for mode in args.modes.split(","):
        test = [features(read_image(s.path), mode) for s in category.test]
        for k in map(int, args.shots.split(",")):
            for seed in map(int, args.seeds.split(",")):
                refs = [read_image(p) for p in choose_shots(category.train_good, k, seed)]
                rows = np.concatenate([features(v, mode)[0].reshape(-1, test[0][0].shape[-1])
                                       for r in refs for v in few_shot_views(r, "rot8")])
                head = SubspaceHead.fit(rows)
                scores = [image_score(upsample_maps(head.residual(f.reshape(-1, f.shape[-1])).reshape(f.shape[:2])[None],
                                                    size, 8.0)[0], 0.05) for f, size in test]
                print(json.dumps({"mode": mode, "k": k, "seed": seed,
                                  "image_auroc": metrics.auroc(np.array(scores), labels)}), flush=True)


if __name__ == "__main__":
    main()
