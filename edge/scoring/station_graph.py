"""One station graph: what a frame needs from pixels to anomaly map and image score, as one ONNX graph.

    frames (uint8, N x H x W x 3, already resized by OpenCV's INTER_AREA, which ONNX has no op for)
      -> colour order, (x - mean) / std, NCHW            (the pack's preprocessing)
      -> the pack's encoder                              (its nodes, inlined)
      -> patches (N*h*w) x C, PCA projection, nearest squared distance to the bank, sqrt
      -> R @ grid @ C^T per image                        (bilinear upsampling and the separable
                                                          Gaussian folded into two matrices)
      -> maps N x H x W, scores N (mean of the top fraction)

The bank is an input tensor (`bank` M x k, `bank_sq` M, `proj_mean` C, `proj_components` C x k), so
re-enrollment changes the inputs, not the graph (no engine rebuild on a GPU). The upsampling and blur
matrices are OpenCV's arithmetic (INTER_LINEAR with half-pixel centres and clamped edges; the Gaussian
kernel OpenCV picks for the sigma, BORDER_REFLECT_101), so the graph equals the NumPy path
(edge.scoring.scorer) to float32 rounding. Covers the memory-bank scorer without a few-shot head (l2 metric,
one bank group, linear upsampling); `supports` says why not otherwise.

`StationGraphScorer` runs it with ONNX Runtime and decides as `Scorer` does. The builder of the
`memory_bank` scorer kind registers here (edge.scoring.registry), as it chooses between the two forms.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np

from edge.scoring.bank import MemoryBank
from edge.scoring.decide import Result, decide
from edge.errors import EdgeError
from edge.pack import Pack
from edge.inference.preprocess import check_frame
from edge.scoring.registry import ScorerRequest, register_scorer
from edge.inference.features import FeatureExtractor
from edge.scoring.scorer import Scorer

INPUTS = ("frames", "bank", "bank_sq", "proj_mean", "proj_components")
OUTPUTS = ("maps", "scores")


def supports(pack: Pack, bank, head=None) -> str | None:
    """None when the station graph can score this pack and state, else why not."""
    s = pack.scorer
    if s.kind != "memory_bank" or s.metric != "l2" or s.bank_groups != 1 or s.upsample != "linear":
        return f"scorer {s.kind}, metric {s.metric}, {s.bank_groups} bank groups, {s.upsample} upsampling"
    if head is not None:
        return "the state scores with a few-shot head"
    if pack.native_size is not None:
        return "the station keeps its frames' aspect ratio (the encoder at another size than pack.yaml's)"
    if not isinstance(bank, MemoryBank):
        return f"bank {type(bank).__name__} is not a host memory bank"
    return None


def linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """n_out x n_in: OpenCV's INTER_LINEAR (half-pixel centres, edges clamped) as a matrix."""
    w = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for o in range(n_out):
        f = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(f), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w[o, i0] += 1 - (f - i0)
        w[o, i1] += f - i0
    return w


def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """n x n: OpenCV's GaussianBlur along one axis for ksize (0, 0) on float images (size
    round(8 sigma + 1) | 1, BORDER_REFLECT_101) as a matrix."""
    ksize = int(round(sigma * 8 + 1)) | 1
    r = ksize // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    k /= k.sum()
    m = np.zeros((n, n), np.float64)
    for o in range(n):
        for t, weight in zip(range(o - r, o + r + 1), k):
            if n > 1:
                period = 2 * n - 2
                t = abs(t) % period
                t = period - t if t >= n else t
            else:
                t = 0
            m[o, t] += weight
    return m


