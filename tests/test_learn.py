"""Learn mode: a station enrolled from unlabeled production parts, most of them good."""
import cv2
import pytest

from conftest import run_cli
from edge.errors import StateError
from edge.station.learn import learn, refine
from edge.station.enrollment import enroll
from edge.line.synthetic import SyntheticLine
from mqtt_helpers import needs_mosquitto


def write_stream(folder, n: int, defect_rate: float, seed: int = 5):
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for part in SyntheticLine(seed=seed, defect_rate=defect_rate).parts(n):
        path = folder / f"{part.part_id}.png"
        cv2.imwrite(str(path), part.image)
        truth[path.name] = part.defect
    return truth


def test_learn_mode_sets_defective_parts_aside_and_lands_near_the_clean_threshold(default_pack, tmp_path):
    truth = write_stream(tmp_path / "stream", 40, defect_rate=0.1)
    defective = {name for name, kind in truth.items() if kind}
    assert len(defective) == 4
    result = learn(default_pack, sorted((tmp_path / "stream").glob("*.png")), tmp_path / "learned", quiet=True,
                   log=lambda m: None)
    suspects = {p.name for p in result.suspects}
    assert defective <= suspects, f"missed {defective - suspects}"
    assert len(suspects - defective) <= 3  # a few unusual good parts may be set aside too
    clean = [tmp_path / "stream" / name for name, kind in truth.items() if not kind]
    reference = enroll(default_pack, clean, tmp_path / "clean", quiet=True, log=lambda m: None)
    learned_t, clean_t = result.state.calibration.threshold, reference.calibration.threshold
    assert abs(learned_t - clean_t) / clean_t < 0.15, (learned_t, clean_t)
    assert result.state.info["learn"]["suspects"] == sorted(suspects) or set(result.state.info["learn"]["suspects"]) == suspects


def test_learn_mode_refuses_too_few_parts_and_an_existing_state(default_pack, tmp_path, enrolled_state):
    write_stream(tmp_path / "few", 5, defect_rate=0.0)
    with pytest.raises(StateError, match="at least 8 readable parts"):
        learn(default_pack, sorted((tmp_path / "few").glob("*.png")), tmp_path / "s", log=lambda m: None)
    with pytest.raises(StateError, match="already holds a station state"):
        learn(default_pack, sorted((tmp_path / "few").glob("*.png")), enrolled_state, log=lambda m: None)


def test_cli_learn_reports_what_it_set_aside(default_pack_dir, tmp_path):
    truth = write_stream(tmp_path / "stream", 24, defect_rate=0.1, seed=8)
    proc = run_cli("learn", "--pack", default_pack_dir, "--parts", tmp_path / "stream", "--out", tmp_path / "st",
                   "--quiet")
    assert "set aside" in proc.stdout and "threshold" in proc.stdout
    for name, kind in truth.items():
        if kind:
            assert name in proc.stdout
    bad = run_cli("learn", "--pack", default_pack_dir, "--parts", tmp_path / "nothing", "--out", tmp_path / "x",
                  check=False)
    assert bad.returncode == 2 and "nothing: not a folder" in bad.stderr


def test_eval_learn_mixes_defective_test_parts_into_the_stream_and_leaves_them_out_of_the_score(
        default_pack, synthetic_dataset):
    from edge.evaluation.evaluate import evaluate

    plain = evaluate(default_pack, synthetic_dataset, None, quiet=True, log=lambda m: None)
    r = evaluate(default_pack, synthetic_dataset, None, quiet=True, log=lambda m: None, learn_parts=10,
                 learn_defect_rate=0.1)
    assert r["learn"]["parts"] == 10 and r["learn"]["defective_mixed_in"] == 1
    assert r["n_test"] == plain["n_test"] - 1 and r["n_anomalous"] == plain["n_anomalous"] - 1
    assert r["shots"] == 10 - r["learn"]["set_aside"] and 0 <= r["image_auroc"] <= 1


