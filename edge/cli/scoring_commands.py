"""`anomaly-edge score`, `eval` and `demo`: score files against an enrolled station, evaluate on a
labelled dataset, run the synthetic line end to end."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from edge.cli.options import (add_aspect_option, add_foreground_option, add_student_options, add_tiling_args, positive,
                              shots, student_trainer, tiling_from_options)


def cmd_score(args) -> int:
    import cv2

    from edge.scoring import visual
    from edge.errors import ImageError
    from edge.pack import load_pack
    from edge.inference.preprocess import list_images, read_image
    from edge.station.state import load_state
    from edge.scoring.factory import build_scorer

    pack = load_pack(args.pack)
    state = load_state(args.state, pack)
    scorer = build_scorer(pack, state, state.tiling_spec, kind=args.scorer,
                          allow_undertrained=args.allow_undertrained)
    paths = []
    for p in args.images:
        p = Path(p)
        paths += list_images(p) if p.is_dir() else [p]
    if args.overlays:
        Path(args.overlays).mkdir(parents=True, exist_ok=True)
    failed = 0
    written: set[str] = set()
    for path in paths:
        try:
            img = read_image(path)
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        r = scorer.score_one(img)
        row = {"image": str(path), **r.summary()}
        print(json.dumps(row) if args.json else
              f"{path.name}  score {r.score:.4f}  threshold {r.threshold:.4f}  {r.verdict.upper():9s}  "
              f"regions {len(r.regions)}  {r.latency_ms:.1f} ms")
        if args.overlays:
            # Same stem from two folders (a/x.png, b/x.jpg) must not overwrite each other.
            name = f"{path.stem}_overlay.png"
            if name in written:
                name = f"{path.stem}_{len(written)}_overlay.png"
            written.add(name)
            cv2.imwrite(str(Path(args.overlays) / name), visual.result_overlay(img, r))
    return 1 if failed else 0


def cmd_eval(args) -> int:
    from edge.evaluation.evaluate import evaluate, summary_markdown, write_json
    from edge.pack import load_pack

    pack = load_pack(args.pack)
    report = args.report or (str(Path(args.json).with_suffix("")) + "-report" if args.json else None)
    result = evaluate(pack, args.data, args.shots, seed=args.seed, report_dir=report, quiet=args.quiet,
                      foreground=args.foreground, aspect=args.aspect,
                      log=lambda m: print(m, file=sys.stderr), tiling=tiling_from_options(args),
                      train_student=student_trainer(args, pack), learn_parts=args.learn,
                      learn_defect_rate=args.learn_defect_rate)
    if args.json:
        write_json(result, args.json)
    print(summary_markdown(result))
    where = [f"metrics {args.json}"] if args.json else []
    if result.get("report"):
        where.append(f"report {result['report']['dir']} (summary.md, roc.png, overlays)")
    if where:
        print("written: " + "; ".join(where), file=sys.stderr)
    training = result.get("student_training")
    if training and training["status"] != "complete":
        from edge.scoring.student import StudentTraining

        t = StudentTraining.from_dict(training)
        print(f"warning: student {t.status}: {t.describe()}; these figures are of an undertrained student, not of "
              f"the learned scorer: {_eval_resume_hint(t)}", file=sys.stderr)
    return 0


def _eval_resume_hint(t) -> str:
    if t.checkpoint:
        return f"run the same eval again (--checkpoint {t.checkpoint}) to resume where it stopped"
    return "run it again with --checkpoint FILE and a larger --time-budget (each run resumes from FILE)"


def cmd_demo(args) -> int:
    from edge.evaluation.demo import run_demo

    return run_demo(args.pack, args.out, parts=args.parts, shots=args.shots, seed=args.seed)



def add_parsers(sub) -> None:
    s = sub.add_parser("score", help="score image files or folders against an enrolled station")
    s.add_argument("--pack", required=True)
    s.add_argument("--state", required=True)
    s.add_argument("images", nargs="+", help="image files or folders")
    s.add_argument("--overlays", help="write heatmap overlays to this folder")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.add_argument("--scorer", choices=["auto", "bank", "student"], default="auto",
                   help="auto: the measured default (docs/evaluation.md, now the bank)")
    s.add_argument("--allow-undertrained", action="store_true",
                   help="score with a student whose training did not complete (stopped by the time budget)")
    s.set_defaults(func=cmd_score)

    v = sub.add_parser("eval", help="evaluate on an MVTec- or VisA-layout folder")
    v.add_argument("--pack", required=True)
    v.add_argument("--data", required=True, help="MVTec category folder (train/good, test/, ground_truth/) or "
                                                  "VisA class folder (its parent holds split_csv/1cls.csv)")
    v.add_argument("--shots", type=shots, default=None, help="K good references, or 'all' (default)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--learn", type=positive, metavar="N", help="evaluate learn mode: enroll from an unlabeled "
                   "stream of N parts (good train images with --learn-defect-rate defective test images mixed in); with "
                   "--shots K, the station is first enrolled from K good train images and the stream refines it")
    v.add_argument("--learn-defect-rate", type=float, default=0.1, metavar="RATE")
    v.add_argument("--json", help="write metrics here")
    v.add_argument("--report", help="folder for the ROC plot, overlays and summary.md (default: next to --json)")
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    add_foreground_option(v, default="auto")
    add_aspect_option(v, default="auto")
    add_student_options(v)
    add_tiling_args(v)
    v.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="the synthetic line end to end: enroll, score a stream, overlays, summary")
    d.add_argument("--pack", default="packs/default")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--parts", type=positive, default=60)
    d.add_argument("--shots", type=positive, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
