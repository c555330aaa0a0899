"""`anomaly-edge enroll` and `learn`: build a station's state (bank, threshold, references) from good
images or from unlabeled production parts."""
from __future__ import annotations

import sys

from edge.cli.options import (add_aspect_option, add_foreground_option, add_student_options, add_tiling_args,
                              positive, positive_float, shots, student_trainer, tiling_from_options)
from edge.errors import EdgeError


def cmd_enroll(args) -> int:
    from edge.pack import load_pack
    from edge.inference.preprocess import list_images

    pack = load_pack(args.pack)
    if args.synthetic:
        import tempfile

        from edge.line.synthetic import write_good_parts

        with tempfile.TemporaryDirectory(prefix="synthetic-good.") as tmp:
            good = write_good_parts(tmp, args.synthetic, seed=args.seed)
            return _enroll(pack, good, args)
    good = list_images(args.good)
    if not good:
        raise EdgeError(f"{args.good}: no images found (png, jpg, bmp, tif)")
    return _enroll(pack, good, args)


def _enroll(pack, good, args) -> int:
    from edge.station.enrollment import enroll

    state = enroll(pack, good, args.out, shots=args.shots, seed=args.seed, quiet=args.quiet,
                   log=lambda m: print(m, file=sys.stderr), tiling=tiling_from_options(args),
                   train_student=student_trainer(args, pack), target_false_reject=args.target_false_reject,
                   foreground=args.foreground, aspect=args.aspect)
    c = state.calibration
    print(f"enrolled {len(state.references)} good images into {args.out}: bank {len(state.bank)} patches, "
          f"threshold {c.threshold:.4f} ({c.method}, {c.n_scores} held-out scores, median {c.median:.4f})")
    for key, label in (("input", "frames"), ("foreground", "background masking")):
        if state.info.get(key):  # the two choices enrollment made from the references, with their reasons
            print(f"{label}: {state.info[key]}")
    if state.student is not None and args.scorer == "student":
        st, c = state.student, state.student.calibration
        print(f"student {st.file}: {st.training.status}, {st.training.describe()}, {st.info['train_seconds']:.0f} s; "
              f"threshold {c.threshold:.4f} ({c.n_scores} held-out scores, median {c.median:.4f})")
        if not st.training.complete:
            print(f"warning: student {st.training.status}: {st.training.describe()}; the bank stays the active "
                  f"scorer (scorer auto), and scorer student is refused without student_allow_undertrained / "
                  f"--allow-undertrained; {st.training.resume_hint(args.out)}", file=sys.stderr)
    if len(state.references) < 4:
        print(f"warning: {len(state.references)} reference(s) show little of how good parts vary; the automatic "
              "threshold may reject good parts (one magnetic tile: 0-91% of good tiles, 19% on average over six "
              "tiles): enroll more good images when you have them, or let the line sharpen this state (learn: "
              "{parts: 50, refine: true} in the station config: its next 50 parts are scored as usual, then the "
              "usual-looking ones join the references), or start in learn mode (learn: {parts: 50} and no state "
              "folder)", file=sys.stderr)
    return 0


def cmd_learn(args) -> int:
    from edge.station.learn import learn, refine
    from edge.pack import load_pack
    from edge.inference.preprocess import list_images

    pack = load_pack(args.pack)
    parts = list_images(args.parts)
    if not parts:
        raise EdgeError(f"{args.parts}: no images found (png, jpg, bmp, tif)")
    how = refine if args.refine else learn
    result = how(pack, parts, args.out, seed=args.seed, z=args.z, quiet=args.quiet,
                 log=lambda m: print(m, file=sys.stderr))
    c = result.state.calibration
    screened = (f"kept {len(result.kept)}, set aside {len(result.suspects)} as suspect (mutual score above "
                f"{result.cutoff:.4f})")
    if args.refine:
        before = result.state.info["refined"]
        print(f"refined {args.out} with {len(parts)} unlabeled parts: {screened}; references "
              f"{before['references_before']} -> {len(result.state.references)}, threshold "
              f"{before['threshold_before']:.4f} -> {c.threshold:.4f}")
    else:
        print(f"learned from {len(parts)} unlabeled parts into {args.out}: {screened}; threshold {c.threshold:.4f}")
    for p in result.suspects:
        print(f"  suspect {p.name}  mutual score {result.scores[p.name]:.4f}")
    return 0


def add_parsers(sub) -> None:
    n = sub.add_parser("enroll", help="build or extend a station's memory bank and threshold from good images")
    n.add_argument("--pack", required=True)
    src = n.add_mutually_exclusive_group(required=True)
    src.add_argument("--good", help="folder of good reference images")
    src.add_argument("--synthetic", type=positive, metavar="N",
                     help="enroll N good parts of the synthetic line (seeded by --seed) instead")
    n.add_argument("--shots", type=shots, default=None, help="use K images from the folder (default all)")
    n.add_argument("--out", required=True, help="station state folder (created or extended)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--quiet", action="store_true", help="no progress bars")
    n.add_argument("--target-false-reject", type=float, default=None, metavar="RATE",
                   help="false-reject rate the automatic threshold aims at, in (0, 0.5) (default: the state's, else 0.05)")
    add_foreground_option(n, default=None)
    add_aspect_option(n, default=None)
    add_student_options(n)
    add_tiling_args(n)
    n.set_defaults(func=cmd_enroll)

    lm = sub.add_parser("learn", help="enroll a new station from unlabeled production parts, most of them good "
                                      "(suspects are set aside and listed)")
    lm.add_argument("--pack", required=True)
    lm.add_argument("--parts", required=True, help="folder of unlabeled part images (e.g. the first N off the line)")
    lm.add_argument("--out", required=True, help="new state folder (with --refine: the state to refine)")
    lm.add_argument("--refine", action="store_true",
                    help="add the parts that look usual to the references of the existing state in --out "
                         "(enrolled from a few good parts) and recalibrate it")
    lm.add_argument("--z", type=positive_float, default=3.0, help="robust z-score above which a part is suspect")
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--quiet", action="store_true")
    lm.set_defaults(func=cmd_learn)
