"""A station config for tests: a copy of the enrolled synthetic state, a broker port, a source."""
import shutil
from pathlib import Path

import yaml

from mqtt_helpers import wait_until


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




def start(config_path: Path):
    """A Runtime on the config file, started."""
    from edge.line.config import load_config
    from edge.line.runtime import Runtime

    return Runtime(load_config(config_path), config_path).start()


def finish(rt, timeout: float = 60) -> None:
    """Wait until a finite source's every frame is scored, then stop the runtime."""
    wait_until(lambda: rt._source_done.is_set() and not len(rt._queue) and rt._output.empty()
               and rt.counts["parts"] + rt._queue.dropped == rt.counts["captured"], timeout, "the source to be scored")
    rt.stop()
