"""The model pack: a folder with a schema-versioned `pack.yaml` and the files it lists.

The pack describes itself: input size, colour mode and normalization, every file with its sha256,
what the encoder outputs (feature layers, strides, shape) and how to score them. `load_pack`
refuses anything that does not add up, naming the file and key at fault.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge.errors import PackError

SCHEMA_VERSION = 1
MANIFEST = "pack.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalization(_Strict):
    """Applied to pixel values in 0..255: (x - mean) / std, per channel in the pack's colour order."""

    mean: list[float] = Field(min_length=1, max_length=3)
    std: list[float] = Field(min_length=1, max_length=3)

    @model_validator(mode="after")
    def _check(self):
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class InputSpec(_Strict):
    name: str = "image"
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    # rgb/bgr: 3 channels in that order; gray: frames are converted to grey and the grey
    # plane is repeated over `channels`.
    colour: Literal["rgb", "bgr", "gray"] = "rgb"
    channels: Literal[1, 3] = 3
    normalization: Normalization
    # None: the encoder takes height x width only. An integer: it takes any height and width that are
    # multiples of it (its ONNX input has dynamic H and W), so a station whose frames are far from this
    # aspect ratio can score them at their own (Pack.at_input_size).
    size_multiple: int | None = Field(default=None, gt=0, le=512)

    @model_validator(mode="after")
    def _channels_consistent(self):
        if self.colour in ("rgb", "bgr") and self.channels != 3:
            raise ValueError(f"colour {self.colour} needs channels: 3, not {self.channels}")
        m = self.size_multiple
        if m is not None and (self.height % m or self.width % m):
            raise ValueError(f"input {self.height}x{self.width} is not a multiple of size_multiple {m}")
        n = len(self.normalization.mean)
        if n not in (1, self.channels):
            raise ValueError(f"normalization has {n} values for {self.channels} channels (give 1 or {self.channels})")
        return self