def map_matrices(grid: tuple[int, int], size: tuple[int, int], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows H x h, cols W x w) with map = rows @ patch_grid @ cols.T."""
    rows, cols = linear_matrix(grid[0], size[0]), linear_matrix(grid[1], size[1])
    if sigma > 0:
        rows, cols = gaussian_matrix(size[0], sigma) @ rows, gaussian_matrix(size[1], sigma) @ cols
    return rows.astype(np.float32), cols.astype(np.float32)


def build_station_graph(pack: Pack):
    """The station graph of `pack` (an onnx ModelProto); needs the onnx package."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec, enc = pack.input, pack.encoder
    encoder = onnx.load(str(pack.file(enc.file)))
    prefix = "enc/"
    image_in = spec.name
    renamed = {}

    def rn(name: str) -> str:
        if not name:
            return name
        if name == image_in:
            return "image"
        return renamed.setdefault(name, prefix + name)

    nodes, inits = [], []
    const = lambda name, array: inits.append(numpy_helper.from_array(np.asarray(array), name)) or name  # noqa: E731
    # Preprocessing: uint8 NHWC (BGR, or grey repeated) -> float32 NCHW in the pack's order, normalized.
    order = [2, 1, 0] if spec.colour == "rgb" else [0, 1, 2]
    mean = np.broadcast_to(np.asarray(spec.normalization.mean, np.float32), (spec.channels,))
    std = np.broadcast_to(np.asarray(spec.normalization.std, np.float32), (spec.channels,))
    nodes += [
        helper.make_node("Cast", ["frames"], ["pix"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["pix", const("colour_order", np.array(order[:spec.channels], np.int64))],
                         ["pix_ordered"], axis=3),
        helper.make_node("Sub", ["pix_ordered", const("norm_mean", mean.copy())], ["pix_centred"]),
        helper.make_node("Div", ["pix_centred", const("norm_std", std.copy())], ["pix_normed"]),
        helper.make_node("Transpose", ["pix_normed"], ["image"], perm=[0, 3, 1, 2]),
    ]
    # The encoder, inlined.
    for init in encoder.graph.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        t.name = rn(init.name)
        inits.append(t)
    for node in encoder.graph.node:
        n = onnx.NodeProto()
        n.CopyFrom(node)
        n.name = prefix + node.name
        n.input[:] = [rn(i) for i in node.input]
        n.output[:] = [rn(o) for o in node.output]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise EdgeError(f"{pack.file(enc.file)}: node {node.name} has a subgraph; the station graph cannot inline it")
        nodes.append(n)
    features = rn(enc.output)
    c, h, w = enc.feature_shape
    H, W = spec.height, spec.width
    k_top = max(1, int(round(H * W * pack.scorer.top_fraction)))
    rows, cols = map_matrices((h, w), (H, W), pack.scorer.smoothing_sigma)
    opset = max(17, next((o.version for o in encoder.opset_import if o.domain in ("", "ai.onnx")), 17))

    def reduce(op: str, x: str, out: str):  # over the last axis; axes became an input at opset 18
        if opset >= 18 or op == "ReduceSum":
            return helper.make_node(op, [x, "last_axis"], [out], keepdims=0)
        return helper.make_node(op, [x], [out], axes=[1], keepdims=0)

    const("last_axis", np.array([1], np.int64))
    nodes += [
        # N x C x h x w -> (N*h*w) x C, projected: (q - mean) @ components
        helper.make_node("Transpose", [features], ["feat_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["feat_nhwc", const("patches_shape", np.array([-1, c], np.int64))], ["patches"]),
        helper.make_node("Sub", ["patches", "proj_mean"], ["patches_centred"]),
        helper.make_node("MatMul", ["patches_centred", "proj_components"], ["q"]),
        # min_j |b_j|^2 - 2 q.b_j, then + |q|^2, clamped at 0
        # -2 on the (small) bank, not on the N*h*w x M product: exact in float32, one big tensor fewer
        helper.make_node("Mul", ["bank", const("minus_two", np.array(-2.0, np.float32))], ["bank_m2"]),
        helper.make_node("Transpose", ["bank_m2"], ["bank_m2_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["q", "bank_m2_t"], ["qb2"]),
        helper.make_node("Add", ["qb2", "bank_sq"], ["partial"]),
        reduce("ReduceMin", "partial", "best"),
        helper.make_node("Mul", ["q", "q"], ["q_sq_terms"]),
        reduce("ReduceSum", "q_sq_terms", "q_sq"),
        helper.make_node("Add", ["best", "q_sq"], ["sqdist_raw"]),
        helper.make_node("Max", ["sqdist_raw", const("zero", np.array(0.0, np.float32))], ["sqdist"]),
        helper.make_node("Sqrt", ["sqdist"], ["dist"]),
        helper.make_node("Reshape", ["dist", const("grid_shape", np.array([-1, h, w], np.int64))], ["grid"]),
        # upsample + blur: rows @ grid @ cols^T
        helper.make_node("MatMul", [const("map_rows", rows), "grid"], ["half_map"]),
        helper.make_node("MatMul", ["half_map", const("map_cols_t", np.ascontiguousarray(cols.T))], ["maps"]),
        helper.make_node("Reshape", ["maps", const("flat_shape", np.array([0, -1], np.int64))], ["flat_maps"]),
        helper.make_node("TopK", ["flat_maps", const("k_top", np.array([k_top], np.int64))], ["top", "top_idx"], axis=1),
        reduce("ReduceMean", "top", "scores"),
    ]
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("frames", TensorProto.UINT8, ["N", H, W, 3]),
              helper.make_tensor_value_info("bank", f32, ["M", "K"]),
              helper.make_tensor_value_info("bank_sq", f32, ["M"]),
              helper.make_tensor_value_info("proj_mean", f32, [c]),
              helper.make_tensor_value_info("proj_components", f32, [c, "K"])]
    outputs = [helper.make_tensor_value_info("maps", f32, ["N", H, W]),
               helper.make_tensor_value_info("scores", f32, ["N"])]
    graph = helper.make_graph(nodes, "station", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = max(encoder.ir_version, 8)
    onnx.checker.check_model(model)
    return model


def bank_inputs(bank: MemoryBank) -> dict[str, np.ndarray]:
    """The graph's bank tensors of a (projected or not) memory bank."""
    features = np.ascontiguousarray(bank.features, np.float32)
    if bank.components is not None:
        mean, components = bank.mean, bank.components
    else:
        mean = np.zeros(features.shape[1], np.float32)
        components = np.eye(features.shape[1], dtype=np.float32)
    return {"bank": features, "bank_sq": np.einsum("ij,ij->i", features, features).astype(np.float32),
            "proj_mean": np.ascontiguousarray(mean, np.float32),
            "proj_components": np.ascontiguousarray(components, np.float32)}


def frames_to_pixels(frames: Sequence[np.ndarray], pack: Pack) -> np.ndarray:
    """uint8 N x H x W x 3 at the pack's input size (OpenCV INTER_AREA, as edge.inference.preprocess): BGR, or
    the grey plane repeated for grey packs."""
    spec = pack.input
    out = np.empty((len(frames), spec.height, spec.width, 3), np.uint8)
    for i, img in enumerate(frames):
        img = check_frame(img)
        if spec.colour == "gray":
            grey = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
            out[i] = cv2.resize(grey, (spec.width, spec.height), interpolation=cv2.INTER_AREA)[:, :, None]
        else:
            bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img
            out[i] = cv2.resize(bgr, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
    return out


def on_cpu(backend) -> bool:
    """Whether `backend` is ONNX Runtime on the CPU alone (where the station graph replaces it)."""
    session = getattr(backend, "session", None)
    return session is not None and session.get_providers() == ["CPUExecutionProvider"]


class StationGraphScorer(Scorer):
    """Scores with the station graph on ONNX Runtime (CPU here); decides as Scorer does. `extractor`
    (for enrollment code that asks a scorer for features) runs the pack's encoder alone."""

    def __init__(self, pack: Pack, bank: MemoryBank, threshold: float, extractor: FeatureExtractor | None = None,
                 calibration=None, threads: int | None = None, providers: list | None = None):
        why = supports(pack, bank)
        if why is not None:
            raise EdgeError(f"the station graph does not cover this station: {why}")
        import onnxruntime as ort

        super().__init__(pack, bank, threshold, extractor or FeatureExtractor(pack), calibration=calibration)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(build_station_graph(pack).SerializeToString(), sess_options=opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.bank_feeds = bank_inputs(bank)

    def maps_and_scores(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return tuple(self.session.run(list(OUTPUTS), {"frames": frames_to_pixels(frames, self.pack), **self.bank_feeds}))

    def score(self, frames: Sequence[np.ndarray]) -> list[Result]:
        t0 = time.perf_counter()
        frames = [check_frame(f) for f in frames]
        maps, scores = self.maps_and_scores(frames)
        per_frame_ms = (time.perf_counter() - t0) * 1000 / max(1, len(frames))
        out = []
        for m, s, f in zip(maps, scores, frames):
            p_value = self.calibration.p_value(float(s)) if self.calibration is not None else None
            out.append(decide(m, float(s), self.threshold, f.shape[:2], per_frame_ms, p_value=p_value))
        return out


@register_scorer("memory_bank")
def build_bank_scorer(request: ScorerRequest) -> Scorer:
    """The bank scorer of a station state: with `cpu_scoring` station_graph and an encoder on ONNX
    Runtime's CPU, the one station graph where it covers the state; else `Scorer` (the few-shot head
    where the state has one), with the bank on the GPU's nn_min kernel where CUDA is usable."""
    from edge.inference.cuda import gpu_bank

    pack, state = request.pack, request.state
    extractor = request.extractor or FeatureExtractor(pack, request.backend)
    if request.cpu_scoring == "station_graph" and supports(pack, state.bank, state.head) is None \
            and on_cpu(extractor.backend):
        return StationGraphScorer(pack, state.bank, state.calibration.threshold, extractor,
                                  calibration=state.calibration)
    return Scorer(pack, gpu_bank(state.bank), state.calibration.threshold, extractor, head=state.head,
                  calibration=state.calibration)
