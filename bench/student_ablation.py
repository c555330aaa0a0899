"""Which student design: quick comparisons on teacher features computed once (not the shipped pipeline).

Each variant trains on the good training images minus 100 held out (seeded), with the photometric
jitter of export.student on the student's input, Adam with a one-cycle schedule, batches of 8.
Maps are the mean squared student-teacher difference per position (or the bank's nearest-neighbour
distance), upsampled to 224 px and smoothed (sigma 4); "posnorm" divides by the held-out images'
per-position spread. Pixel AUROC here is at 224 px (every 2nd pixel), so it differs a little from
`anomaly-edge eval`, which measures at full resolution; per defect kind it is that kind's pixels
against a fixed sample of 300,000 normal pixels.

    python bench/student_ablation.py --pack packs/default --data ../shared/data/magnetic_tile \
        --variant multiscale --channels fine --steps 4000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.evaluation.dataset import open_mvtec, read_mask  # noqa: E402
from edge.evaluation.metrics import auroc  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.inference.preprocess import read_image, to_input_pixels  # noqa: E402
from export.student import _Teacher, augment, build_student, target_channels  # noqa: E402


def load_cache(pack, data: str, cache: Path) -> dict:
    """Pixels, masks at the input size and teacher features of every image, computed once per pack."""
    path = cache / f"{pack.model_id}-{Path(data).name}.npz"
    if path.is_file():
        return dict(np.load(path))
    ds, teacher = open_mvtec(data), _Teacher(pack)
    size = (pack.input.width, pack.input.height)

    def features(px):
        return np.concatenate([teacher.features(teacher.normalise(px[i:i + 16])).astype(np.float16)
                               for i in range(0, len(px), 16)])

    tr = np.stack([to_input_pixels(read_image(p), pack.input) for p in ds.train_good]).astype(np.uint8)
    te, masks = [], []
    for s in ds.test:
        img = read_image(s.path)
        te.append(to_input_pixels(img, pack.input).astype(np.uint8))
        masks.append(cv2.resize(read_mask(s, img.shape[:2]).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST))
    d = {"tr": tr, "te": np.stack(te), "masks": np.stack(masks), "kinds": np.array([s.kind for s in ds.test]),
         "ftr": features(tr.astype(np.float32)), "fte": None}
    d["fte"] = features(d["te"].astype(np.float32))
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **d)
    return d


def evaluate(d: dict, test_grid, hold_grid, posnorm: bool, name: str) -> None:
    if posnorm:
        sd = hold_grid.std(0)
        test_grid = (test_grid - hold_grid.mean(0)) / np.sqrt(0.5 * sd ** 2 + 0.5 * (sd ** 2).mean() + 1e-12)
    h, w = d["masks"].shape[1:]
    maps = np.stack([cv2.GaussianBlur(cv2.resize(g.astype(np.float32), (w, h)), (0, 0), 4.0) for g in test_grid])
    flat = maps.reshape(len(maps), -1)
    k = int(round(flat.shape[1] * 0.05))
    labels = d["kinds"] != "good"
    res = {"image": auroc(np.sort(flat, 1)[:, -k:].mean(1), labels)}
    sub, msk = maps[:, ::2, ::2], d["masks"][:, ::2, ::2] > 0
    res["pixel"] = auroc(sub.ravel(), msk.ravel())
    normal = sub[~msk][np.random.default_rng(0).choice(int((~msk).sum()), 300_000, replace=False)]
    for kind in sorted(set(d["kinds"]) - {"good"}):
        pos = sub[d["kinds"] == kind][msk[d["kinds"] == kind]]
        res[kind] = auroc(np.concatenate([pos, normal]), np.r_[np.ones(len(pos)), np.zeros(len(normal))].astype(bool))
    print(f"{name}: " + " ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)


def models(c_out: int):
    from torch import nn

    def conv(ci, co, k=3, s=1, dil=1):
        return [nn.Conv2d(ci, co, k, s, padding=dil * (k // 2), dilation=dil), nn.ReLU(inplace=True)]

    def dilated(w=128):  # the first student: stride-8 grid only, dilated convs, receptive field ~150 px
        return nn.Sequential(nn.Conv2d(3, w // 2, 4, 4), nn.ReLU(inplace=True), *conv(w // 2, w, s=2), *conv(w, w),
                             *conv(w, w, dil=2), *conv(w, w, dil=4), nn.Conv2d(w, c_out, 1))

    class Autoencoder(nn.Module):  # EfficientAD-style: the image through a 64-number bottleneck
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(*conv(3, 32, 4, 2), *conv(32, 32, 4, 2), *conv(32, 64, 4, 2), *conv(64, 64, 4, 2),
                                     *conv(64, 64, 4, 2), nn.Conv2d(64, 64, 7))
            self.dec = nn.ModuleList([nn.Sequential(*conv(64 if i == 0 else 64, 64)) for i in range(4)])
            self.out = nn.Conv2d(64, c_out, 3, padding=1)

        def forward(self, x):
            h = self.enc(x)
            for size, layer in zip((4, 7, 14, 28), self.dec):
                h = layer(nn.functional.interpolate(h, size=size, mode="bilinear"))
            return self.out(h)

    return {"dilated": dilated, "autoencoder": Autoencoder, "multiscale": lambda: build_student(c_out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pack", required=True)
    ap.add_argument("--data", required=True, help="MVTec-layout category folder")
    ap.add_argument("--cache", default="out/ablation-cache")
    ap.add_argument("--variant", choices=["bank", "dilated", "autoencoder", "multiscale"], required=True)
    ap.add_argument("--channels", choices=["all", "fine"], default="fine",
                    help="fine: the stride <= 16 channels the shipped student regresses")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--hard", type=float, default=0.0, help="also average the errors above this quantile (0: off)")
    args = ap.parse_args()
    import torch

    torch.manual_seed(0)
    pack = load_pack(args.pack)
    d = load_cache(pack, args.data, Path(args.cache))
    order = np.random.default_rng(0).permutation(len(d["tr"]))
    hold, train = np.sort(order[:100]), np.sort(order[100:])
    c0, c1 = target_channels(pack) if args.channels == "fine" else (0, d["ftr"].shape[1])
    ftr, fte = d["ftr"][:, c0:c1].astype(np.float32), d["fte"][:, c0:c1].astype(np.float32)
    name = f"{args.variant} ({args.channels} channels{'' if args.variant == 'bank' else f', {args.steps} steps'})"
    t0 = time.perf_counter()
    if args.variant == "bank":  # 1-NN L2 against 60,000 random training patches
        c = c1 - c0
        bank = torch.from_numpy(ftr[train]).permute(0, 2, 3, 1).reshape(-1, c)
        bank = bank[torch.from_numpy(np.random.default_rng(1).choice(len(bank), 60000, replace=False))]

        def grids(f):
            return np.stack([torch.cdist(torch.from_numpy(x).reshape(c, -1).T, bank).min(1).values
                             .reshape(x.shape[1:]).numpy() for x in f])
        test_grid, hold_grid = grids(fte), grids(ftr[hold])
    else:
        mean, std = ftr[train].mean((0, 2, 3), keepdims=True), ftr[train].std((0, 2, 3), keepdims=True) + 1e-6
        target_tr, target_te = torch.from_numpy((ftr - mean) / std), torch.from_numpy((fte - mean) / std)
        model = models(c1 - c0)[args.variant]()
        opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=args.steps, pct_start=0.1)
        teacher = _Teacher(pack)

        def norm(px):
            return torch.from_numpy(teacher.normalise(px.astype(np.float32)))
        rng = np.random.default_rng(0)
        for step in range(args.steps):
            idx = train[rng.choice(len(train), 8)]
            err = (model(norm(augment(d["tr"][idx], rng))) - target_tr[idx]).pow(2)
            loss = err.mean()
            if args.hard:
                q = torch.quantile(err.detach().flatten()[::7], args.hard)
                loss = 0.5 * loss + 0.5 * err[err >= q].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 500 == 0 or step == args.steps - 1:
                print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        model.eval()

        def grids(px, target):
            with torch.no_grad():
                return np.concatenate([(model(norm(px[i:i + 32].astype(np.float32))) - target[i:i + 32]).pow(2)
                                       .mean(1).numpy() for i in range(0, len(px), 32)])
        test_grid, hold_grid = grids(d["te"], target_te), grids(d["tr"][hold], target_tr[hold])
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    evaluate(d, test_grid, hold_grid, False, f"{name} raw")
    evaluate(d, test_grid, hold_grid, True, f"{name} posnorm")


if __name__ == "__main__":
    main()
