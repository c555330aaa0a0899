"""False alarms and border regions of a running synthetic line, read off its MQTT result topic.

    python bench/line_verdicts.py HOST PORT TOPIC SECONDS     # e.g. localhost 1883 anomaly-edge/line-1/station-1/result 60

Start it next to `anomaly-edge run` on a station whose source is `kind: synthetic` (each result's
`source.defect` is the truth); it listens SECONDS and prints verdicts against the truth, and how many of
the flagged parts' regions touch the frame's border.
"""
import json
import sys
import time

import paho.mqtt.client as mqtt


def touches_border(region: dict, width: int, height: int) -> bool:
    return (region["x"] <= 0 or region["y"] <= 0 or region["x"] + region["width"] >= width
            or region["y"] + region["height"] >= height)


def summary(results: list[dict]) -> str:
    good = [r for r in results if not r["source"].get("defect")]
    defective = [r for r in results if r["source"].get("defect")]
    false_alarms = [r for r in good if r["verdict"] == "anomalous"]
    flagged = [r for r in results if r["verdict"] == "anomalous"]
    regions = [(g, r["frame_size"]) for r in flagged for g in r["regions"]]
    on_border = sum(touches_border(g, *size) for g, size in regions)
    return (f"parts {len(results)}: good {len(good)}, false alarms {len(false_alarms)} "
            f"({len(false_alarms) / max(len(good), 1):.1%}); defective {len(defective)}, caught "
            f"{sum(r['verdict'] == 'anomalous' for r in defective)}; flagged {len(flagged)} with {len(regions)} "
            f"regions, {on_border} touching the border ({on_border / max(len(flagged), 1):.2f} per flagged part)")


def main(host: str, port: str, topic: str, seconds: str) -> None:
    by_part: dict[str, dict] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: by_part.__setitem__((d := json.loads(m.payload))["part_id"], d)
    client.on_connect = lambda c, u, flags, rc, props=None: c.subscribe(topic, qos=1)
    client.connect(host, int(port))
    client.loop_start()
    time.sleep(float(seconds))
    client.loop_stop()
    print(summary(list(by_part.values())))


if __name__ == "__main__":
    main(*sys.argv[1:5])