def one_shot_state(default_pack, tmp_path, seed: int = 5):
    good = write_stream(tmp_path / "shot", 1, defect_rate=0.0, seed=seed + 100)
    return enroll(default_pack, [tmp_path / "shot" / n for n in good], tmp_path / "state", quiet=True,
                  log=lambda m: None)


def test_refine_adds_the_usual_parts_to_a_one_shot_state_and_sets_the_defective_aside(default_pack, tmp_path):
    before = one_shot_state(default_pack, tmp_path)
    assert len(before.references) == 1 and before.calibration.source == "quadrants+jitter"
    truth = write_stream(tmp_path / "stream", 40, defect_rate=0.1)
    defective = {name for name, kind in truth.items() if kind}
    result = refine(default_pack, sorted((tmp_path / "stream").glob("*.png")), tmp_path / "state", quiet=True,
                    log=lambda m: None)
    suspects = {p.name for p in result.suspects}
    assert defective <= suspects, f"missed {defective - suspects}"
    state = result.state
    assert len(state.references) == 1 + len(result.kept)  # the enrolled shot stays among them
    assert before.references[0] in state.references
    refined = state.info["refined"]
    assert refined["references_before"] == 1 and refined["kept"] == len(result.kept)
    assert refined["threshold_before"] == pytest.approx(before.calibration.threshold)
    assert state.calibration.source != before.calibration.source  # now held out over many shots
    # the refined threshold is the one the clean parts alone (plus the shot) give
    clean = [tmp_path / "stream" / n for n, kind in truth.items() if not kind]
    reference = enroll(default_pack, [tmp_path / "shot" / p for p in sorted(p.name for p in (tmp_path / "shot").glob("*.png"))]
                       + clean, tmp_path / "clean", quiet=True, log=lambda m: None)
    assert abs(state.calibration.threshold - reference.calibration.threshold) / reference.calibration.threshold < 0.15
    # a later enroll-good keeps where the references came from
    again = enroll(default_pack, clean[:1], tmp_path / "state", quiet=True, log=lambda m: None)
    assert again.info["refined"] == refined


def test_refine_needs_a_state(default_pack, tmp_path):
    write_stream(tmp_path / "stream", 8, defect_rate=0.0)
    with pytest.raises(StateError, match="no station state to refine"):
        refine(default_pack, sorted((tmp_path / "stream").glob("*.png")), tmp_path / "none", log=lambda m: None)


def test_cli_learn_refine_reports_references_and_threshold_before_and_after(default_pack_dir, default_pack,
                                                                            tmp_path):
    before = one_shot_state(default_pack, tmp_path, seed=9)
    write_stream(tmp_path / "stream", 16, defect_rate=0.0, seed=9)
    proc = run_cli("learn", "--pack", default_pack_dir, "--parts", tmp_path / "stream", "--out", tmp_path / "state",
                   "--refine", "--quiet")
    assert "references 1 -> " in proc.stdout and f"threshold {before.calibration.threshold:.4f} -> " in proc.stdout
    plain = run_cli("learn", "--pack", default_pack_dir, "--parts", tmp_path / "stream", "--out", tmp_path / "state",
                    check=False)
    assert plain.returncode != 0 and "learn --refine" in plain.stderr


def test_eval_refine_enrolls_the_shots_first_then_the_stream(default_pack, synthetic_dataset):
    from edge.evaluation.evaluate import evaluate

    r = evaluate(default_pack, synthetic_dataset, 1, quiet=True, log=lambda m: None, learn_parts=10,
                 learn_defect_rate=0.1)
    learn_info = r["learn"]
    assert learn_info["enrolled_shots"] == 1 and learn_info["threshold_source_before"] == "quadrants+jitter"
    assert r["shots"] == 1 + 10 - learn_info["set_aside"]


def _learning_station(tmp_path, default_pack_dir, port, count, seed, parts=20):
    from station_helpers import write_config

    (tmp_path / "state").mkdir(exist_ok=True)  # no state yet: learn mode
    return write_config(tmp_path, default_pack_dir, tmp_path / "state", port,
                        {"kind": "synthetic", "seed": seed, "defect_rate": 0.1, "count": count},
                        learn={"parts": parts}, storage={"keep_images": "none"})


