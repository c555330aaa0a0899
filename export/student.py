"""Training the learned scorer (needs torch): a student network regresses the pack encoder's features.

STFPM / EfficientAD style. The teacher is the pack's own encoder graph (run in ONNX Runtime, so the
student learns exactly what the station computes). The student regresses the teacher's channels of
stride 16 and finer (`target_channels`), each normalised with its mean and spread over the training
images: on magnetic_tile a student that also had to follow the stride-32 channels ended at twice
the loss and scored lower (docs/evaluation.md, "Learned scorer"). The student is a small conv net
on the image with three resolutions (strides 8, 16 and 32, so it sees as far as the teacher's
deeper taps), merged on the stride-8 grid. The teacher's features of the unaugmented training
images are computed once; the student sees photometrically jittered copies, so it also learns to
ignore brightness and contrast drift. On a defect it has never seen it fails to follow the teacher:
the per-position mean squared difference is the anomaly map.

Held-out good images (not trained on) give each grid position's normal mean and spread of that
discrepancy; the exported graph subtracts and divides by them, so a map reads "spreads above
normal, here". The automatic threshold (edge.scoring.calibration) is fitted to leave-one-out image scores of
those held-out images: each normalised with statistics from the others.

Training is deterministic for a seed (the batch of step k is drawn from a generator seeded with
(seed, k), so a resumed run sees the same batches), stops cleanly at a time budget, and writes a
checkpoint that `resume` continues from. The StudentSpec records how far it got (`StudentTraining`:
steps done of planned, what stopped it, the loss and whether it was still falling); one the budget
stopped is "undertrained" and stations do not pick it (edge.scoring.student).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge.inference.backend import create_backend
from edge.scoring.calibration import calibrate
from edge.scoring.decide import image_score
from edge.errors import EdgeError
from edge.pack import Pack, sha256_file
from edge.inference.preprocess import to_input_pixels
from edge.scoring.scorer import grid_maps
from edge.scoring.student import OUTPUT, StudentSpec, StudentTraining, loss_summary

from .common import export_onnx, onnx_max_abs_error

MAX_ABS_ERROR = 1e-4
CHECKPOINT_VERSION = 2
MIN_IMAGES = 3  # at least one to train on and two held out for the statistics
SHRINK = 4.0  # pseudo-count pulling per-position statistics towards the whole map's (few held-out images)
PRIOR_CV = 0.25  # the prior's spread is at least this fraction of the mean discrepancy


class TrainError(EdgeError):
    pass


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 8
    lr: float = 2e-3  # the peak of a one-cycle schedule over `steps`
    width: int = 96  # student channels on the stride-8 grid (twice that at strides 16 and 32)
    seed: int = 0
    time_budget_s: float | None = None  # stop cleanly (with a usable model) after this long
    holdout_fraction: float = 0.15
    max_holdout: int = 100
    augment: bool = True
    checkpoint: str | None = None  # path; resumed from when it exists
    checkpoint_every: int = 100
    threads: int | None = None  # torch CPU threads (None: all)
    device: str = "auto"  # auto: CUDA when torch sees one, else cpu
    # resize: every image to the pack input, as the runtime does with each frame (magnetic_tile's
    # crops range from 240 to 494 px); error: refuse a set whose images differ in size.
    mixed_sizes: str = "resize"


def _torch():
    try:
        import torch
    except ImportError as e:
        raise TrainError(f"training the student needs torch: pip install 'anomaly-edge[export]' ({e})") from None
    return torch


def build_student(c_out: int, width: int = 96):
    """Image -> c_out channels on the stride-8 grid, from features at strides 8, 16 and 32 merged there.

    A 4x4 stride-4 patchify conv first: 3x3 convs at full resolution cost 4x the training time on
    the CPU for no gain in quality measured."""
    torch = _torch()
    from torch import nn

    def conv(c_in, c, stride=1, k=3):
        return [nn.Conv2d(c_in, c, k, stride, padding=k // 2), nn.ReLU(inplace=True)]

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.s8 = nn.Sequential(nn.Conv2d(3, w // 2, 4, 4), nn.ReLU(inplace=True), *conv(w // 2, w, 2), *conv(w, w))
            self.s16 = nn.Sequential(*conv(w, 2 * w, 2), *conv(2 * w, 2 * w))
            self.s32 = nn.Sequential(*conv(2 * w, 2 * w, 2), *conv(2 * w, 2 * w))
            self.head = nn.Sequential(*conv(5 * w, 2 * w, k=1), *conv(2 * w, 2 * w), nn.Conv2d(2 * w, c_out, 1))

        def forward(self, x):
            a = self.s8(x)
            b = self.s16(a)
            c = self.s32(b)
            size = a.shape[-2:]
            up = [nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (b, c)]
            return self.head(torch.cat([a, *up], 1))

    return Student()


def target_channels(pack: Pack) -> tuple[int, int]:
    """The channel range of the encoder features the student regresses: the leading layers of stride
    16 or finer (all layers when none is)."""
    end = 0
    for layer in pack.encoder.layers:
        if layer.stride > 16:
            break
        end += layer.channels
    return 0, (end or pack.encoder.feature_shape[0])


def _head_class():
    torch = _torch()

    class StudentHead(torch.nn.Module):
        """(image, teacher features) -> N x 1 x h x w discrepancy, normalised per position."""

        def __init__(self, student, channels, t_mean, t_std, pos_mean, pos_std):
            super().__init__()
            self.student = student
            self.c0, self.c1 = channels
            for name, v in (("t_mean", t_mean), ("t_std", t_std), ("pos_mean", pos_mean), ("pos_std", pos_std)):
                self.register_buffer(name, torch.as_tensor(np.asarray(v, np.float32)))

        def forward(self, image, features):
            target = (features[:, self.c0:self.c1] - self.t_mean[None, :, None, None]) / self.t_std[None, :, None, None]
            d = (self.student(image) - target).pow(2).mean(1, keepdim=True)
            return (d - self.pos_mean) / self.pos_std

    return StudentHead


def check_images(images: list[np.ndarray], names: list[str] | None = None, mixed_sizes: str = "resize") -> None:
    if len(images) < MIN_IMAGES:
        raise TrainError(f"the student needs at least {MIN_IMAGES} good images (one to train on, two held out "
                         f"for its statistics), got {len(images)}; use --scorer bank for fewer")
    if mixed_sizes not in ("resize", "error"):
        raise TrainError(f"mixed_sizes {mixed_sizes!r}: expected resize or error")
    names = names or [f"image {i}" for i in range(len(images))]
    first = images[0].shape[:2]
    for name, img in zip(names, images if mixed_sizes == "error" else []):
        if img.shape[:2] != first:
            raise TrainError(f"{name}: is {img.shape[1]}x{img.shape[0]} px, {names[0]} is {first[1]}x{first[0]}: "
                             "expected one size for all good images (mixed_sizes=error)")


def split(n: int, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out indices: a seeded draw, at least 2 and at most max_holdout held out."""
    n_hold = int(min(cfg.max_holdout, max(2, round(cfg.holdout_fraction * n)), n - 1))
    order = np.random.default_rng([cfg.seed, 1]).permutation(n)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric jitter of N x H x W x C pixels (contrast around the mean, brightness, a little noise).
    No geometric change: orientation and position are part of what is normal."""
    n = len(pixels)
    x = pixels.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    contrast = rng.uniform(0.8, 1.2, (n, 1, 1, 1)).astype(np.float32)
    brightness = rng.uniform(-20, 20, (n, 1, 1, 1)).astype(np.float32)
    x = (x - mean) * contrast + mean + brightness + rng.normal(0, 2, x.shape).astype(np.float32)
    return np.clip(x, 0, 255)


class _Teacher:
    """The pack encoder in ONNX Runtime, on pixels in the pack's input layout."""

    def __init__(self, pack: Pack):
        self.pack = pack
        self.backend = create_backend(pack)
        spec = pack.input.normalization
        self.mean = np.asarray(spec.mean, np.float32)
        self.std = np.asarray(spec.std, np.float32)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(((pixels - self.mean) / self.std).transpose(0, 3, 1, 2), np.float32)

    def features(self, batch: np.ndarray) -> np.ndarray:
        return self.backend.run(batch)


