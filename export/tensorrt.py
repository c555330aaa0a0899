"""TensorRT engine from a pack's ONNX file: the `tensorrt` Python API when importable, else `trtexec`.

An engine is tied to the GPU model and TensorRT version it was built with, so it is built on (or for)
the target machine and recorded in the pack next to the ONNX file it came from. Where neither
TensorRT nor trtexec exists the step is skipped and the reason is returned; nothing is faked.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .common import ExportError


def _shapes(inputs: dict[str, tuple[int, ...]], batch: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, (batch, *dims)))}" for name, dims in inputs.items())


def _build_python(trt, onnx_path: Path, engine_path: Path, inputs: dict, batch: tuple[int, int, int], fp16: bool) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt, "NetworkDefinitionCreationFlag") and int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, dims in inputs.items():
        profile.set_shape(name, (batch[0], *dims), (batch[1], *dims), (batch[2], *dims))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))


def build_engine(onnx_path: Path, engine_path: Path, inputs: dict[str, tuple[int, ...]],
                 batch: tuple[int, int, int] = (1, 1, 8), fp16: bool = True) -> dict:
    """Build `engine_path` from `onnx_path` for the given per-sample input shapes and (min, opt, max)
    batch. Returns what to record in pack.yaml: how it was built, or `skipped` with the reason."""
    precision = "fp16" if fp16 else "fp32"
    try:
        import tensorrt as trt
    except ImportError as e:
        trt, why = None, f"the tensorrt Python package is not installed ({e})"
    if trt is not None:
        _build_python(trt, onnx_path, engine_path, inputs, batch, fp16)
        return {"built_with": f"tensorrt {trt.__version__} (Python API)", "precision": precision,
                "batch": list(batch), "onnx": onnx_path.name}
    trtexec = shutil.which("trtexec")
    if trtexec is None:
        return {"skipped": f"{why}, and trtexec is not on PATH: build it on the target GPU machine"}
    cmd = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}", f"--minShapes={_shapes(inputs, batch[0])}",
           f"--optShapes={_shapes(inputs, batch[1])}", f"--maxShapes={_shapes(inputs, batch[2])}"]
    if fp16:
        cmd.append("--fp16")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not engine_path.is_file():
        raise ExportError(f"trtexec failed (exit {proc.returncode}) building {engine_path.name}:\n{proc.stdout[-2000:]}"
                          f"{proc.stderr[-2000:]}")
    return {"built_with": f"trtexec ({trtexec})", "precision": precision, "batch": list(batch), "onnx": onnx_path.name}


def add_engine(pack_dir, batch: tuple[int, int, int] = (1, 1, 8), fp16: bool = True) -> dict:
    """Build a TensorRT engine of the pack's encoder on this machine and record it in pack.yaml
    (files.<encoder>_engine, provenance.tensorrt). Raises ExportError with the reason where TensorRT
    or trtexec is missing; the pack is then left as it was."""
    from edge.pack import FileEntry, load_pack, sha256_file, write_manifest

    pack = load_pack(pack_dir)
    spec = pack.input
    engine = pack.root / f"{Path(pack.manifest.files[pack.encoder.file].path).stem}.plan"
    tmp = engine.with_suffix(".plan.tmp")
    built = build_engine(pack.file(pack.encoder.file), tmp, {spec.name: (spec.channels, spec.height, spec.width)},
                         batch, fp16)
    if "skipped" in built:
        raise ExportError(f"{pack.root}: no TensorRT engine built: {built['skipped']}")
    tmp.replace(engine)
    key = f"{pack.encoder.file}_engine"
    files = {**pack.manifest.files, key: FileEntry(path=engine.name, sha256=sha256_file(engine))}
    provenance = {**pack.manifest.provenance, "tensorrt": built}
    write_manifest(pack.root, pack.manifest.model_copy(update={"files": files, "provenance": provenance}))
    return {**built, "file": engine.name}
