"""`anomaly-edge export default`: the default pack from ImageNet EfficientNet-Lite0.

Encoder = blocks 4 (stride 8, 40 ch), 10 (stride 16, 112 ch) and 14 (stride 32, 192 ch), each
3x3-averaged, the coarser ones resized to the stride-8 grid, concatenated (344 ch). The stride-32 tap
adds context for large, low-contrast defects (docs/evaluation.md, "What moved the numbers"). The ONNX
graph is checked against the PyTorch forward before the pack is written; the pack folder appears only
when everything succeeded.
"""
from __future__ import annotations

import datetime as dt
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.pack import (SCHEMA_VERSION, EncoderSpec, FeatureLayer, FileEntry, InputSpec, LlmSpec, Normalization,
                       PackManifest, ScorerSpec, load_pack, sha256_file, write_manifest)

from . import assets

TAPS = (4, 10, 14)
N_BLOCKS = 16  # MBConv blocks in EfficientNet-Lite0
MAX_ABS_ERROR = 1e-4
LLM_CONTEXT = 2048


class ExportError(EdgeError):
    pass


def _step(i: int, n: int, text: str) -> float:
    print(f"[{i}/{n}] {text}", file=sys.stderr, flush=True)
    return time.perf_counter()


def build_encoder(weights: Path, taps=TAPS):
    import torch

    from .efficientnet_lite import EfficientNetLite0, PatchFeatureEncoder

    backbone = EfficientNetLite0()
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state, strict=True)
    except Exception as e:
        raise ExportError(f"{weights}: not an EfficientNet-Lite0 state_dict: {e}") from None
    return PatchFeatureEncoder(backbone.eval(), list(taps)).eval(), backbone.block_strides()


def export_onnx(model, path: Path, size: int) -> None:
    import torch

    dummy = torch.zeros(2, 3, size, size)
    # The TorchScript exporter: no extra dependency, and this graph (convs, pads, pools, resize)
    # is well inside what it handles.
    with warnings.catch_warnings():
        # Tracer notes about constant-folded shapes: expected, the spatial size is fixed per pack.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=["features"],
                          dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}}, opset_version=17,
                          dynamo=False)


def check_onnx(model, path: Path, size: int, seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime and the PyTorch forward on varied inputs."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    # Uniform noise over the whole normalized range, and a blurred (image-like) texture.
    import cv2

    noise = rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    texture = cv2.GaussianBlur(rng.uniform(-1, 1, (size, size, 3)).astype(np.float32), (0, 0), 3) * 4
    batch = np.concatenate([noise, np.clip(texture, -1, 1).transpose(2, 0, 1)[None]])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["features"], {"image": batch})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(batch)).numpy()
    if got.shape != want.shape:
        raise ExportError(f"{path}: ONNX output shape {got.shape} != PyTorch {want.shape}")
    return float(np.abs(got - want).max())


def fetch_llm(log) -> Path:
    """The pinned explanation GGUF, or an ExportError that says how to export without it."""
    try:
        return assets.fetch(assets.SMOLLM2_135M, log=log)
    except assets.AssetError as e:
        raise ExportError(f"could not fetch the explanation model {assets.SMOLLM2_135M.requirement}: {e}\n"
                          "export without it with --no-llm (the pack then scores but does not explain)") from None