@needs_mosquitto
@pytest.mark.timeout(240)
def test_a_station_without_state_learns_it_from_its_first_parts_across_a_restart(broker, tmp_path,
                                                                                 default_pack_dir):
    """Learn mode on the line: the first 20 parts are answered `learning` (10 before a restart, 10 after),
    the state is built from them with the unusual ones set aside by part id, and from then on (and after
    the next restart) every part is scored against the learned state."""
    from mqtt_helpers import Subscriber, wait_until
    from station_helpers import finish, start

    sub = Subscriber(broker.port, "test/s1/#")
    rt = start(_learning_station(tmp_path, default_pack_dir, broker.port, 10, seed=1))
    assert rt.health()["learning"]["collected"] == 0 and rt.health()["threshold"] is None
    finish(rt)
    wait_until(lambda: len(sub.unique_by_topic().get("test/s1/result", [])) >= 10, 30, "10 results")
    first = sub.unique_by_topic()["test/s1/result"]
    assert [r["verdict"] for r in first] == ["learning"] * 10
    assert [r["learning"]["collected"] for r in first] == list(range(1, 11))
    assert all(r["score"] is None and r["threshold"] is None and r["learning"]["of"] == 20 for r in first)
    assert not (tmp_path / "state" / "state.yaml").exists()

    rt = start(_learning_station(tmp_path, default_pack_dir, broker.port, 30, seed=2))
    assert rt.health()["learning"]["collected"] >= 10  # the line runs on while we ask: resumed, not from 0
    wait_until(lambda: len(sub.unique_by_topic().get("test/s1/result", [])) >= 11, 60, "a part after the restart")
    assert sub.unique_by_topic()["test/s1/result"][10]["learning"]["collected"] == 11  # resumed, not started again
    wait_until(lambda: any(r.get("command") == "learn" for r in sub.unique_by_topic().get("test/s1/reply", [])),
               180, "the learn reply")
    finish(rt)
    reply = next(r for r in sub.unique_by_topic()["test/s1/reply"] if r.get("command") == "learn")
    assert reply["ok"], reply
    learned_ids = [r["part_id"] for r in sub.unique_by_topic()["test/s1/result"]
                   if r["verdict"] == "learning" and r["learning"].get("collected")][:20]
    assert reply["parts"] == 20 and reply["kept"] == 20 - len(reply["suspects"])
    assert {s["part_id"] for s in reply["suspects"]} <= set(learned_ids)
    assert reply["threshold"] > 0 and reply["threshold_source"]
    assert (tmp_path / "state" / "state.yaml").is_file()

    rt = start(_learning_station(tmp_path, default_pack_dir, broker.port, 10, seed=3))
    assert rt.health()["learning"] is None and rt.health()["threshold"] == reply["threshold"]
    finish(rt)
    last = sub.unique_by_topic()["test/s1/result"][-10:]
    assert {r["verdict"] for r in last} <= {"normal", "anomalous"} and all(r["score"] is not None for r in last)
    results = sub.unique_by_topic()["test/s1/result"]
    assert len(results) == 50 and len({r["part_id"] for r in results}) == 50  # every part answered once
    sub.close()


def test_learn_config_is_checked(tmp_path):
    from edge.line.config import ConfigError, load_config

    path = tmp_path / "s.yaml"
    path.write_text("pack: p\nstate: s\nsource: {kind: synthetic}\nlearn: {parts: 3}\n")
    with pytest.raises(ConfigError, match="learn.parts"):
        load_config(path)


