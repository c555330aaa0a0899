"""Station configuration: the shipped examples validate; mistakes are named by key with what is allowed."""
from pathlib import Path

import pytest
import yaml

from edge.line.config import ConfigError, load_config, parse_config
from edge.line.config_reload import changed_keys, needs_restart

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "configs").glob("*.yaml"))
BASE = {"pack": "packs/default", "state": "state", "source": {"kind": "synthetic"}}


def parse(raw: dict, tmp_path: Path):
    return parse_config(raw, tmp_path / "station.yaml")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_is_valid(path):
    # Files named in the examples (CA, password) exist only on a real station.
    config = parse_config(yaml.safe_load(path.read_text()), path, check_files=False)
    assert config.topic_prefix.count("/") >= 2


def test_examples_cover_every_source_kind():
    kinds = {yaml.safe_load(p.read_text())["source"]["kind"] for p in EXAMPLES}
    assert {"usb", "rtsp", "folder", "synthetic"} <= kinds


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    c = parse({**BASE, "storage": {"dir": "var"}}, tmp_path)
    assert c.pack == tmp_path.resolve() / "packs/default"
    assert c.storage.dir == tmp_path.resolve() / "var"
    assert c.api_socket == tmp_path.resolve() / "var" / "api.sock"
    assert c.topic_prefix == "anomaly-edge/line-1/station-1"


@pytest.mark.parametrize("change, expected", [
    ({"source": {"kind": "webcam"}}, "source: unknown kind 'webcam'; allowed: usb, rtsp"),
    ({"source": {"device": 0}}, "source: missing 'kind'"),
    ({"source": {"kind": "rtsp"}}, "source.url: required key is missing"),
    ({"source": {"kind": "rtsp", "url": "ftp://cam"}}, "source.url: 'ftp://cam' is not allowed here"),
    ({"mqtt": {"port": 70000}}, "mqtt.port: Input should be less than or equal to 65535"),
    ({"mqtt": {"prot": 1883}}, "mqtt.prot: unknown key"),
    ({"trigger": {"mode": "plc"}}, "trigger.mode: Input should be 'free_run', 'mqtt' or 'interval'"),
    ({"station": {"name": "station 1/a"}}, "station.name: 'station 1/a' is not allowed here (letters, digits"),
    ({"mqtt": {"password": "x", "password_file": "pw"}}, "give password or password_file, not both"),
    ({"storage": {"retention_days": 0}}, "storage.retention_days: Input should be greater than 0"),
    ({"pack": None}, "pack: expected a file or folder path, got None"),
    ({"mqtt": {"port": True}}, "mqtt.port: Input should be a valid integer"),
    ({"api": {"tcp_port": True}}, "api.tcp_port: Input should be a valid integer"),
])
def test_a_wrong_key_is_named_with_what_is_allowed(tmp_path, change, expected):
    with pytest.raises(ConfigError) as e:
        parse({**BASE, **change}, tmp_path)
    assert str(tmp_path / "station.yaml") in str(e.value)
    assert expected in str(e.value)


def test_missing_required_sections_are_listed(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse({}, tmp_path)
    for key in ("pack", "state", "source"):
        assert f"  {key}: required key is missing" in str(e.value)


def test_files_named_for_tls_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"mqtt: file .*ca.crt does not exist"):
        parse({**BASE, "mqtt": {"tls": {"ca": "ca.crt"}}}, tmp_path)
    (tmp_path / "ca.crt").write_text("x")
    assert parse({**BASE, "mqtt": {"tls": {"ca": "ca.crt"}}}, tmp_path).mqtt.tls.ca == tmp_path.resolve() / "ca.crt"


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_reload_tells_apart_live_keys_from_restart_keys(tmp_path):
    old = parse(BASE, tmp_path)
    new = parse({**BASE, "trigger": {"interval_s": 2}, "storage": {"retention_days": 7},
                 "source": {"kind": "synthetic", "seed": 5}, "mqtt": {"host": "broker2"}}, tmp_path)
    keys = changed_keys(old, new)
    assert set(keys) == {"trigger.interval_s", "storage.retention_days", "source.seed", "mqtt.host"}
    assert set(needs_restart(keys)) == {"source.seed", "mqtt.host"}


def test_reload_takes_exactly_the_reloadable_keys(tmp_path):
    from edge.line.config_reload import with_reloaded

    old = parse(BASE, tmp_path)
    new = parse({**BASE, "state": "state2", "storage": {"dir": "elsewhere", "retention_days": 7},
                 "explain": {"max_tokens": 10}, "log_level": "debug"}, tmp_path)
    merged = with_reloaded(old, new)
    assert merged.state == new.state and merged.storage.retention_days == 7 and merged.log_level == "debug"
    assert merged.storage.dir == old.storage.dir and merged.explain.max_tokens == old.explain.max_tokens
    assert set(needs_restart(changed_keys(old, new))) == {"storage.dir", "explain.max_tokens"}
