"""One path for what changes a station's models (edge.line.station_manager): an enrollment asked over the
local API runs as a job on the maintenance thread, like the MQTT command, and the API waits for its outcome
(real runtime, real pack, real UNIX socket)."""
import logging

import cv2
import pytest

from edge.line.api_client import ApiClient, ApiError
from edge.line.synthetic import SyntheticLine
from mqtt_helpers import wait_until
from station_helpers import start, write_config


@pytest.mark.timeout(300)
def test_an_api_enrollment_runs_on_the_maintenance_thread_and_its_outcome_comes_back(tmp_path, default_pack_dir,
                                                                                      enrolled_state, caplog):
    stain = next(p for p in SyntheticLine(seed=0, defect_rate=1.0).parts(20) if p.defect == "stain")
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(folder / name), stain.image)
    cfg = write_config(tmp_path, default_pack_dir, enrolled_state, 1, {"kind": "folder", "path": str(folder)},
                       trigger={"mode": "mqtt"}, mqtt={"enabled": False}, explain={"enabled": False})
    rt = start(cfg)
    try:
        api = ApiClient(rt.config.api_socket, timeout=240)
        rt.trigger("first")
        wait_until(lambda: rt.counts["parts"] == 1, 60, "the first part")
        assert api.get("/parts/first")["verdict"] == "anomalous"
        with caplog.at_level(logging.INFO, logger="edge.line.station_manager"):
            out = api.post("/parts/first/feedback", {"label": "false_alarm", "by": "shift-lead", "enroll": True})
        assert out["enrolled"]["references"] == 17 and out["part"]["feedback"] == "false_alarm"
        enrolled = [r for r in caplog.records if r.getMessage().startswith("enrolled part first as good")]
        assert [r.threadName for r in enrolled] == ["edge-maintenance"]
        assert rt.health()["threshold"] == out["enrolled"]["threshold"]
        rt.trigger("second")
        wait_until(lambda: rt.counts["parts"] == 2, 60, "the second part")
        assert api.get("/parts/second")["verdict"] == "normal"
        # A job's error comes back to the API as the job raised it (a normal part keeps no image here).
        with pytest.raises(ApiError, match=r"enroll-good: part 'second' has no stored image") as refused:
            api.post("/parts/second/feedback", {"label": "false_alarm", "by": "x", "enroll": True})
        assert refused.value.status == 400 and rt.health()["references"] == 17
    finally:
        rt.stop()