def _fingerprint(pack: Pack, pixels: np.ndarray, cfg: TrainConfig) -> str:
    h = hashlib.sha256(pack.encoder_sha256.encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    for key in ("steps", "batch_size", "lr", "width", "seed", "augment", "holdout_fraction", "max_holdout"):
        h.update(f"{key}={getattr(cfg, key)};".encode())
    return h.hexdigest()


def _load_checkpoint(path: Path, fingerprint: str):
    torch = _torch()
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"version {ck.get('version') if isinstance(ck, dict) else None!r}, "
                             f"expected {CHECKPOINT_VERSION}")
        for key in ("student", "optimizer", "schedule", "step", "fingerprint", "losses"):
            if key not in ck:
                raise ValueError(f"key '{key}' missing")
    except Exception as e:
        raise TrainError(f"{path}: not a usable student checkpoint ({type(e).__name__}: {e}); "
                         "delete it to train from the start") from None
    if ck["fingerprint"] != fingerprint:
        raise TrainError(f"{path}: checkpoint is of another training run (other images, pack or settings); "
                         "delete it or pass another --checkpoint")
    return ck


def _save_checkpoint(path: Path, ck: dict) -> None:
    torch = _torch()
    tmp = path.with_name(path.name + ".part")
    torch.save(ck, tmp)
    os.replace(tmp, path)


