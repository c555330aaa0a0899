"""`anomaly-edge export backbone --arch A --weights FILE`: a pack from the user's own checkpoint.

The checkpoint is read unchanged: a plain state_dict, or a dict holding one under 'state_dict' or
'model' (torch.save / .pth, or .safetensors), its names as a training wrapper may have prefixed them
(`module.`, `_orig_mod.`, a Lightning module's `model.`: `strip_wrapper_prefix`), in the layout of the
library the architecture comes from (torchvision for the ResNets, timm for EfficientNet-Lite and DINOv2
ViT-S/14, whose keys the facebookresearch dinov2 hub checkpoints share). Keys the pack does not use (classifier heads, the
layers after the last tap, the ViT's final norm and mask token) are ignored; every key the tapped
layers need must be there with its shape, or the export stops naming the file and the keys.

Features, as the pack's encoder outputs them (N x C x h x w):
- ResNets (PatchCore): layer2 + layer3, each 3x3-averaged, layer3 resized to layer2's stride-8
  grid, concatenated; L2 bank with the default PCA projection.
- EfficientNet-Lite0/1/2: the last blocks of stages 2, 4, 5 (strides 8, 16, 32), as the default pack.
- DINOv2 ViT-S/14: as `export dinov2-s` (blocks 8 and 11, CLS dropped, 3x3-averaged, unit length,
  averaged, unit length again), cosine bank.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.pack import (SCHEMA_VERSION, EncoderSpec, FeatureLayer, FileEntry, InputSpec, Normalization, PackManifest,
                       ScorerSpec, sha256_file)

from .common import ExportError, build_pack, check_encoder_onnx, note, prepare_out
from .common import export_onnx as _export_onnx
from .common import step as _step
from .dinov2 import DEFAULT_LAYERS, IMAGENET_MEAN, IMAGENET_STD

MAX_ABS_ERROR = 1e-4
VIT_TAPS = DEFAULT_LAYERS  # the same blocks as `export dinov2-s`


@dataclass(frozen=True)
class Arch:
    name: str
    layout: str  # whose state_dict names the checkpoint uses
    ignored_prefixes: tuple[str, ...]  # checkpoint keys the pack does not need
    size_multiple: int


ARCHS = {
    "resnet18": Arch("resnet18", "torchvision.models.resnet18", ("layer4.", "fc."), 32),
    "wide_resnet50_2": Arch("wide_resnet50_2", "torchvision.models.wide_resnet50_2", ("layer4.", "fc."), 32),
    "efficientnet_lite0": Arch("efficientnet_lite0", "timm efficientnet_lite0",
                               ("blocks.6.", "conv_head.", "bn2.", "classifier."), 32),
    "efficientnet_lite1": Arch("efficientnet_lite1", "timm efficientnet_lite1",
                               ("blocks.6.", "conv_head.", "bn2.", "classifier."), 32),
    "efficientnet_lite2": Arch("efficientnet_lite2", "timm efficientnet_lite2",
                               ("blocks.6.", "conv_head.", "bn2.", "classifier."), 32),
    "dinov2_vits14": Arch("dinov2_vits14", "timm vit_small_patch14_dinov2 / facebookresearch dinov2 hub",
                          ("norm.", "head.", "fc_norm.", "mask_token"), 14),
}


def read_checkpoint(path: Path) -> dict:
    """The state_dict in `path`: plain, or under 'state_dict' / 'model'."""
    import torch

    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path}: not a readable checkpoint: {e}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{path}: expected a state_dict (name -> tensor), or a dict with one under "
                          f"'state_dict' or 'model'; got {type(obj).__name__}"
                          + (f" with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else ""))
    return obj


def strip_wrapper_prefix(state: dict, names) -> tuple[dict, str]:
    """`state` with the prefix a training wrapper put before every name taken off (DataParallel's and
    DistributedDataParallel's `module.`, torch.compile's `_orig_mod.`, a Lightning module's attribute such
    as `model.` or `backbone.`, up to three levels), and that prefix ('' for none). The prefix is the one
    under which the most keys are the network's own `names`; keys outside it (a wrapper's own head, a
    loss) are dropped, and `load_weights` still checks that nothing the pack needs is missing."""
    names = set(names)
    hits = sum(k in names for k in state)
    counts: dict[str, int] = {}
    for key in state:
        parts = key.split(".")
        for i in range(1, min(len(parts), 4)):
            prefix = ".".join(parts[:i]) + "."
            if key[len(prefix):] in names:
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts or max(counts.values()) <= hits:
        return state, ""
    prefix = max(counts, key=counts.get)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix


def build_network(arch: str, state: dict | None = None):
    """The feature network of `arch` (a state_dict only sizes the ViT's position embeddings)."""
    from . import backbone_nets as nets

    if arch == "resnet18":
        return nets.ResNetFeatures(nets.BasicBlock, [2, 2, 2, 2])
    if arch == "wide_resnet50_2":
        return nets.ResNetFeatures(nets.Bottleneck, [3, 4, 6, 3], width=128)
    if arch in nets.LITE_VARIANTS:
        return nets.EfficientNetLiteFeatures(arch)
    if arch == "dinov2_vits14":
        pos = state.get("pos_embed") if state else None
        grid = int(round(np.sqrt(pos.shape[1] - 1))) if pos is not None and pos.ndim == 3 else 37
        return nets.VitFeatures(VIT_TAPS, pos_grid=grid)
    raise ExportError(f"--arch {arch!r}: expected one of {', '.join(ARCHS)}")


def _listing(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_weights(net, state: dict, arch: str, path: Path) -> None:
    """Copy `state` into `net` strictly over what the pack uses; a clear error otherwise."""
    spec = ARCHS[arch]
    want = net.state_dict()
    optional = {k for k in want if k.endswith("num_batches_tracked")}
    missing = [k for k in want if k not in state and k not in optional]
    shape = [f"{k} (checkpoint {list(state[k].shape)}, {arch} {list(want[k].shape)})"
             for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    unexpected = [k for k in state if k not in want and not k.startswith(spec.ignored_prefixes)]
    if missing or shape or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if shape:
            parts.append(f"{len(shape)} keys with another shape: {_listing(shape, 3)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        raise ExportError(f"{path}: not a {arch} checkpoint in the {spec.layout} layout; " + "; ".join(parts))
    net.load_state_dict({k: state[k] for k in want if k in state}, strict=False)


def patch_feature_module(net, arch: str, aggregate: int = 3):
    """`net`'s tapped outputs -> N x C x h x w pack features (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class CnnFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            feats = [F.avg_pool2d(f, aggregate, 1, aggregate // 2, count_include_pad=False) for f in self.net(x)]
            grid = feats[0].shape[-2:]
            feats = [feats[0]] + [F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
                                  for f in feats[1:]]
            return torch.cat(feats, dim=1)

    class VitGridFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            h, w = x.shape[-2] // net.patch, x.shape[-1] // net.patch
            per_layer = []
            for tokens in self.net(x):
                g = tokens[:, 1:, :].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
                g = F.avg_pool2d(g, aggregate, 1, aggregate // 2, count_include_pad=False)
                per_layer.append(F.normalize(g, dim=1, eps=1e-12))
            return F.normalize(torch.stack(per_layer).mean(0), dim=1, eps=1e-12)

    return (VitGridFeatures() if arch == "dinov2_vits14" else CnnFeatures()).eval()


def build_encoder(arch: str, weights: Path, size: int):
    """(feature module, layers) for `arch` with the checkpoint's weights, at `size` x `size`."""
    if arch not in ARCHS:
        raise ExportError(f"--arch {arch!r}: expected one of {', '.join(ARCHS)}")
    import torch

    with torch.device("meta"):  # only the names: no memory, no initialisation
        names = build_network(arch).state_dict().keys()
    state, prefix = strip_wrapper_prefix(read_checkpoint(weights), names)
    if prefix:
        note(f"keys read without the prefix {prefix!r} a training wrapper put before them")
    net = build_network(arch, state)
    load_weights(net, state, arch, weights)
    net.eval()
    if arch == "dinov2_vits14":
        net.set_grid(size // net.patch)
        layers = [FeatureLayer(name="mean(" + ",".join(f"blocks.{i}" for i in VIT_TAPS) + ")", stride=14, channels=384)]
    else:
        layers = [FeatureLayer(name=n, stride=s, channels=c) for n, s, c in zip(net.names, net.strides, net.channels)]
    return patch_feature_module(net, arch), layers


def check_onnx(model, path: Path, size: int, seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime and the PyTorch forward, spanning the ImageNet-normalised
    range (+-2)."""
    return check_encoder_onnx(model, path, size, span=2.0, n_noise=1, seed=seed)


def export_backbone(out: str | Path, arch: str, weights: str | Path, size: int = 224, force: bool = False,
                    llm: bool = True) -> Path:
    import torch

    out, weights = Path(out), Path(weights)
    prepare_out(out, force)
    if arch not in ARCHS:
        raise ExportError(f"--arch {arch!r}: expected one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    m = spec.size_multiple
    if size < m or size % m:
        raise ExportError(f"--size {size}: must be a multiple of {m} for {arch}")
    n = 5 if llm else 4
    _step(1, n, f"loading {weights} as {arch} ({spec.layout} layout)")
    model, layers = build_encoder(arch, weights, size)
    stride = min(layer.stride for layer in layers)
    channels = sum(layer.channels for layer in layers)
    vit = arch == "dinov2_vits14"

    def build(tmp: Path) -> PackManifest:
        _step(2, n, f"exporting ONNX ({size}x{size}, dynamic batch)")
        onnx_path = tmp / "encoder.onnx"
        _export_onnx(model, (torch.zeros(2, 3, size, size),), onnx_path, ["image"], ["features"])
        for extra in tmp.glob("*.data"):
            raise ExportError(f"{extra}: the encoder needs external data (over 2 GB); not supported")
        note(f"{onnx_path.stat().st_size / 1e6:.1f} MB")
        _step(3, n, "checking ONNX Runtime against the PyTorch forward")
        err = check_onnx(model, onnx_path, size)
        note(f"max abs error {err:.2e} (limit {MAX_ABS_ERROR:.0e})")
        if not err <= MAX_ABS_ERROR:
            raise ExportError(f"ONNX export differs from PyTorch by {err:.2e} > {MAX_ABS_ERROR:.0e}")
        files = {"encoder": FileEntry(path="encoder.onnx", sha256=sha256_file(onnx_path))}
        llm_spec, llm_provenance = None, {}
        if llm:
            from .default_pack import bundle_default_llm

            _step(4, n, "fetching the explanation LLM, SmolLM2-135M-Instruct GGUF (pinned sha256)")
            llm_spec, llm_provenance = bundle_default_llm(tmp, files, note)
        _step(n, n, f"writing the pack to {out}")
        return PackManifest(
            schema_version=SCHEMA_VERSION,
            model_id=f"{arch}-bank-{size}",
            description=f"{arch} patch features ({'+'.join(layer.name for layer in layers)}) from a user checkpoint "
                        f"with a {'cosine ' if vit else ''}memory-bank scorer",
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            input=InputSpec(height=size, width=size, colour="rgb", channels=3,
                            normalization=Normalization(mean=IMAGENET_MEAN, std=IMAGENET_STD)),
            files=files,
            encoder=EncoderSpec(file="encoder", output="features",
                                feature_shape=(channels, size // stride, size // stride),
                                stride=stride, layers=layers, aggregation="avg3x3"),
            scorer=ScorerSpec(metric="cosine", projection_dim=None) if vit else ScorerSpec(),
            llm=llm_spec,
            provenance={
                "arch": arch,
                "weights_layout": spec.layout,
                "weights": weights.name,
                "weights_sha256": sha256_file(weights),
                "export_max_abs_error": err,
                "exporter": "anomaly-edge export backbone",
                **llm_provenance,
            },
        )

    build_pack(out, build)
    return out