def export_default(out: str | Path, size: int = 224, weights: str | Path | None = None, force: bool = False,
                   taps: tuple[int, ...] = TAPS, llm: bool = True) -> Path:
    out = Path(out)
    if out.exists() and not force and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty (pass --force to replace it)")
    if size < 32 or size % 32:
        raise ExportError(f"--size {size}: must be a multiple of 32 (the network's total stride)")
    if not taps or any(not 0 <= t < N_BLOCKS for t in taps) or list(taps) != sorted(set(taps)):
        raise ExportError(f"--taps must be increasing block indices in 0..{N_BLOCKS - 1}, got {taps}")
    n = 6 if llm else 5
    t = _step(1, n, "fetching EfficientNet-Lite0 ImageNet weights (pinned sha256)")
    if weights is None:
        weights_path = assets.fetch(assets.EFFICIENTNET_LITE0, log=lambda m: print("      " + m, file=sys.stderr))
    else:
        weights_path = assets.verify_file(Path(weights), assets.EFFICIENTNET_LITE0.member_sha256)
    t = _step(2, n, f"building the patch-feature encoder (taps {taps})")
    model, strides = build_encoder(weights_path, taps)
    layers = [FeatureLayer(name=f"blocks.{i}", stride=strides[i], channels=model.backbone._blocks[i]._bn2.num_features)
              for i in taps]
    stride = min(layer.stride for layer in layers)
    channels = sum(layer.channels for layer in layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t = _step(3, n, f"exporting ONNX ({size}x{size}, dynamic batch)")
        onnx_path = tmp / "encoder.onnx"
        export_onnx(model, onnx_path, size)
        print(f"      {onnx_path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        t = _step(4, n, "checking ONNX Runtime against the PyTorch forward")
        err = check_onnx(model, onnx_path, size)
        print(f"      max abs error {err:.2e} (limit {MAX_ABS_ERROR:.0e})", file=sys.stderr)
        if not err <= MAX_ABS_ERROR:
            raise ExportError(f"ONNX export differs from PyTorch by {err:.2e} > {MAX_ABS_ERROR:.0e}")
        files = {"encoder": FileEntry(path="encoder.onnx", sha256=sha256_file(onnx_path))}
        llm_spec, llm_provenance = None, {}
        if llm:
            _step(5, n, "fetching the explanation LLM, SmolLM2-135M-Instruct GGUF (pinned sha256)")
            gguf = fetch_llm(lambda m: print("      " + m, file=sys.stderr))
            shutil.copyfile(gguf, tmp / "llm.gguf")
            files["llm"] = FileEntry(path="llm.gguf", sha256=assets.SMOLLM2_135M.member_sha256)
            llm_spec = LlmSpec(kind="chat", file="llm", context_length=LLM_CONTEXT)
            llm_provenance = {"llm": assets.SMOLLM2_135M.requirement, "llm_sha256": assets.SMOLLM2_135M.member_sha256,
                              "llm_license": "Apache-2.0 (SmolLM2-135M-Instruct)"}
        _step(n, n, f"writing the pack to {out}")
        for extra in tmp.glob("*.data"):
            extra.unlink()
        manifest = PackManifest(
            schema_version=SCHEMA_VERSION,
            model_id=f"efficientnet-lite0-bank-{size}" + ("" if taps == TAPS else "-b" + "-".join(map(str, taps))),
            description=f"ImageNet EfficientNet-Lite0 patch features (blocks {'+'.join(map(str, taps))}, 3x3 aggregated) "
                        "with a memory-bank nearest-neighbour scorer",
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            input=InputSpec(height=size, width=size, colour="rgb", channels=3,
                            normalization=Normalization(mean=[127.0] * 3, std=[128.0] * 3)),
            files=files,
            encoder=EncoderSpec(file="encoder", output="features", feature_shape=(channels, size // stride, size // stride),
                                stride=stride, layers=layers, aggregation="avg3x3"),
            scorer=ScorerSpec(),
            llm=llm_spec,
            provenance={
                "weights": assets.EFFICIENTNET_LITE0.requirement,
                "weights_sha256": assets.EFFICIENTNET_LITE0.member_sha256,
                "weights_license": "Apache-2.0 (TensorFlow EfficientNet-Lite checkpoints)",
                "export_max_abs_error": err,
                "exporter": "anomaly-edge export default",
                **llm_provenance,
            },
        )
        write_manifest(tmp, manifest)
        load_pack(tmp)  # the runtime must accept what we wrote
        tmp.chmod(0o755)
        # Swap in the new pack so that a crash leaves either the old one or the new one in place.
        backup = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(backup, ignore_errors=True)
            out.rename(backup)
        tmp.rename(out)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"pack {manifest.model_id} written to {out}", file=sys.stderr)
    return out
