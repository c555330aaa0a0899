"""Argument types and option groups several subcommands share: positive numbers, --shots, the
student-training options (torch imported only when --scorer student asks for it) and the tiling options."""
from __future__ import annotations

import argparse
import sys

from edge.errors import EdgeError


def positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def shots(value: str) -> int | None:
    if value == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shots must be a positive integer or 'all', got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"--shots must be >= 1, got {k}")
    return k



def student_trainer(args, pack):
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


def add_foreground_option(p, default) -> None:
    p.add_argument("--foreground", choices=["auto", "on", "off"], default=default,
                   help="few-shot head: score only the part's patches of parts on a plain background (auto: "
                        "where every reference is one" + (", the default" if default == "auto" else
                                                           "; default: what the state was enrolled with, else auto") + ")")


def add_aspect_option(p, default) -> None:
    p.add_argument("--aspect", choices=["auto", "keep", "squash"], default=default,
                   help="frames far from the pack's shape: keep their aspect ratio (the encoder fed the same area at "
                        "that shape) or squash them to the pack's size (auto: keep where the pack allows it and "
                        "the references share one shape " + ("; the default" if default == "auto" else
                                                              "; default: what the state was enrolled with, else auto") + ")")


def add_student_options(p) -> None:
    p.add_argument("--scorer", choices=["bank", "student"], default="bank",
                   help="bank: memory bank only; student: also train the learned scorer (needs torch)")
    t = p.add_argument_group("student training (--scorer student)")
    t.add_argument("--steps", type=positive, default=4000, help="training steps of 8 images (default 4000)")
    t.add_argument("--time-budget", type=positive_float, default=780,
                   help="stop training after this many seconds with the model so far (default 780)")
    t.add_argument("--checkpoint", help="checkpoint file: written while training, resumed from when it exists")
    t.add_argument("--device", default="auto", help="torch device: auto (a CUDA GPU when present), cpu, cuda")



TILING_OPTIONS = {"tiling.scale": "--tile-scale", "tiling.overlap": "--tile-overlap", "tiling.bank": "--tile-bank",
                  "tiling.bank_patches": "--tile-bank-patches", "tiling.roi": "--roi", "tiling.roi.kind": "--roi",
                  "tiling.roi.align": "--align"}


def tiling_from_options(args):
    """The TilingSpec enrollment uses: from --config's tiling/roi sections, or from --tile-scale."""
    if args.config:
        if args.tile_scale:
            raise EdgeError("give --config or --tile-scale, not both")
        from edge.line.config import load_config

        return load_config(args.config).tiling_spec()
    if args.tile_scale is None:
        return None
    from pydantic import ValidationError

    from edge.scoring.frozen_spec import problems
    from edge.scoring.tiling import TilingSpec

    try:
        return TilingSpec(scale=args.tile_scale, overlap=args.tile_overlap, bank=args.tile_bank,
                          bank_patches=args.tile_bank_patches, roi={"kind": args.roi, "align": args.align})
    except ValidationError as e:  # named as the option and as the key it sets (tiling.overlap for --tile-overlap)
        raise EdgeError(problems(e, "tiling", TILING_OPTIONS)) from None


def add_tiling_args(parser) -> None:
    t = parser.add_argument_group("tiling (high-resolution frames; a station's config can give it instead)")
    t.add_argument("--tile-scale", type=positive_float, metavar="S",
                   help="score the part tile by tile at S frame pixels per tile pixel")
    t.add_argument("--tile-overlap", type=float, default=0.25, help="fraction of a tile shared with its neighbour")
    t.add_argument("--tile-bank", choices=("shared", "per_tile"), default="shared")
    t.add_argument("--tile-bank-patches", type=positive, default=None, help="bank size cap (default: the pack's)")
    t.add_argument("--roi", choices=("full", "contour", "template"), default="full",
                   help="where the part is: the whole frame, or found per frame")
    t.add_argument("--align", choices=("none", "ecc"), default="none", help="align each part to the reference")
    t.add_argument("--config", help="take tiling and roi from this station configuration file")

