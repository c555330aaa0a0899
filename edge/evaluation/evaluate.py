"""`anomaly-edge eval`: enroll K good shots from an MVTec- or VisA-layout folder, score its test split, report.

Reports image AUROC, pixel AUROC, AUPRO (to 30% FPR), and the automatic threshold's verdict
accuracy, balanced accuracy, F1 and false-reject rate, plus throughput; writes JSON, a markdown
summary, a ROC plot and a few heatmap overlays.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from edge.evaluation import metrics

from edge.scoring import visual
from edge.evaluation.dataset import open_dataset, read_mask
from edge.errors import DatasetError, EdgeError, ImageError
from edge.pack import Pack
from edge.inference.preprocess import choose_shots, read_image, read_images
from edge.inference.features import FeatureExtractor
from edge.scoring.scorer import Scorer
from edge.station.enrollment import build_state
from edge.scoring.student import StudentScorer, StudentTraining
from edge.scoring.factory import build_scorer
from edge.station.tiled_enrollment import build_tiled_state

PIXEL_STEP = 2  # pixel metrics on every 2nd row/column of the full-resolution maps
BATCH = 8


def evaluate(pack: Pack, data: str | Path, shots: int | None, seed: int = 0, report_dir: str | Path | None = None,
             n_overlays: int = 6, quiet: bool = False, log=print, tiling=None, train_student=None,
             learn_parts: int | None = None, learn_defect_rate: float = 0.1, foreground: str = "auto",
             aspect: str = "auto") -> dict:
    """`train_student(images, folder) -> StudentSpec` (export.student) evaluates the learned scorer
    instead of the memory bank. `learn_parts` evaluates learn mode instead (edge.station.learn): an unlabeled
    stream of that many parts, good train images with `learn_defect_rate` of defective test images mixed
    in (those are then left out of the scored test set); with `shots` as well, the station is first enrolled
    from that many good train images and the stream refines it (edge.station.learn.refine). `foreground` auto | on | off: whether the few-shot
    head masks the background of parts on a plain one (edge.scoring.foreground); `aspect` auto | keep |
    squash: whether frames far from the pack's shape keep their aspect ratio (edge.station.input_size)."""
    if tiling is not None and train_student is not None:
        raise EdgeError("the learned scorer scores whole frames: evaluate tiling with --scorer bank")
    category = open_dataset(data)
    if learn_parts is not None:
        if tiling is not None or train_student is not None:
            raise EdgeError("learn mode is evaluated with the whole-frame bank (no tiling, no student)")
        return _evaluate_learn(pack, data, category, learn_parts, learn_defect_rate, seed, report_dir, n_overlays,
                               quiet, log, shots=shots)
    train = choose_shots(category.train_good, shots, seed)
    ref_images, _, skipped_refs = read_images(train, log)
    if not ref_images:
        raise DatasetError(f"{category.root}: no readable good train images")
    with tempfile.TemporaryDirectory(prefix="eval.") as work:
        t0 = time.perf_counter()
        if train_student is None:
            extractor = FeatureExtractor(pack)
            if tiling is None:
                state = build_state(pack, ref_images, extractor, seed=seed, quiet=quiet, foreground=foreground,
                                    aspect=aspect)
            else:
                state = build_tiled_state(pack, ref_images, tiling, extractor, seed=seed, quiet=quiet)
            calibration = state.calibration
            info = {"bank_patches": sum(len(b) for b in state.banks),
                    "tiling": state.layout.to_dict() if state.layout is not None else None,
                    "foreground": state.info.get("foreground"), "input": state.info.get("input")}
            scorer = build_scorer(pack, state, tiling, extractor=extractor)
        else:
            student = train_student(ref_images, Path(work))
            calibration, info = student.calibration, {"student": student.info,
                                                      "student_training": student.training.to_dict(), "tiling": None}
            scorer = StudentScorer.from_spec(pack, work, student)
        enroll_s = time.perf_counter() - t0
        return _score_test(pack, data, category, scorer, calibration, info, ref_images, seed, enroll_s,
                           skipped_refs, report_dir, n_overlays, quiet, log)


