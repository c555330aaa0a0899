"""A station config for tests: a copy of the enrolled synthetic state, a broker port, a source."""
import shutil
from pathlib import Path

import yaml


def write_config(tmp_path: Path, pack_dir: Path, state: Path, port: int, source: dict, **sections) -> Path:
    station_state = tmp_path / "state"
    if not station_state.exists():
        shutil.copytree(state, station_state)  # tests may enroll into it
    raw = {"station": {"line": "l1", "name": "s1", "mm_per_pixel": 0.1}, "pack": str(pack_dir),
           "state": str(station_state), "source": source,
           "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": "test/s1"},
           "storage": {"dir": str(tmp_path / "var")}, "health": {"status_interval_s": 0.5}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / "station.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


