"""What every pack exporter does: numbered progress lines, ONNX export and its check against PyTorch,
and publishing the finished pack folder in one rename."""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.pack import PackManifest, load_pack, write_manifest

OPSET = 17


class ExportError(EdgeError):
    pass


def step(i: int, n: int, text: str) -> float:
    print(f"[{i}/{n}] {text}", file=sys.stderr, flush=True)
    return time.perf_counter()


def note(text: str) -> None:
    print(f"      {text}", file=sys.stderr, flush=True)


def export_onnx(model, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                dynamic_size: bool = False) -> None:
    """TorchScript ONNX export (opset 17), batch dimension of every input and output dynamic; with
    `dynamic_size` also the height and width of every (N x C x H x W) input and output."""
    import torch

    spatial = {2: "height", 3: "width"} if dynamic_size else {}
    dynamic = {name: {0: "batch", **spatial} for name in [*input_names, *output_names]}
    with warnings.catch_warnings():
        # Tracer notes about constant-folded shapes: expected, the spatial size is fixed per pack.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def onnx_max_abs_error(model, path: Path, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, float]:
    """Per output, the max abs difference between ONNX Runtime and the PyTorch forward on `feeds`."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(output_names, feeds)
    with torch.no_grad():
        want = model(*(torch.from_numpy(v) for v in feeds.values()))
    want = want if isinstance(want, (tuple, list)) else (want,)
    errors = {}
    for name, g, w in zip(output_names, got, want):
        w = w.numpy()
        if g.shape != w.shape:
            raise ExportError(f"{path}: ONNX output '{name}' has shape {g.shape}, PyTorch {w.shape}")
        errors[name] = float(np.abs(g - w).max())
    return errors


def check_encoder_onnx(model, path: Path, size: int | tuple[int, int], span: float, n_noise: int, seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime and the PyTorch forward of an image encoder, on `n_noise`
    images of uniform noise over +-`span` (the normalised input range) and one blurred, image-like texture;
    `size`: the side of a square input, or (height, width)."""
    import cv2

    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    noise = rng.uniform(-span, span, (n_noise, 3, h, w)).astype(np.float32)
    texture = cv2.GaussianBlur(rng.uniform(-span, span, (h, w, 3)).astype(np.float32), (0, 0), 3) * 4
    batch = np.concatenate([noise, np.clip(texture, -span, span).transpose(2, 0, 1)[None]])
    return onnx_max_abs_error(model, path, {"image": batch}, ["features"])["features"]


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not force and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty (pass --force to replace it)")


def build_pack(out: Path, build: Callable[[Path], PackManifest]) -> PackManifest:
    """Run `build(tmp)` in a fresh folder beside `out` (it writes the files and returns the manifest),
    write pack.yaml, check that the runtime loads the result, then swap it in: a crash leaves either
    the old pack or the new one in place, never half of one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = build(tmp)
        write_manifest(tmp, manifest)
        load_pack(tmp)  # the runtime must accept what we wrote
        tmp.chmod(0o755)
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
    return manifest
