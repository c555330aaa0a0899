"""Magnetic tile, 16 shots seed 0 (as eval), every 3rd test image: image and pixel AUROC of the subspace
head without / with the border-ring offsets and scales (features extracted once; heads refitted)."""
import sys
import numpy as np
import edge.station.few_shot_enrollment as es
from edge.evaluation import metrics
from edge.evaluation.dataset import open_dataset, read_mask
from edge.scoring.decide import image_score
from edge.scoring.fewshot import few_shot_views
from edge.pack import load_pack
from edge.inference.preprocess import choose_shots, read_image, read_images
from edge.inference.features import FeatureExtractor
from edge.scoring.scorer import grid_maps
import cv2

pack = load_pack(sys.argv[1])
cat = open_dataset(sys.argv[2])
ext = FeatureExtractor(pack)
refs, _, _ = read_images(choose_shots(cat.train_good, 16, 0), lambda m: None)
feats = np.concatenate([ext.patch_features_batched(few_shot_views(im, es.FEW_SHOT_VIEWS)) for im in refs])
tests = cat.test[::3]
imgs = [read_image(s.path) for s in tests]
tf = ext.patch_features_batched(imgs)
labels = np.array([int(s.anomalous) for s in tests])
masks = [read_mask(s, im.shape[:2]) for s, im in zip(tests, imgs)]
for name, off, scl in (("old", False, False), ("offsets", True, False), ("offsets+scales", True, True)):
    es.BORDER_OFFSETS, es.BORDER_SCALES = off, scl
    head = es.fit_head("subspace", es.FEW_SHOT_VIEWS, feats, pack, 0, border=off)
    maps = grid_maps(head.patch_scores(tf), pack)
    scores = np.array([image_score(m, pack.scorer.top_fraction) for m in maps])
    full = [cv2.resize(m, (im.shape[1], im.shape[0]))[::4, ::4] for m, im in zip(maps, imgs)]
    pm = [k[::4, ::4] for k in masks]
    keep = [i for i, s in enumerate(tests) if not s.anomalous or s.mask_path is not None]
    print(f"{name}: image AUROC {metrics.auroc(scores, labels):.4f} pixel AUROC "
          f"{metrics.pixel_auroc([full[i] for i in keep], [pm[i] for i in keep]):.4f} ({len(tests)} images)", flush=True)
