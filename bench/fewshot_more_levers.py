"""More few-shot levers on an MVTec-layout category (image AUROC), each against the shipped head on the same seeds.

    python bench/fewshot_more_levers.py --data ../shared/data/magnetic_tile --lever scale       # 1 shot
    python bench/fewshot_more_levers.py --data ../shared/data/magnetic_tile --lever test-views  # 1 shot
    python bench/fewshot_more_levers.py --data ../shared/data/magnetic_tile --lever per-reference --shots 4,16
    python bench/fewshot_more_levers.py --data ../shared/data/magnetic_tile --lever second-screen --parts 50

scale: every frame resized by one factor (the shots' median side to 224 px, aspect kept, sides to multiples
of 32) instead of squashed to 224 x 224. test-views: a test frame's map averaged over its 4 flips, or the
lowest of their image scores; and 224 + 320 px heads summed (each over its references' median).
per-reference: one subspace per shot's rot8+shift views, the map the patch-wise lowest residual over all
shots or over the 2 / 4 shots nearest in mean feature. second-screen: after refine's mutual scoring (one
shot plus a stream built as `eval --shots 1 --learn N` builds it), each kept part's 16-fold held-out score,
set aside above median + 3 MAD-sigma. Needs the default pack (dynamic height and width) in packs/default.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from edge.evaluation import metrics  # noqa: E402
from edge.evaluation.dataset import open_dataset  # noqa: E402
from edge.inference.features import FeatureExtractor  # noqa: E402
from edge.inference.preprocess import choose_shots, read_image  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.scoring.decide import image_score  # noqa: E402
from edge.scoring.fewshot import SubspaceHead, few_shot_views  # noqa: E402
from edge.scoring.scorer import grid_maps, upsample_maps  # noqa: E402
from edge.station.learn import screen, suspect_cutoff  # noqa: E402
from fewshot_ablation import test_features  # noqa: E402

VIEWS = "rot8+shift"


class Encoder:
    """The pack's ONNX encoder at any size (multiples of 32), grey or colour frames as the pack reads them."""

    def __init__(self, pack):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(str(pack.file(pack.encoder.file)), providers=["CPUExecutionProvider"])
        self.channels = pack.encoder.feature_shape[0]

    def __call__(self, img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img[:, :, ::-1]
        x = (cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA).astype(np.float32) - 127) / 128
        f = self.sess.run(None, {"image": x.transpose(2, 0, 1)[None]})[0][0]
        return np.ascontiguousarray(f.transpose(1, 2, 0))


def head_score(head, feats, size) -> float:
    m = head.residual(feats.reshape(-1, feats.shape[-1])).reshape(feats.shape[:2])
    return image_score(upsample_maps(m[None], size, 8.0 * size[0] / 224)[0], 0.05)


def fitted(enc, refs, size_of) -> SubspaceHead:
    rows = np.concatenate([enc(v, size_of(v)).reshape(-1, enc.channels) for r in refs for v in few_shot_views(r, VIEWS)])
    head = SubspaceHead.fit(rows)
    head.median = float(np.median(head.residual(rows)))
    return head


def lever_scale(pack, cat, labels, args):
    enc = Encoder(pack)
    tests = [read_image(s.path) for s in cat.test]
    for seed in args.seeds:
        refs = [read_image(p) for p in choose_shots(cat.train_good, 1, seed)]
        factor = 224 / np.median([np.sqrt(r.shape[0] * r.shape[1]) for r in refs])

        def one_scale(im):
            return tuple(max(64, int(round(d * factor / 32)) * 32) for d in im.shape[:2])

        out = {"seed": seed}
        for name, size_of in (("squash", lambda im: (224, 224)), ("one_scale", one_scale)):
            head = fitted(enc, refs, size_of)
            out[name] = metrics.auroc(np.array([head_score(head, enc(t, size_of(t)), size_of(t)) for t in tests]), labels)
        yield out


FLIPS = (lambda a: a, lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: a[::-1, ::-1])


def lever_test_views(pack, cat, labels, args):
    enc = Encoder(pack)
    tests = [read_image(s.path) for s in cat.test]
    for seed in args.seeds:
        refs = [read_image(p) for p in choose_shots(cat.train_good, 1, seed)]
        heads = {side: fitted(enc, refs, lambda im, s=side: (s, s)) for side in (224, 320)}
        s = {k: [] for k in ("shipped", "flips_mean_map", "flips_lowest", "224+320")}
        for t in tests:
            maps = []
            for fl in FLIPS:
                f = enc(np.ascontiguousarray(fl(t)), (224, 224))
                maps.append(np.ascontiguousarray(fl(heads[224].residual(f.reshape(-1, enc.channels)).reshape(f.shape[:2]))))
            up = [upsample_maps(m[None], (224, 224), 8.0)[0] for m in maps]
            s["shipped"].append(image_score(up[0], 0.05))
            s["flips_mean_map"].append(image_score(upsample_maps(np.mean(maps, 0)[None], (224, 224), 8.0)[0], 0.05))
            s["flips_lowest"].append(min(image_score(m, 0.05) for m in up))
            s["224+320"].append(s["shipped"][-1] / heads[224].median
                                + head_score(heads[320], enc(t, (320, 320)), (320, 320)) / heads[320].median)
        yield {"seed": seed, **{k: metrics.auroc(np.array(v), labels) for k, v in s.items()}}


