"""One ROI/tiling model on every road: the enrolled state.yaml, the station configuration and the CLI options
give equal TilingSpec objects for the same value, and a bad value is named alike on all three."""
import pytest
import yaml

from conftest import run_cli
from edge.cli.main import build_parser
from edge.cli.options import tiling_from_options
from edge.errors import EdgeError, StateError
from edge.line.config import ConfigError, parse_config
from edge.scoring.roi import RoiSpec
from edge.scoring.tiling import TilingSpec
from edge.station.state import STATE_FILE, load_state

BASE = {"pack": "packs/default", "state": "state", "source": {"kind": "synthetic"}}
OPTIONS = ["--tile-scale", "2", "--tile-overlap", "0.5", "--tile-bank", "per_tile", "--tile-bank-patches", "256",
           "--roi", "contour", "--align", "ecc"]
SECTIONS = {"tiling": {"scale": 2, "overlap": 0.5, "bank": "per_tile", "bank_patches": 256},
            "roi": {"kind": "contour", "align": "ecc"}}


def cli_spec(*options):
    return tiling_from_options(build_parser().parse_args(["enroll", "--pack", "p", "--synthetic", "8", "--out", "s",
                                                          *options]))


@pytest.fixture(scope="module")
def enrolled(default_pack_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("roads") / "state"
    run_cli("enroll", "--pack", default_pack_dir, "--synthetic", 8, "--out", out, "--quiet", *OPTIONS)
    return out


def test_the_same_value_is_the_same_model_on_every_road(enrolled, tmp_path):
    expected = TilingSpec(scale=2, overlap=0.5, bank="per_tile", bank_patches=256,
                          roi=RoiSpec(kind="contour", align="ecc"))
    from_state = load_state(enrolled).tiling_spec
    from_config = parse_config({**BASE, **SECTIONS}, tmp_path / "station.yaml").tiling_spec()
    from_cli = cli_spec(*OPTIONS)
    assert from_state == from_config == from_cli == expected
    assert type(from_state.roi) is type(from_config.roi) is type(from_cli.roi) is RoiSpec
    # state.yaml holds the model's own dump, keys as in the station configuration
    doc = yaml.safe_load((enrolled / STATE_FILE).read_text())["tiling"]
    assert {k: doc[k] for k in ("scale", "overlap", "bank", "bank_patches")} == {**SECTIONS["tiling"], "scale": 2.0}
    assert doc["roi"]["kind"] == "contour" and doc["roi"]["align"] == "ecc"


def _state_with(enrolled, tmp_path, **tiling):
    import shutil

    state = tmp_path / "state"
    shutil.copytree(enrolled, state)
    doc = yaml.safe_load((state / STATE_FILE).read_text())
    doc["tiling"].update(tiling)
    (state / STATE_FILE).write_text(yaml.safe_dump(doc, sort_keys=False))
    return state


def test_a_bad_tiling_value_is_named_alike_on_every_road(enrolled, default_pack_dir, tmp_path):
    named, problem = "tiling.overlap", "Input should be less than 1, got 1.5"
    with pytest.raises(ConfigError) as config_error:
        parse_config({**BASE, **SECTIONS, "tiling": {"scale": 2, "overlap": 1.5}}, tmp_path / "station.yaml")
    with pytest.raises(StateError) as state_error:
        load_state(_state_with(enrolled, tmp_path, overlap=1.5))
    with pytest.raises(EdgeError) as cli_error:
        cli_spec("--tile-scale", "2", "--tile-overlap", "1.5")
    assert f"  {named}: {problem}" in str(config_error.value)
    assert str(tmp_path / "station.yaml") in str(config_error.value)
    assert str(state_error.value) == f"{tmp_path / 'state' / STATE_FILE}: {named}: {problem}"
    assert str(cli_error.value) == f"--tile-overlap ({named}): {problem}"
    proc = run_cli("enroll", "--pack", default_pack_dir, "--synthetic", 8, "--out", tmp_path / "s", "--tile-scale", "2",
                   "--tile-overlap", "1.5", check=False)
    assert proc.returncode != 0 and f"error: --tile-overlap ({named}): {problem}" in proc.stderr


def test_a_bad_roi_value_is_named_alike_on_every_road(enrolled, tmp_path, capsys):
    named = "roi: rect [10, 10, 0, 50]: x, y must be >= 0 and width, height > 0"
    bad = {"kind": "rect", "rect": [10, 10, 0, 50]}
    with pytest.raises(ConfigError) as config_error:
        parse_config({**BASE, **SECTIONS, "roi": bad}, tmp_path / "station.yaml")
    with pytest.raises(StateError) as state_error:
        load_state(_state_with(enrolled, tmp_path, roi=bad))
    assert f"\n  {named}" in str(config_error.value)  # the station file's key: roi
    assert f": tiling.{named}" in str(state_error.value)  # state.yaml's key: tiling.roi
    with pytest.raises(SystemExit):  # the CLI offers only the ROI kinds without coordinates
        cli_spec("--tile-scale", "2", "--roi", "rect")
    assert "--roi: invalid choice: 'rect'" in capsys.readouterr().err