def _evaluate_learn(pack, data, category, n_parts: int, defect_rate: float, seed: int, report_dir, n_overlays,
                    quiet, log, shots: int | None = None) -> dict:
    import dataclasses

    from edge.station.enrollment import enroll
    from edge.station.learn import learn, refine

    if not 0 <= defect_rate < 0.5:
        raise EdgeError(f"learn defect rate must be in [0, 0.5), got {defect_rate}")
    defective = [t for t in category.test if t.kind != "good"]
    n_bad = int(round(n_parts * defect_rate))
    curated = choose_shots(category.train_good, shots, seed) if shots is not None else []
    enrolled = set(curated)
    pool = [p for p in category.train_good if p not in enrolled]
    if n_bad > len(defective) // 2 or n_parts - n_bad > len(pool):
        raise DatasetError(f"{category.root}: too few images for a learn stream of {n_parts} parts "
                           f"({n_bad} defective" + (f", after {len(curated)} enrolled shots)" if curated else ")"))
    rng = np.random.default_rng(seed)
    mixed = [defective[i] for i in sorted(rng.choice(len(defective), n_bad, replace=False))]
    stream = choose_shots(pool, n_parts - n_bad, seed) + [t.path for t in mixed]
    stream = [stream[i] for i in rng.permutation(len(stream))]
    bad_names = {t.path.name for t in mixed}
    with tempfile.TemporaryDirectory(prefix="eval-learn.") as work:
        t0 = time.perf_counter()
        extractor = FeatureExtractor(pack)
        state_dir = Path(work) / "state"
        before = None
        if curated:
            before = enroll(pack, curated, state_dir, seed=seed, extractor=extractor, quiet=quiet, log=log).calibration
            result = refine(pack, stream, state_dir, seed=seed, extractor=extractor, quiet=quiet, log=log)
        else:
            result = learn(pack, stream, state_dir, seed=seed, extractor=extractor, quiet=quiet, log=log)
        enroll_s = time.perf_counter() - t0
        state = result.state
        suspects = {p.name for p in result.suspects}
        info = {"bank_patches": sum(len(b) for b in state.banks), "tiling": None,
                "learn": {"parts": len(stream), "defective_mixed_in": n_bad,
                          "set_aside": len(suspects), "defective_set_aside": len(suspects & bad_names),
                          "good_set_aside": len(suspects - bad_names), "cutoff": round(result.cutoff, 4)}}
        if before is not None:
            info["learn"].update(enrolled_shots=len(curated), threshold_before=round(before.threshold, 4),
                                 threshold_source_before=before.source)
        log(f"learn mode: {len(suspects)} of {len(stream)} parts set aside ({len(suspects & bad_names)} of the "
            f"{n_bad} defective ones)")
        scorer = build_scorer(pack, state, None, extractor=extractor)
        kept_images = [read_image(p) for p in [*curated, *result.kept]]
        test = dataclasses.replace(category, test=[t for t in category.test if t not in mixed])
        return _score_test(pack, data, test, scorer, state.calibration, info, kept_images, seed, enroll_s, [],
                           report_dir, n_overlays, quiet, log)


