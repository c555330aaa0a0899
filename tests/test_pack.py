"""The pack is the contract: edge refuses anything that does not add up, naming what is wrong."""
import shutil

import pytest
import yaml

from edge.inference.backend import OnnxRuntimeBackend
from edge.errors import PackError
from edge.pack import load_pack


@pytest.fixture
def pack_copy(default_pack_dir, tmp_path):
    dst = tmp_path / "pack"
    shutil.copytree(default_pack_dir, dst)
    return dst


def edit_manifest(pack_dir, change):
    path = pack_dir / "pack.yaml"
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_default_pack_loads_and_describes_itself(default_pack):
    assert default_pack.input.height == default_pack.input.width == 224
    assert default_pack.encoder.feature_shape == (344, 28, 28)
    assert [layer.stride for layer in default_pack.encoder.layers] == [8, 16, 32]
    assert default_pack.manifest.provenance["export_max_abs_error"] <= 1e-4


def test_missing_folder_and_manifest_are_named(tmp_path):
    with pytest.raises(PackError, match="folder not found"):
        load_pack(tmp_path / "nope")
    with pytest.raises(PackError, match="pack.yaml: missing"):
        load_pack(tmp_path)


def test_missing_file_is_named(pack_copy):
    (pack_copy / "encoder.onnx").unlink()
    with pytest.raises(PackError, match=r"files\.encoder: .*encoder\.onnx is missing"):
        load_pack(pack_copy)


def test_wrong_hash_is_refused(pack_copy):
    with open(pack_copy / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PackError, match=r"files\.encoder: sha256 of .*encoder\.onnx is [0-9a-f]{64}, manifest says"):
        load_pack(pack_copy)


def test_unknown_schema_version_is_refused(pack_copy):
    edit_manifest(pack_copy, lambda d: d.update(schema_version=99))
    with pytest.raises(PackError, match="schema_version 99 is not supported"):
        load_pack(pack_copy)


def test_invalid_manifest_names_the_key(pack_copy):
    edit_manifest(pack_copy, lambda d: d["input"].update(colour="purple"))
    with pytest.raises(PackError, match=r"input\.colour"):
        load_pack(pack_copy)


def test_inconsistent_feature_shape_is_refused(pack_copy):
    edit_manifest(pack_copy, lambda d: d["encoder"].update(feature_shape=[344, 14, 14]))
    with pytest.raises(PackError, match="feature_shape grid"):
        load_pack(pack_copy)


def test_manifest_that_disagrees_with_the_onnx_graph_is_refused(pack_copy):
    import onnx

    from edge.pack import sha256_file

    def fixed_input(d):  # the graph's height and width fixed at 224, as packs before size_multiple
        model = onnx.load(str(pack_copy / "encoder.onnx"))
        for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], (224, 224)):
            dim.dim_value = value
        onnx.save(model, str(pack_copy / "encoder.onnx"))
        d["files"]["encoder"]["sha256"] = sha256_file(pack_copy / "encoder.onnx")
    edit_manifest(pack_copy, fixed_input)
    with pytest.raises(PackError, match=r"input 'image' has a fixed size \[224, 224\], but pack\.yaml says the "
                                        r"encoder takes any multiple of 32"):
        OnnxRuntimeBackend(load_pack(pack_copy))

    def grow(d):
        del d["input"]["size_multiple"]
        d["input"].update(height=256, width=256)
        d["encoder"]["feature_shape"] = [344, 32, 32]
    edit_manifest(pack_copy, grow)
    with pytest.raises(PackError, match=r"input 'image' has shape .*224.*pack\.yaml says N x \(3, 256, 256\)"):
        OnnxRuntimeBackend(load_pack(pack_copy))

    def more_channels(d):
        d["input"].update(height=224, width=224)
        d["encoder"]["feature_shape"] = [345, 28, 28]
        d["encoder"]["layers"][0]["channels"] += 1
    edit_manifest(pack_copy, more_channels)
    with pytest.raises(PackError, match=r"output 'features' of a 224x224 frame has shape \[344, 28, 28\], expected \[345, 28, 28\]"):
        OnnxRuntimeBackend(load_pack(pack_copy))


def test_not_yaml_is_refused(pack_copy):
    (pack_copy / "pack.yaml").write_text("schema_version: [1\n")
    with pytest.raises(PackError, match="not valid YAML"):
        load_pack(pack_copy)
