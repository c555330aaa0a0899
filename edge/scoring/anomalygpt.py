"""AnomalyGPT packs at run time: vision.onnx's three outputs, the few-shot decision, the LLM's input.

One vision run gives, per image, the zero-shot anomaly map of every exported class (N x K x H x W),
the ImageBind image embedding and the four tapped layers' unit patch tokens. The tokens go through
the station's memory bank exactly like the default pack's features (enrollment and automatic
calibration are the same code): per layer, 1 - the best cosine similarity to the enrolled normal
patches, averaged over the layers and upsampled with aligned corners, which is AnomalyGPT's few-shot
map. As in AnomalyGPT's inference code, when normal references are given that map *replaces* the
zero-shot one (its average of the two is commented out there); the zero-shot map of the station's
class still comes with every result, and is what zero-shot use (no references) reads.

`Projector` runs projector.onnx on a result: llama_proj turns the image embedding into one LLM input
embedding, the prompt learner turns the anomaly map into 9 learned + 9 map-derived embeddings. The LLM
reads them as raw input embeddings in AnomalyGPT's conversation (the pack's `llm.conversation`):

    <s>### Human: <Img>[image row]</Img> [18 prompt rows]{question}\\n### Assistant:

The explanation worker lays that out; it takes `Projector.embeddings(result)` as `embeddings=`.
The scorer of kind `anomalygpt` registers itself with edge.scoring.registry (built by edge.scoring.factory).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from edge.inference.backend import Backend, dim_matches
from edge.scoring.decide import Result
from edge.errors import PackError
from edge.pack import Pack
from edge.inference.preprocess import check_frame, to_batch
from edge.scoring.registry import ScorerRequest, register_scorer
from edge.inference.features import FeatureExtractor
from edge.scoring.scorer import Scorer

VISION_MAPS = "anomaly_maps"
VISION_EMBEDDING = "image_embedding"
VISION_TOKENS = "patch_tokens"
PROJECTOR_INPUTS = ["image_embedding", "anomaly_map"]
PROJECTOR_OUTPUTS = ["image_prompt", "anomaly_prompts"]


def _require_anomalygpt(pack: Pack) -> None:
    if pack.scorer.kind != "anomalygpt":
        raise PackError(f"{pack.root}: scorer kind is {pack.scorer.kind!r}, not an AnomalyGPT pack")


def class_index(pack: Pack, class_name: str | None) -> int:
    """Index of `class_name` among the pack's zero-shot classes (None: the first one)."""
    _require_anomalygpt(pack)
    classes = pack.scorer.zero_shot.classes
    if class_name is None:
        return 0
    if class_name not in classes:
        raise PackError(f"{pack.root}: class {class_name!r} was not exported into this pack (classes: "
                        f"{', '.join(classes)}); export again with it in --classes")
    return classes.index(class_name)


@dataclass
class VisionOutputs:
    patch_tokens: np.ndarray  # N x h x w x C, channels last (the bank's layout)
    zero_shot_maps: np.ndarray  # N x classes x H x W, probabilities
    image_embeddings: np.ndarray  # N x embedding_dim, unit length


class AnomalyGptExtractor(FeatureExtractor):
    """vision.onnx with all three outputs from one run (`patch_features` alone serves enrollment)."""

    def __init__(self, pack: Pack, backend: Backend | None = None):
        _require_anomalygpt(pack)
        super().__init__(pack, backend)
        zs = pack.scorer.zero_shot
        self.output_names = [zs.output, zs.embedding_output, pack.encoder.output]
        session = getattr(self.backend, "session", None)
        if session is not None:
            outputs = {o.name: o.shape for o in session.get_outputs()}
            path = pack.file(pack.encoder.file)
            expected = {zs.output: (len(zs.classes), pack.input.height, pack.input.width),
                        zs.embedding_output: (zs.embedding_dim,)}
            for name, want in expected.items():
                if name not in outputs:
                    raise PackError(f"{path}: has no output '{name}' (outputs: {sorted(outputs)})")
                got = outputs[name]
                if len(got) != len(want) + 1 or not all(dim_matches(d, w) for d, w in zip(got[1:], want)):
                    raise PackError(f"{path}: output '{name}' has shape {got}, pack.yaml says N x {want}")

    def run(self, images: Sequence[np.ndarray]) -> VisionOutputs:
        maps, embeddings, tokens = self.backend.run_outputs(to_batch(list(images), self.pack.input), self.output_names)
        return VisionOutputs(np.ascontiguousarray(tokens.transpose(0, 2, 3, 1)), maps, embeddings)

    def zero_shot_maps(self, images: Sequence[np.ndarray], class_name: str | None = None) -> np.ndarray:
        """N x H x W zero-shot anomaly probabilities for one class: AnomalyGPT without references."""
        return self.run(images).zero_shot_maps[:, class_index(self.pack, class_name)]


@dataclass
class AnomalyGptResult(Result):
    class_name: str = ""
    zero_shot_map: np.ndarray | None = None  # H x W, the class's text-matched map
    image_embedding: np.ndarray | None = None  # embedding_dim, what llama_proj reads