def _score_test(pack, data, category, scorer, calibration, info, ref_images, seed, enroll_s, skipped_refs, report_dir,
                n_overlays, quiet, log) -> dict:
    scores, labels, kinds, paths, p_values = [], [], [], [], []
    maps, masks, skipped = [], [], []
    keep_for_overlay = []
    score_s = 0.0
    samples = category.test
    bar = tqdm(total=len(samples), desc="scoring test images", unit="img", disable=quiet, leave=False, dynamic_ncols=True)
    for b0 in range(0, len(samples), BATCH):
        batch, batch_imgs = [], []
        for s in samples[b0:b0 + BATCH]:
            try:
                img = read_image(s.path)
                mask = read_mask(s, img.shape[:2])
            except ImageError as e:
                skipped.append(str(e))
                log(f"skipped: {e}")
                continue
            batch.append((s, mask))
            batch_imgs.append(img)
        if batch_imgs:
            t = time.perf_counter()
            results = scorer.score(batch_imgs)
            score_s += time.perf_counter() - t
            for (s, mask), img, r in zip(batch, batch_imgs, results):
                scores.append(r.score)
                p_values.append(r.p_value if r.p_value is not None else calibration.p_value(r.score))
                labels.append(int(s.anomalous))
                kinds.append(s.kind)
                paths.append(str(s.path))
                if s.anomalous and s.mask_path is None:
                    continue  # no ground truth for pixel metrics
                full = r.map_at_frame()
                maps.append(full[::PIXEL_STEP, ::PIXEL_STEP].copy())
                masks.append(mask[::PIXEL_STEP, ::PIXEL_STEP].copy())
                keep_for_overlay.append((s, len(scores) - 1))
        bar.update(len(samples[b0:b0 + BATCH]))
    bar.close()

    scores_a = np.asarray(scores)
    labels_a = np.asarray(labels)
    if len(set(labels)) < 2:
        raise DatasetError(f"{category.root / 'test'}: needs both good and defective readable images to evaluate "
                           f"(found {len(labels)} images, all {'defective' if labels and labels[0] else 'good'})")
    # Pixel metrics need at least one defect mask (ground_truth/ may be absent): null otherwise.
    has_masks = any(m.any() for m in masks)
    th = calibration.threshold
    tm = metrics.threshold_metrics(scores_a, labels_a, th)
    oracle_th, oracle_bacc = metrics.best_threshold(scores_a, labels_a)
    fpr, tpr, _ = metrics.roc_curve(scores_a, labels_a)
    result = {
        "dataset": str(Path(data)),
        "pack": pack.model_id,
        "scorer": ("student" if scorer.bank is None else
                   "bank" if getattr(scorer, "head", None) is None else scorer.head.kind),
        "shots": len(ref_images),
        "seed": seed,
        "n_test": int(len(scores_a)),
        "n_anomalous": int(labels_a.sum()),
        "image_auroc": metrics.auroc(scores_a, labels_a),
        "pixel_auroc": metrics.pixel_auroc(maps, masks) if has_masks else None,
        "aupro": metrics.aupro(maps, masks, fpr_limit=0.3) if has_masks else None,
        "threshold": th,
        "threshold_source": calibration.source,
        "target_false_reject": calibration.target_false_reject,
        "p_value": _p_value_stats(np.asarray(p_values), labels_a),
        "accuracy": tm["accuracy"],
        "balanced_accuracy": tm["balanced_accuracy"],
        "f1": tm["f1"],
        "false_reject_rate": tm["false_reject_rate"],
        "miss_rate": tm["miss_rate"],
        "oracle_threshold": float(oracle_th),
        "oracle_balanced_accuracy": float(oracle_bacc),
        "frames_per_second": len(scores_a) / score_s if score_s > 0 else 0.0,
        "enroll_seconds": enroll_s,
        "calibration": {k: v for k, v in calibration.to_dict().items() if k not in ("normal_scores", "synthetic_scores")},
        "per_kind_detection": {k: float(np.mean(scores_a[np.asarray(kinds) == k] >= th)) for k in sorted(set(kinds))},
        "skipped": skipped_refs + skipped,
        **info,
    }
    if report_dir is not None:
        _write_report(Path(report_dir), result, (fpr, tpr), scores_a, labels_a, keep_for_overlay, scorer, n_overlays)
    return result


def _p_value_stats(p_values: np.ndarray, labels: np.ndarray) -> dict:
    """Mean and median conformal p-value on good and on defective test parts (good should spread over
    (0, 1], defective sit near 1 / (n + 1))."""
    out = {}
    for name, sel in (("good", labels == 0), ("defective", labels == 1)):
        v = p_values[sel]
        out[f"mean_{name}"] = float(v.mean()) if v.size else None
        out[f"median_{name}"] = float(np.median(v)) if v.size else None
    return out