@needs_mosquitto
@pytest.mark.timeout(240)
def test_a_one_shot_station_refines_itself_from_the_line_while_deciding_every_part(broker, tmp_path, default_pack,
                                                                                  default_pack_dir):
    """learn.refine: a station enrolled from one good part decides every part from the first one on; it keeps
    the next 12 (6 before a restart, 6 after), adds those mutual scoring does not set aside to its
    references and recalibrates, once: the next start does not refine again."""
    from mqtt_helpers import Subscriber, wait_until
    from station_helpers import finish, start, write_config

    before = one_shot_state(default_pack, tmp_path / "enrolled")

    def station(count, seed):
        return write_config(tmp_path, default_pack_dir, tmp_path / "enrolled" / "state", broker.port,
                            {"kind": "synthetic", "seed": seed, "defect_rate": 0.1, "count": count},
                            learn={"parts": 12, "refine": True}, storage={"keep_images": "none"})

    sub = Subscriber(broker.port, "test/s1/#")
    rt = start(station(6, seed=1))
    assert rt.health()["refining"]["collected"] == 0 and rt.health()["learning"] is None
    assert rt.health()["threshold"] == pytest.approx(before.calibration.threshold, rel=1e-5)
    finish(rt)
    rt = start(station(20, seed=2))
    assert rt.health()["refining"]["collected"] >= 6  # resumed after the restart, not from 0
    wait_until(lambda: any(r.get("command") == "refine" for r in sub.unique_by_topic().get("test/s1/reply", [])),
               180, "the refine reply")
    finish(rt)
    reply = next(r for r in sub.unique_by_topic()["test/s1/reply"] if r.get("command") == "refine")
    assert reply["ok"], reply
    assert reply["parts"] == 12 and reply["references_before"] == 1
    assert reply["references"] == 1 + reply["kept"] and reply["kept"] == 12 - len(reply["suspects"])
    assert reply["threshold_before"] == pytest.approx(before.calibration.threshold, rel=1e-5)
    assert reply["threshold"] != reply["threshold_before"]
    results = sub.unique_by_topic()["test/s1/result"]
    assert len(results) == 26 and len({r["part_id"] for r in results}) == 26
    assert all(r["verdict"] in ("normal", "anomalous") and r["score"] is not None for r in results)
    assert {s["part_id"] for s in reply["suspects"]} <= {r["part_id"] for r in results[:12]}
    # each result says whether its state was still being refined, and how far that was
    assert [r["refining"]["collected"] for r in results[:12]] == list(range(1, 13))
    assert all(r["refining"]["of"] == 12 for r in results[:12])

    rt = start(station(2, seed=3))
    assert rt.health()["refining"] is None and rt.health()["threshold"] == pytest.approx(reply["threshold"], rel=1e-5)
    finish(rt)
    sub.close()


@pytest.mark.timeout(240)
def test_a_state_refined_off_the_line_and_reloaded_ends_the_station_s_own_collection(tmp_path, default_pack,
                                                                                     default_pack_dir):
    from mqtt_helpers import wait_until
    from station_helpers import start, write_config

    one_shot_state(default_pack, tmp_path / "enrolled", seed=11)
    truth = write_stream(tmp_path / "frames", 3, defect_rate=0.0, seed=12)
    cfg = write_config(tmp_path, default_pack_dir, tmp_path / "enrolled" / "state", 1,
                       {"kind": "folder", "path": str(tmp_path / "frames")}, trigger={"mode": "mqtt"},
                       mqtt={"enabled": False}, explain={"enabled": False}, learn={"parts": 12, "refine": True})
    rt = start(cfg)
    try:
        for i in range(len(truth)):
            rt.trigger(f"p{i}")
        wait_until(lambda: rt.counts["parts"] == 3, 60, "3 parts")
        assert rt.health()["refining"]["collected"] == 3
        write_stream(tmp_path / "offline", 10, defect_rate=0.0, seed=13)
        refined = refine(default_pack, sorted((tmp_path / "offline").glob("*.png")), tmp_path / "state",
                         quiet=True, log=lambda m: None).state
        out = rt.manager.run_job("reload")
        assert out["threshold"] == pytest.approx(refined.calibration.threshold, rel=1e-5)
        assert rt.health()["refining"] is None and rt.health()["references"] == len(refined.references)
        assert not list((tmp_path / "var" / "refining").glob("*.png"))  # what it had kept is dropped
    finally:
        rt.stop()
