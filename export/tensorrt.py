"""TensorRT engine from a pack's ONNX file: the `tensorrt` Python API when importable, else `trtexec`,
TensorRT 10 or 11 (FP16 by BuilderFlag.FP16 / --fp16 on 10; on 11, whose networks are strongly typed,
by building from the graph converted to float16), the builder's workspace limited by `workspace_mb`.
Imports neither torch nor anything that does: it runs on the target machine.

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


def tensorrt_major(version: str) -> int:
    """10 for "10.13.3.9", 11 for "11.4.1"; ExportError for a version this module does not know."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise ExportError(f"TensorRT version {version!r}: not a version number") from None
    if major not in SUPPORTED_MAJORS:
        raise ExportError(f"TensorRT {version}: supported are {', '.join(map(str, SUPPORTED_MAJORS))}.x")
    return major


SUPPORTED_MAJORS = (10, 11)


def _parse_onnx(trt, builder, logger, onnx_path: Path, strongly_typed: bool):
    flags = 0
    if strongly_typed:
        # Required on 10.x for an explicitly typed build; accepted (and always on) on 11.x.
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    return network, parser


def _build_python(trt, onnx_path: Path, engine_path: Path, inputs: dict, batch: tuple[int, int, int], fp16: bool,
                  workspace_mb: int) -> dict:
    """Build with the Python API. TensorRT 10: the ONNX as it is, FP16 by BuilderFlag.FP16. TensorRT
    11 (no weak typing, no BuilderFlag.FP16): a strongly typed network, FP16 by building from the graph
    converted to float16 (export.fp16, float32 I/O kept). Returns what the build did."""
    major = tensorrt_major(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    source = onnx_path
    if major >= 11:
        if fp16:
            from .fp16 import write_float16

            source = write_float16(onnx_path, engine_path.with_name(engine_path.name + ".fp16.onnx"))
        network, _parser = _parse_onnx(trt, builder, logger, source, strongly_typed=True)
    else:
        network, _parser = _parse_onnx(trt, builder, logger, source, strongly_typed=False)
    config = builder.create_builder_config()
    if major == 10 and fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile = builder.create_optimization_profile()
    for name, dims in inputs.items():
        profile.set_shape(name, (batch[0], *dims), (batch[1], *dims), (batch[2], *dims))
    if config.add_optimization_profile(profile) < 0:
        raise ExportError(f"{onnx_path}: TensorRT refused the optimization profile {inputs} for batch {batch}")
    serialized = builder.build_serialized_network(network, config)
    if source != onnx_path:
        source.unlink(missing_ok=True)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    return {"typing": "strong" if major >= 11 else "weak", "workspace_mb": int(workspace_mb)}


def trtexec_major(trtexec: str) -> int:
    """The TensorRT major version of a trtexec binary, from the "[TensorRT v110000]" its help prints."""
    import re

    proc = subprocess.run([trtexec, "--help"], capture_output=True, text=True)
    found = re.search(r"TensorRT v(\d+)", proc.stdout + proc.stderr)
    if found is None:
        raise ExportError(f"{trtexec}: could not tell its TensorRT version from --help")
    return tensorrt_major(str(int(found.group(1)) // 10000))


def build_engine(onnx_path: Path, engine_path: Path, inputs: dict[str, tuple[int, ...]],
                 batch: tuple[int, int, int] = (1, 1, 8), fp16: bool = True, workspace_mb: int = 1024) -> dict:
    """Build `engine_path` from `onnx_path` for the given per-sample input shapes and (min, opt, max)
    batch, the builder limited to `workspace_mb` of workspace. Returns what to record in pack.yaml: how
    it was built, or `skipped` with the reason."""
    precision = "fp16" if fp16 else "fp32"
    if workspace_mb < 1:
        raise ExportError(f"workspace_mb {workspace_mb}: the builder needs at least 1 MiB of workspace")
    try:
        import tensorrt as trt
    except ImportError as e:
        trt, why = None, f"the tensorrt Python package is not installed ({e})"
    if trt is not None:
        how = _build_python(trt, onnx_path, engine_path, inputs, batch, fp16, workspace_mb)
        return {"built_with": f"tensorrt {trt.__version__} (Python API)", "precision": precision,
                "batch": list(batch), "onnx": onnx_path.name, **how}
    trtexec = shutil.which("trtexec")
    if trtexec is None:
        return {"skipped": f"{why}, and trtexec is not on PATH: build it on the target GPU machine"}
    major = trtexec_major(trtexec)
    source = onnx_path
    if major >= 11 and fp16:  # --fp16 is gone with weak typing: the graph itself is float16
        from .fp16 import write_float16

        source = write_float16(onnx_path, engine_path.with_name(engine_path.name + ".fp16.onnx"))
    cmd = [trtexec, f"--onnx={source}", f"--saveEngine={engine_path}", f"--minShapes={_shapes(inputs, batch[0])}",
           f"--optShapes={_shapes(inputs, batch[1])}", f"--maxShapes={_shapes(inputs, batch[2])}",
           f"--memPoolSize=workspace:{int(workspace_mb)}M"]
    if major == 10 and fp16:
        cmd.append("--fp16")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if source != onnx_path:
        source.unlink(missing_ok=True)
    if proc.returncode != 0 or not engine_path.is_file():
        raise ExportError(f"trtexec failed (exit {proc.returncode}) building {engine_path.name}:\n{proc.stdout[-2000:]}"
                          f"{proc.stderr[-2000:]}")
    return {"built_with": f"trtexec ({trtexec}, TensorRT {major})", "precision": precision, "batch": list(batch),
            "onnx": onnx_path.name, "typing": "strong" if major >= 11 else "weak", "workspace_mb": int(workspace_mb)}


def add_engine(pack_dir, batch: tuple[int, int, int] = (1, 1, 8), fp16: bool = True, workspace_mb: int = 1024) -> dict:
    """Build a TensorRT engine of the pack's encoder on this machine and record it in pack.yaml
    (files.<encoder>_engine, provenance.tensorrt). Raises ExportError with the reason where TensorRT
    or trtexec is missing; the pack is then left as it was."""
    from edge.pack import FileEntry, load_pack, sha256_file, write_manifest

    pack = load_pack(pack_dir)
    spec = pack.input
    engine = pack.root / f"{Path(pack.manifest.files[pack.encoder.file].path).stem}.plan"
    tmp = engine.with_suffix(".plan.tmp")
    built = build_engine(pack.file(pack.encoder.file), tmp, {spec.name: (spec.channels, spec.height, spec.width)},
                         batch, fp16, workspace_mb)
    if "skipped" in built:
        raise ExportError(f"{pack.root}: no TensorRT engine built: {built['skipped']}")
    tmp.replace(engine)
    key = f"{pack.encoder.file}_engine"
    files = {**pack.manifest.files, key: FileEntry(path=engine.name, sha256=sha256_file(engine))}
    provenance = {**pack.manifest.provenance, "tensorrt": built}
    write_manifest(pack.root, pack.manifest.model_copy(update={"files": files, "provenance": provenance}))
    return {**built, "file": engine.name}