def _write_report(out: Path, result: dict, roc, scores, labels, candidates, scorer: Scorer, n_overlays: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    visual.roc_plot_png(out / "roc.png", [("image", roc[0], roc[1], result["image_auroc"])],
                        title=f"{Path(result['dataset']).name}, {result['shots']} shots",
                        points=[(f"automatic threshold {result['threshold']:.3g}", result["false_reject_rate"],
                                 1.0 - result["miss_rate"])])
    # The highest-scoring defective images, the highest-scoring good one (closest false alarm), lowest defective.
    defective = sorted((c for c in candidates if labels[c[1]]), key=lambda c: -scores[c[1]])
    good = sorted((c for c in candidates if not labels[c[1]]), key=lambda c: -scores[c[1]])
    picks = defective[: max(1, n_overlays - 2)] + good[:1]
    if defective and defective[-1] not in picks:
        picks.append(defective[-1])
    overlays = []
    for s, i in picks:
        img = read_image(s.path)
        r = scorer.score_one(img)
        mask = read_mask(s, img.shape[:2])
        panel = visual.side_by_side(
            [img, visual.result_overlay(img, r, truth=mask)],
            [f"{s.kind}: {s.path.name}", f"score {r.score:.3f} ({r.verdict})"])
        name = f"overlay_{len(overlays):02d}_{s.kind}.png"
        cv2.imwrite(str(out / name), panel)
        overlays.append(name)
    result["report"] = {"dir": str(out), "roc": "roc.png", "overlays": overlays}
    (out / "summary.md").write_text(summary_markdown(result))


def _fmt(value) -> str:
    return "n/a (no defect masks)" if value is None else f"{value:.3f}"


def summary_markdown(r: dict) -> str:
    rows = [
        ("image AUROC", f"{r['image_auroc']:.3f}"), ("pixel AUROC", _fmt(r["pixel_auroc"])),
        ("AUPRO (30% FPR)", _fmt(r["aupro"])),
        ("automatic threshold", f"{r['threshold']:.4f} ({r.get('threshold_source', 'holdout')})"),
        ("verdict accuracy", f"{r['accuracy']:.3f}"), ("balanced accuracy", f"{r['balanced_accuracy']:.3f}"),
        ("oracle balanced accuracy", f"{r['oracle_balanced_accuracy']:.3f}"),
        ("F1", f"{r['f1']:.3f}"), ("false-reject rate", f"{r['false_reject_rate']:.3f}"),
        ("miss rate", f"{r['miss_rate']:.3f}"),
        ("mean p-value good / defective", " / ".join(f"{v:.3f}" if v is not None else "n/a" for v in
                                                       (r["p_value"]["mean_good"], r["p_value"]["mean_defective"]))
         if r.get("p_value") else "n/a"),
        ("frames/s (scoring)", f"{r['frames_per_second']:.1f}"), ("enrollment", f"{r['enroll_seconds']:.1f} s"),
    ]
    if r.get("bank_patches") is not None:
        rows.append(("bank patches", str(r["bank_patches"])))
    training = None
    if r.get("student"):
        st = r["student"]
        rows.append(("student", f"{st['steps']} steps, {st['train_seconds']:.0f} s, trained on {st['trained_on']}, "
                                f"{st['held_out']} held out"))
        if r.get("student_training"):
            training = StudentTraining.from_dict(r["student_training"])
            rows.append(("student training", f"{training.status}: {training.describe()}"))
    undertrained = training is not None and not training.complete
    lines = [f"# {Path(r['dataset']).name}: {r['shots']} shots, seed {r['seed']}, pack {r['pack']}, "
             f"scorer {r.get('scorer', 'bank')}{f' ({training.status})' if undertrained else ''}", ""]
    if undertrained:
        lines += [f"**Undertrained student**: {training.describe()}. These figures are of an undertrained "
                  "student, not of the learned scorer; stations do not pick it (scorer auto).", ""]
    lines += [f"{r['n_test']} test images ({r['n_anomalous']} defective)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "Detection rate per kind at the automatic threshold (good = false-reject rate):", ""]
    lines += [f"- {k}: {v:.3f}" for k, v in r["per_kind_detection"].items()]
    if r.get("report"):
        lines += ["", "![ROC](roc.png)", ""] + [f"![{o}]({o})" for o in r["report"]["overlays"]]
    if r["skipped"]:
        lines += ["", f"Skipped {len(r['skipped'])} unreadable files:"] + [f"- {s}" for s in r["skipped"]]
    return "\n".join(lines) + "\n"


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float))