def image_scores(pack, patch, h, w) -> np.ndarray:
    maps = grid_maps(patch.reshape(len(patch), h, w).astype(np.float32), pack)
    return np.array([image_score(m, 0.05) for m in maps])


def lever_per_reference(pack, cat, labels, args):
    ex = FeatureExtractor(pack)
    feats, _ = test_features(pack, cat, ex, Path(args.cache))
    feats = np.asarray(feats, np.float32)
    n, h, w, c = feats.shape
    flat = feats.reshape(-1, c)
    test_mean = feats.reshape(n, -1, c).mean(1)
    for k in args.shots:
        for seed in args.seeds:
            per = [ex.patch_features_batched(few_shot_views(read_image(p), VIEWS)).astype(np.float32)
                   for p in choose_shots(cat.train_good, k, seed)]
            shipped = SubspaceHead.fit(np.concatenate([p.reshape(-1, c) for p in per]))
            heads = [SubspaceHead.fit(p.reshape(-1, c)) for p in per]
            res = np.stack([hd.residual(flat).reshape(n, -1) / np.median(hd.residual(p.reshape(-1, c)))
                            for hd, p in zip(heads, per)])                      # K x n x patches
            dist = ((test_mean[:, None] - np.stack([p.reshape(-1, c).mean(0) for p in per])[None]) ** 2).sum(-1)
            out = {"k": k, "seed": seed,
                   "shipped": metrics.auroc(image_scores(pack, shipped.residual(flat).reshape(n, -1), h, w), labels),
                   "lowest_over_all": metrics.auroc(image_scores(pack, res.min(0), h, w), labels)}
            for m in (2, 4):
                if m < k:
                    near = np.argsort(dist, 1)[:, :m]
                    lowest = np.stack([res[near[i], i].min(0) for i in range(n)])
                    out[f"lowest_over_nearest_{m}"] = metrics.auroc(image_scores(pack, lowest, h, w), labels)
            yield out


def lever_second_screen(pack, cat, labels, args):
    ex = FeatureExtractor(pack)
    feats, _ = test_features(pack, cat, ex, Path(args.cache))
    feats = np.asarray(feats, np.float32)
    n, h, w, c = feats.shape
    for seed in args.seeds:  # the stream as eval --shots 1 --learn N builds it
        defective = [t for t in cat.test if t.kind != "good"]
        n_bad = int(round(args.parts * 0.1))
        curated = choose_shots(cat.train_good, 1, seed)
        pool = [p for p in cat.train_good if p not in set(curated)]
        rng = np.random.default_rng(seed)
        mixed = [defective[i] for i in sorted(rng.choice(len(defective), n_bad, replace=False))]
        stream = choose_shots(pool, args.parts - n_bad, seed) + [t.path for t in mixed]
        stream = [stream[i] for i in rng.permutation(len(stream))]
        bad = {t.path.name for t in mixed}
        scored = np.array([t not in mixed for t in cat.test])
        refs = list(curated) + screen(pack, stream, seed, extractor=ex, log=lambda m: None).kept
        f = ex.patch_features_batched([read_image(p) for p in refs]).astype(np.float32)
        folds, held = min(len(refs), 16), np.empty(len(refs))
        for fold in range(folds):
            out_of = np.arange(len(refs)) % folds == fold
            held[out_of] = image_scores(pack, SubspaceHead.fit(f[~out_of].reshape(-1, c)).residual(
                f[out_of].reshape(-1, c)).reshape(out_of.sum(), -1), h, w)
        drop = np.zeros(len(refs), bool)
        drop[1:] = held[1:] > suspect_cutoff(held[1:])  # the enrolled shot always stays
        names = [p.name for p in refs]

        def auroc(keep):
            head = SubspaceHead.fit(f[keep].reshape(-1, c))
            return metrics.auroc(image_scores(pack, head.residual(feats[scored].reshape(-1, c)).reshape(
                scored.sum(), -1), h, w), labels[scored])

        yield {"seed": seed, "parts": args.parts, "defective_kept": sum(x in bad for x in names),
               "second_pass_set_aside": int(drop.sum()),
               "of_them_defective": int(sum(names[i] in bad for i in np.where(drop)[0])),
               "refine_as_shipped": auroc(np.ones(len(refs), bool)), "with_second_pass": auroc(~drop),
               "defects_removed_by_hand": auroc(np.array([x not in bad for x in names]))}


LEVERS = {"scale": lever_scale, "test-views": lever_test_views, "per-reference": lever_per_reference,
          "second-screen": lever_second_screen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pack", default=str(ROOT / "packs" / "default"))
    ap.add_argument("--lever", required=True, choices=sorted(LEVERS))
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--shots", default="4,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--parts", type=int, default=50)
    ap.add_argument("--cache", default=str(ROOT / "out" / "cache"))
    args = ap.parse_args()
    pack = load_pack(args.pack)
    cat = open_dataset(args.data)
    labels = np.array([int(s.anomalous) for s in cat.test])
    for row in LEVERS[args.lever](pack, cat, labels, args):
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