@dataclass
class Trained:
    head: object  # StudentHead with identity position statistics
    train_idx: np.ndarray
    holdout_idx: np.ndarray
    steps_done: int
    steps_planned: int
    stopped_by: str  # completed | time_budget
    losses: list[float]
    seconds: float
    pixels: np.ndarray  # all images at the pack's input size, uint8
    teacher: _Teacher  # its ONNX Runtime session, reused for the statistics and the export check


def train(pack: Pack, images: list[np.ndarray], cfg: TrainConfig, names: list[str] | None = None,
          quiet: bool = False, log=print, on_step=None) -> Trained:
    """Train the student on the good images (all but the held-out ones); resumes from cfg.checkpoint.
    `on_step(step)` is called after each step (and its checkpoint)."""
    torch = _torch()
    from tqdm import tqdm

    check_images(images, names, cfg.mixed_sizes)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    pixels = np.stack([to_input_pixels(img, pack.input) for img in images]).astype(np.uint8)
    train_idx, holdout_idx = split(len(images), cfg)
    teacher = _Teacher(pack)
    fingerprint = _fingerprint(pack, pixels, cfg)
    ckpath = Path(cfg.checkpoint) if cfg.checkpoint else None
    ck = _load_checkpoint(ckpath, fingerprint) if ckpath is not None and ckpath.exists() else None

    c0, c1 = target_channels(pack)
    # The teacher's features of the unaugmented training images, once (float16 halves the memory:
    # 752 images x 152 x 28 x 28 is 180 MB), normalised per channel with their mean and spread.
    feats = np.concatenate([teacher.features(teacher.normalise(pixels[train_idx[b0:b0 + 16]].astype(np.float32)))
                            [:, c0:c1] for b0 in range(0, len(train_idx), 16)])
    t_mean = feats.mean(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)
    t_std = (feats.std(axis=(0, 2, 3), dtype=np.float64) + 1e-6).astype(np.float32)
    targets = torch.from_numpy(((feats - t_mean[None, :, None, None]) / t_std[None, :, None, None]).astype(np.float16))
    del feats
    torch.manual_seed(cfg.seed)
    student = build_student(c1 - c0, cfg.width)
    step0, losses = 0, []
    if ck is not None:
        student.load_state_dict(ck["student"])
        step0, losses = int(ck["step"]), list(ck["losses"])
    student.to(device).train()
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    if ck is not None:
        optimizer.load_state_dict(ck["optimizer"])
        schedule.load_state_dict(ck["schedule"])
        log(f"resuming the student from {ckpath} at step {step0}/{cfg.steps}")

    def checkpoint(step):
        if ckpath is not None:
            _save_checkpoint(ckpath, {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "step": step,
                                      "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                                      "schedule": schedule.state_dict(), "losses": losses})

    t0 = time.perf_counter()
    step, stopped = step0, False
    bar = tqdm(total=cfg.steps, initial=step0, desc="training the student", unit="step", disable=quiet,
               leave=False, dynamic_ncols=True)
    while step < cfg.steps:
        elapsed = time.perf_counter() - t0
        per_step = elapsed / max(1, step - step0)
        if cfg.time_budget_s is not None and step > step0 and elapsed + per_step > cfg.time_budget_s:
            stopped = True
            break
        rng = np.random.default_rng([cfg.seed, 2, step])
        pick = rng.choice(len(train_idx), cfg.batch_size, replace=len(train_idx) < cfg.batch_size)
        idx = train_idx[pick]
        px = augment(pixels[idx], rng) if cfg.augment else pixels[idx].astype(np.float32)
        target = targets[torch.from_numpy(pick)].to(device, torch.float32)
        loss = (student(torch.from_numpy(teacher.normalise(px)).to(device)) - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % cfg.checkpoint_every == 0:
            checkpoint(step)
        if on_step is not None:
            on_step(step)
    bar.close()
    checkpoint(step)
    seconds = time.perf_counter() - t0
    if stopped:
        log(f"time budget {cfg.time_budget_s:g} s reached: student stopped at step {step}/{cfg.steps}")
    head = _head_class()(student.cpu().eval(), (c0, c1), t_mean, t_std, np.zeros((1, 1)), np.ones((1, 1)))
    return Trained(head, train_idx, holdout_idx, step, cfg.steps, "time_budget" if stopped else "completed", losses,
                   seconds, pixels, teacher)


def raw_maps(head, teacher: _Teacher, pixels: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """N x h x w discrepancy maps of the head as it is (identity statistics: raw)."""
    torch = _torch()
    out = []
    with torch.no_grad():
        for b0 in range(0, len(pixels), batch_size):
            batch = teacher.normalise(pixels[b0:b0 + batch_size].astype(np.float32))
            out.append(head(torch.from_numpy(batch), torch.from_numpy(teacher.features(batch)))[:, 0].numpy())
    return np.concatenate(out)


def position_statistics(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position mean and spread of n x h x w normal maps, shrunk towards the whole map's (SHRINK
    pseudo-images) so a few held-out images still give stable statistics; the prior spread is floored
    at PRIOR_CV x the mean, since one or two images show almost none of the part-to-part spread."""
    n = len(maps)
    mean, var = maps.mean(0), maps.var(0)
    w = n / (n + SHRINK)
    prior_var = max(float(var.mean()), (PRIOR_CV * float(mean.mean())) ** 2)
    mean = w * mean + (1 - w) * mean.mean()
    var = w * var + (1 - w) * prior_var
    return mean.astype(np.float32), np.sqrt(var + 1e-12).astype(np.float32)


def holdout_scores(pack: Pack, maps: np.ndarray) -> np.ndarray:
    """Image scores of the held-out maps, each normalised with the statistics of the others."""
    scores = []
    for i in range(len(maps)):
        mean, std = position_statistics(np.delete(maps, i, axis=0))
        z = grid_maps(((maps[i] - mean) / std)[None], pack)[0]
        scores.append(image_score(z, pack.scorer.top_fraction))
    return np.asarray(scores)


def fuse(pack: Pack, head_path: Path, out_path: Path) -> None:
    """One graph: the pack encoder, then the head on the image and its features -> anomaly_map."""
    import onnx

    enc = onnx.load(str(pack.file(pack.encoder.file)))
    head = onnx.load(str(head_path))
    shared = {pack.input.name, pack.encoder.output, OUTPUT, ""}

    def name(n: str) -> str:
        return n if n in shared else f"student/{n}"

    for node in head.graph.node:
        node.name = name(node.name) if node.name else ""
        node.input[:] = [name(i) for i in node.input]
        node.output[:] = [name(o) for o in node.output]
    for init in head.graph.initializer:
        init.name = name(init.name)
    g = enc.graph
    g.node.extend(head.graph.node)
    g.initializer.extend(head.graph.initializer)
    del g.output[:]
    g.output.extend([o for o in head.graph.output if o.name == OUTPUT])
    enc.ir_version = max(enc.ir_version, head.ir_version)
    onnx.checker.check_model(enc)
    onnx.save(enc, str(out_path))


def export_student(pack: Pack, head, teacher: _Teacher, pixels: np.ndarray, out_dir: Path, log) -> tuple[Path, float]:
    """Export the head, check ORT against torch, fuse with the encoder, check the fused graph; returns
    the content-addressed graph in out_dir and the worst error."""
    import onnxruntime as ort
    import torch

    batch = teacher.normalise(pixels[:2].astype(np.float32))
    feats = teacher.features(batch)
    with tempfile.TemporaryDirectory(prefix="student-export.") as tmp:
        head_path = Path(tmp) / "head.onnx"
        export_onnx(head, (torch.from_numpy(batch), torch.from_numpy(feats)), head_path,
                    [pack.input.name, pack.encoder.output], [OUTPUT])
        err = onnx_max_abs_error(head, head_path, {pack.input.name: batch, pack.encoder.output: feats}, [OUTPUT])[OUTPUT]
        fused = Path(tmp) / "fused.onnx"
        fuse(pack, head_path, fused)
        with torch.no_grad():
            want = head(torch.from_numpy(batch), torch.from_numpy(feats)).numpy()
        got = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"]).run([OUTPUT], {pack.input.name: batch})[0]
        err = max(err, float(np.abs(got - want).max()))
        log(f"student graph: ONNX Runtime vs PyTorch max abs error {err:.2e} (limit {MAX_ABS_ERROR:.0e})")
        if not err <= MAX_ABS_ERROR:
            raise TrainError(f"exported student differs from PyTorch by {err:.2e} > {MAX_ABS_ERROR:.0e}")
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / f"student-{sha256_file(fused)[:16]}.onnx"
        shutil.move(str(fused), final)
    return final, err


def train_student(pack: Pack, images: list[np.ndarray], out_dir: str | Path, cfg: TrainConfig | None = None,
                  names: list[str] | None = None, quiet: bool = False, log=None) -> StudentSpec:
    """Train, normalise, calibrate and export the learned scorer into `out_dir`; its StudentSpec."""
    cfg = cfg or TrainConfig()
    log = log or (lambda m: print(m, file=sys.stderr))
    trained = train(pack, images, cfg, names, quiet=quiet, log=log)
    pixels, teacher = trained.pixels, trained.teacher
    maps = raw_maps(trained.head, teacher, pixels[trained.holdout_idx])
    calibration = calibrate(holdout_scores(pack, maps))
    mean, std = position_statistics(maps)
    head = trained.head
    head.pos_mean, head.pos_std = (trained.head.pos_mean.new_tensor(mean), trained.head.pos_std.new_tensor(std))
    path, err = export_student(pack, head, teacher, pixels[trained.holdout_idx], Path(out_dir), log)
    first_loss, final_loss, trend = loss_summary(trained.losses)
    training = StudentTraining(trained.steps_done, trained.steps_planned, trained.stopped_by, final_loss, first_loss,
                               trend, cfg.time_budget_s, round(trained.seconds, 1),
                               str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None)
    info = {"shots": len(images), "trained_on": len(trained.train_idx), "held_out": len(trained.holdout_idx),
            "steps": trained.steps_done, "stopped_by_time_budget": trained.stopped_by == "time_budget",
            "train_seconds": round(trained.seconds, 1), "final_loss": final_loss,
            "export_max_abs_error": err, "config": {k: v for k, v in asdict(cfg).items() if k != "checkpoint"}}
    return StudentSpec(path.name, sha256_file(path), mean, std, calibration, info, training)