class AnomalyGptScorer(Scorer):
    """Scores against the station's bank (the few-shot map decides) and keeps the zero-shot map of
    `class_name` and the image embedding with each result, for the LLM."""

    def __init__(self, pack: Pack, bank, threshold: float, extractor: AnomalyGptExtractor | None = None,
                 class_name: str | None = None, calibration=None):
        self.class_index = class_index(pack, class_name)
        self.class_name = pack.scorer.zero_shot.classes[self.class_index]
        super().__init__(pack, bank, threshold, extractor or AnomalyGptExtractor(pack), calibration=calibration)

    def score(self, frames: Sequence[np.ndarray]) -> list[AnomalyGptResult]:
        t0 = time.perf_counter()
        frames = [check_frame(f) for f in frames]
        out = self.extractor.run(frames)
        maps = self.anomaly_maps(out.patch_tokens)
        per_frame_ms = (time.perf_counter() - t0) * 1000 / max(1, len(frames))
        results = []
        for i, (m, f) in enumerate(zip(maps, frames)):
            base = self.decide(m, f.shape[:2], per_frame_ms)
            results.append(AnomalyGptResult(**{k.name: getattr(base, k.name) for k in fields(Result)},
                                             class_name=self.class_name,
                                             zero_shot_map=out.zero_shot_maps[i, self.class_index],
                                             image_embedding=out.image_embeddings[i]))
        return results


@register_scorer("anomalygpt")
def build_anomalygpt_scorer(request: ScorerRequest) -> AnomalyGptScorer:
    """The scorer of an AnomalyGPT pack's station: the state's bank and calibration, all three vision
    outputs from one run (a reused encoder session is wrapped to give them)."""
    extractor, state = request.extractor, request.state
    if not isinstance(extractor, AnomalyGptExtractor):
        extractor = AnomalyGptExtractor(request.pack, extractor.backend if extractor is not None else request.backend)
    return AnomalyGptScorer(request.pack, state.bank, state.calibration.threshold, extractor,
                            calibration=state.calibration)


class Projector:
    """projector.onnx: image embedding -> 1 LLM embedding, anomaly map -> the prompt learner's embeddings."""

    def __init__(self, pack: Pack, threads: int | None = None):
        import onnxruntime as ort

        _require_anomalygpt(pack)
        llm = pack.llm
        if llm is None or llm.kind != "anomalygpt":
            raise PackError(f"{pack.root}: pack.yaml has no llm section of kind anomalygpt (needed for the projector)")
        self.pack = pack
        path = pack.file(llm.projector)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise PackError(f"{path}: ONNX Runtime could not load the projector: {e}") from None
        names_in = [i.name for i in self.session.get_inputs()]
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if names_in != PROJECTOR_INPUTS or set(outputs) != set(PROJECTOR_OUTPUTS):
            raise PackError(f"{path}: inputs {names_in} / outputs {sorted(outputs)}, expected {PROJECTOR_INPUTS} / "
                            f"{PROJECTOR_OUTPUTS}")
        want = {PROJECTOR_OUTPUTS[0]: (1, llm.n_embd), PROJECTOR_OUTPUTS[1]: (llm.n_prompt_embeddings, llm.n_embd)}
        for name, shape in want.items():
            got = outputs[name]
            if len(got) != 3 or not all(dim_matches(d, w) for d, w in zip(got[1:], shape)):
                raise PackError(f"{path}: output '{name}' has shape {got}, pack.yaml llm says N x {shape}")

    def run(self, image_embeddings: np.ndarray, anomaly_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """N x embedding_dim and N x H x W -> (N x 1 x n_embd, N x n_prompt_embeddings x n_embd)."""
        image_embeddings = np.asarray(image_embeddings, np.float32)
        anomaly_maps = np.asarray(anomaly_maps, np.float32)
        size = (self.pack.input.height, self.pack.input.width)
        dim = self.pack.scorer.zero_shot.embedding_dim
        if image_embeddings.ndim != 2 or image_embeddings.shape[1] != dim:
            raise ValueError(f"image embeddings must be N x {dim}, got {image_embeddings.shape}")
        if anomaly_maps.shape != (len(image_embeddings), *size):
            raise ValueError(f"anomaly maps must be {len(image_embeddings)} x {size[0]} x {size[1]}, got {anomaly_maps.shape}")
        image, prompts = self.session.run(PROJECTOR_OUTPUTS, {PROJECTOR_INPUTS[0]: image_embeddings,
                                                             PROJECTOR_INPUTS[1]: anomaly_maps[:, None]})
        return image, prompts

    def embeddings(self, result: AnomalyGptResult) -> tuple[np.ndarray, np.ndarray]:
        """(1 x n_embd image row, n_prompt_embeddings x n_embd prompt rows) for one scored frame: what
        the LLM takes as raw input embeddings between `<Img>` and `</Img> ` and after it. The prompt
        learner reads the result's decision map (the few-shot map, as AnomalyGPT does when given
        references); zero-shot use calls `run` with the class's zero-shot map instead."""
        if result.image_embedding is None:
            raise ValueError("the result carries no image embedding (score it with AnomalyGptScorer)")
        image, prompts = self.run(result.image_embedding[None], result.anomaly_map[None])
        return image[0], prompts[0]