class FileEntry(_Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class FeatureLayer(_Strict):
    name: str
    stride: int = Field(gt=0)
    channels: int = Field(gt=0)


class EncoderSpec(_Strict):
    file: str  # key into `files`
    output: str = "features"
    # Shape of one image's output: channels x grid height x grid width.
    feature_shape: tuple[int, int, int]
    stride: int = Field(gt=0)
    layers: list[FeatureLayer] = Field(min_length=1)
    aggregation: str = "avg3x3"

    @model_validator(mode="after")
    def _channels_add_up(self):
        total = sum(layer.channels for layer in self.layers)
        if total != self.feature_shape[0]:
            raise ValueError(f"layers' channels add up to {total} but feature_shape has {self.feature_shape[0]}")
        return self


class ZeroShotSpec(_Strict):
    """AnomalyGPT's text-matched maps: the encoder file's output `output` is N x len(classes) x H x W,
    one anomaly probability map per class exported; `embedding_output` is the N x embedding_dim
    image embedding the LLM projector reads."""

    output: str = "anomaly_maps"
    classes: list[str] = Field(min_length=1)
    embedding_output: str = "image_embedding"
    embedding_dim: int = Field(gt=0)

    @model_validator(mode="after")
    def _unique(self):
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique, got {self.classes}")
        return self


class ScorerSpec(_Strict):
    # Which scorer scores with this pack. memory_bank: nearest-neighbour distances to enrolled patches.
    # anomalygpt: the same bank search per encoder layer (few-shot branch), plus the zero-shot maps of
    # `zero_shot`. Any other registered kind (edge.scoring.registry) may be named: the pack contract
    # checks the name's form, and building the scorer (`run --check`, start) refuses a kind nothing
    # registered, naming the known ones.
    kind: str = Field(default="memory_bank", pattern=r"^[a-z][a-z0-9_]{0,63}$")
    # l2: patch score = L2 distance. cosine: features are unit vectors (per bank group) and the patch
    # score is 1 - cosine similarity = squared distance / 2.
    metric: Literal["l2", "cosine"] = "l2"
    # Bank channels split into this many equal groups (one per encoder layer), each searched on its
    # own; the patch score is the mean over groups.
    bank_groups: int = Field(default=1, ge=1)
    # Patch grid -> input size: bilinear with half-pixel centres (OpenCV), or with corner pixels
    # aligned (PyTorch's align_corners=True, as AnomalyGPT upsamples).
    upsample: Literal["linear", "linear_align_corners"] = "linear"
    # Gaussian sigma, in input pixels, applied to the upsampled map.
    smoothing_sigma: float = Field(default=8.0, ge=0)
    # Image score = mean of the highest `top_fraction` of map pixels (1 pixel when tiny).
    top_fraction: float = Field(default=0.05, gt=0, le=1)
    # Memory bank size cap (patches) after coreset subsampling at enrollment.
    max_bank_patches: int = Field(default=8192, gt=0)
    # Bank and queries are compared in the bank's top principal components (search cost is linear
    # in this); null keeps all channels.
    projection_dim: int | None = Field(default=128, gt=0)
    zero_shot: ZeroShotSpec | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if (self.kind == "anomalygpt") != (self.zero_shot is not None):
            raise ValueError("zero_shot is required for kind anomalygpt and only for it")
        if self.projection_dim is not None and (self.bank_groups > 1 or self.metric == "cosine"):
            raise ValueError("projection_dim must be null with bank_groups > 1 or metric cosine "
                             "(a PCA projection mixes the groups and changes cosines)")
        return self


class ConversationSpec(_Strict):
    """AnomalyGPT's (Vicuna v0) turn layout; the image part is fed as embeddings, not tokens."""

    system: str = ""
    human: str = "### Human: "
    image_open: str = "<Img>"
    image_close: str = "</Img> "
    assistant: str = "\n### Assistant:"
    stop: list[str] = Field(default_factory=lambda: ["###"], min_length=1)


class LlmSpec(_Strict):
    """The pack's language model. `chat`: any chat GGUF grounded by a text prompt built from the
    scorer's findings, in the model's own chat template. `anomalygpt`: the image embedding and the
    prompt learner's embeddings (from `projector`) fed to the GGUF as raw embeddings."""

    kind: Literal["chat", "anomalygpt"]
    file: str  # key into `files`: the GGUF
    context_length: int = Field(default=2048, gt=0)
    projector: str | None = None  # key into `files`: projector.onnx (anomalygpt)
    n_embd: int | None = Field(default=None, gt=0)
    n_prompt_embeddings: int = Field(default=18, ge=0)
    conversation: ConversationSpec | None = None

    @model_validator(mode="after")
    def _anomalygpt_complete(self):
        if self.kind == "anomalygpt":
            missing = [k for k in ("projector", "n_embd", "conversation") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"kind anomalygpt needs {', '.join(missing)}")
        return self


class PackManifest(_Strict):
    schema_version: int
    model_id: str = Field(min_length=1)
    description: str = ""
    created: str = ""
    input: InputSpec
    files: dict[str, FileEntry]
    encoder: EncoderSpec
    scorer: ScorerSpec = ScorerSpec()
    llm: LlmSpec | None = None
    provenance: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _encoder_file_listed(self):
        if self.encoder.file not in self.files:
            raise ValueError(f"encoder.file '{self.encoder.file}' is not a key of files ({sorted(self.files)})")
        if self.llm is not None:
            for key in ("file", "projector"):
                value = getattr(self.llm, key)
                if value is not None and value not in self.files:
                    raise ValueError(f"llm.{key} '{value}' is not a key of files ({sorted(self.files)})")
        s = self.encoder.stride
        if self.input.height % s or self.input.width % s:
            raise ValueError(f"input {self.input.height}x{self.input.width} is not a multiple of encoder.stride {s}")
        grid = (self.input.height // s, self.input.width // s)
        if tuple(self.encoder.feature_shape[1:]) != grid:
            raise ValueError(f"encoder.feature_shape grid {self.encoder.feature_shape[1:]} != input/stride {grid}")
        if self.encoder.feature_shape[0] % self.scorer.bank_groups:
            raise ValueError(f"scorer.bank_groups {self.scorer.bank_groups} does not divide the "
                             f"{self.encoder.feature_shape[0]} feature channels")
        return self


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid pack manifest"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


class Pack:
    """A validated pack on disk. `file(key)` gives the absolute path of a listed file."""

    def __init__(self, root: Path, manifest: PackManifest, manifest_sha256: str):
        self.root = root
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.native_size: tuple[int, int] | None = None  # set on a copy at another input size: pack.yaml's

    def at_input_size(self, height: int, width: int) -> "Pack":
        """This pack with the encoder fed height x width frames (its grid follows); itself where that is
        pack.yaml's size. Only a pack whose input declares `size_multiple` takes another size."""
        spec = self.input
        if (height, width) == (spec.height, spec.width):
            return self
        m = spec.size_multiple
        if m is None:
            raise PackError(f"{self.root}: the encoder takes {spec.height}x{spec.width} frames only (pack.yaml "
                            f"input has no size_multiple), not {height}x{width}")
        if height % m or width % m or not 0 < height <= 4096 or not 0 < width <= 4096:
            raise PackError(f"{self.root}: input {height}x{width}: both sides must be multiples of {m}, up to 4096")
        s = self.encoder.stride
        encoder = self.encoder.model_copy(update={"feature_shape": (self.encoder.feature_shape[0], height // s, width // s)})
        manifest = self.manifest.model_copy(update={"input": spec.model_copy(update={"height": height, "width": width}),
                                                    "encoder": encoder})
        copy = Pack(self.root, manifest, self.manifest_sha256)
        copy.native_size = self.native_size or (spec.height, spec.width)
        return copy

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def input(self) -> InputSpec:
        return self.manifest.input

    @property
    def encoder(self) -> EncoderSpec:
        return self.manifest.encoder

    @property
    def scorer(self) -> ScorerSpec:
        return self.manifest.scorer

    @property
    def llm(self) -> LlmSpec | None:
        return self.manifest.llm

    @property
    def encoder_sha256(self) -> str:
        return self.manifest.files[self.encoder.file].sha256

    def file(self, key: str) -> Path:
        return self.root / self.manifest.files[key].path

    def __repr__(self) -> str:
        return f"Pack({self.model_id!r} at {self.root})"


def load_pack(root: str | Path, verify_hashes: bool = True) -> Pack:
    root = Path(root)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise PackError(f"{root}: model pack folder not found")
    if not manifest_path.is_file():
        raise PackError(f"{manifest_path}: missing (a model pack is a folder with {MANIFEST})")
    raw_bytes = manifest_path.read_bytes()
    try:
        raw = yaml.safe_load(raw_bytes)
    except yaml.YAMLError as e:
        raise PackError(f"{manifest_path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise PackError(f"{manifest_path}: expected a mapping at the top level, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PackError(
            f"{manifest_path}: schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION})"
        )
    try:
        manifest = PackManifest.model_validate(raw)
    except ValidationError as e:
        raise PackError(_format_validation_error(manifest_path, e)) from None
    for key, entry in manifest.files.items():
        path = root / entry.path
        if not path.is_file():
            raise PackError(f"{manifest_path}: files.{key}: {path} is missing")
        if verify_hashes:
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise PackError(
                    f"{manifest_path}: files.{key}: sha256 of {path} is {actual}, manifest says {entry.sha256}"
                )
    return Pack(root.resolve(), manifest, hashlib.sha256(raw_bytes).hexdigest())


def write_manifest(root: Path, manifest: PackManifest) -> Path:
    path = Path(root) / MANIFEST
    data = manifest.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
