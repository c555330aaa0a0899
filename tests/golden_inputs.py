"""Fixed inputs for the golden MQTT payloads (tests/golden/*.json, tests/test_messages.py)."""
from pathlib import Path

import numpy as np
import yaml

from edge.scoring.decide import Result, find_regions

NOW = 1764633600.25          # 2025-12-02T00:00:00.250Z
CAPTURED_AT = 1764633599.75
STARTED_AT = 1764630000.0
FILE_PATHS = {"image": "/var/lib/anomaly-edge/parts/2026-12-02/P/image.png",
              "overlay": "/var/lib/anomaly-edge/parts/2026-12-02/P/overlay.jpg",
              "mask": "/var/lib/anomaly-edge/parts/2026-12-02/P/mask.png"}
PUBLISHER_STATS = {"connected": True, "outbox_size": 0, "last_error": None, "published": 41}
DEPLOY = {"active": {"model_id": "default-test"}, "previous": None, "last": None}
RATES = {"captured": 29.987, "scored": 29.456}
PERCENTILES = {"queue": {"p50": 1.23, "p99": 4.56}, "score": {"p50": 18.9, "p99": 36.0},
               "capture_to_publish": {"p50": 20.8, "p99": 47.3}}


def frame_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(90, 110, (64, 64, 3), dtype=np.uint8)
    img[20:30, 30:44] = 230
    return img


def fixed_result(anomalous: bool) -> Result:
    amap = np.zeros((16, 16), np.float32)
    if anomalous:
        amap[5:8, 7:11] = 4.0
    mask = amap > 2.5
    return Result(score=3.2 if anomalous else 1.1, threshold=2.5, anomalous=anomalous, anomaly_map=amap, mask=mask,
                  regions=find_regions(amap, mask, (64, 64)), frame_size=(64, 64), latency_ms=12.3456,
                  p_value=0.0123 if anomalous else None)


def write_station_yaml(folder: Path, mm_per_pixel: float | None, heatmap: str = "path") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = {"station": {"line": "l1", "name": "s1", **({"mm_per_pixel": mm_per_pixel} if mm_per_pixel else {})},
           "pack": "/work/main/packs/default", "state": str(folder / "state"),
           "source": {"kind": "synthetic"}, "mqtt": {"host": "127.0.0.1", "port": 1883, "topic_prefix": "test/s1",
                    "heatmap": {"mode": heatmap}},
           "storage": {"dir": str(folder / "var")}}
    path = folder / "station.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
