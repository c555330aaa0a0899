"""The learned scorer: training on synthetic good parts, resume, export check, time budget, bad input,
the station state and the CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training the student needs the export extra (torch)")

from conftest import ROOT, SHARED_DATA, run_cli  # noqa: E402

from edge.errors import StateError  # noqa: E402
from edge.evaluation.metrics import auroc  # noqa: E402
from edge.scoring.scorer import Scorer  # noqa: E402
from edge.station.enrollment import enroll  # noqa: E402
from edge.station.state import load_state  # noqa: E402
import edge.scoring.student  # noqa: E402
from edge.scoring.student import DEFAULT_SCORER, StudentScorer, StudentSpec, StudentTraining  # noqa: E402
from edge.scoring.factory import build_scorer  # noqa: E402
from edge.line.synthetic import SyntheticLine, apply_defect, write_good_parts  # noqa: E402
from export.student import (TrainConfig, TrainError, _Teacher, export_student, position_statistics,  # noqa: E402
                            raw_maps, train, train_student)

torch.set_num_threads(2)
FAST = dict(steps=40, batch_size=4, lr=2e-3, width=64, threads=2)


@pytest.fixture(scope="module")
def line():
    return SyntheticLine(seed=7, defect_rate=0.5)


@pytest.fixture(scope="module")
def good(line):
    return line.good(14)


@pytest.fixture(scope="module")
def trained(default_pack, good, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    return train_student(default_pack, good, out, TrainConfig(**FAST), quiet=True), out


def _test_parts(line, n=6):
    rng = np.random.default_rng(1)
    fresh = SyntheticLine(seed=99).good(n)
    kinds = ["hole", "stain", "missing_chunk"]
    return fresh, [apply_defect(g, kinds[i % 3], rng)[0] for i, g in enumerate(fresh)]


def test_training_lowers_the_loss_and_separates_defects(default_pack, line, trained):
    spec, out = trained
    assert spec.info["config"]["steps"] == FAST["steps"] and spec.info["steps"] == FAST["steps"]
    scorer = StudentScorer.from_spec(default_pack, out, spec)
    good_parts, defective = _test_parts(line)
    scores = [r.score for r in scorer.score(good_parts + defective)]
    assert auroc(np.array(scores), np.array([0] * len(good_parts) + [1] * len(defective))) >= 0.8, scores


def test_loss_goes_down(default_pack, good):
    t = train(default_pack, good, TrainConfig(**{**FAST, "steps": 60}), quiet=True, log=lambda m: None)
    assert np.mean(t.losses[-5:]) < 0.8 * np.mean(t.losses[:5]), t.losses


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(default_pack, good, tmp_path):
    cfg = dict(FAST, steps=6, checkpoint_every=1)
    whole = train(default_pack, good, TrainConfig(**cfg), quiet=True, log=lambda m: None)
    ck = tmp_path / "student.ckpt"

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt  # as if the process were stopped after step 3

    with pytest.raises(KeyboardInterrupt):
        train(default_pack, good, TrainConfig(**{**cfg, "checkpoint": str(ck)}), quiet=True, log=lambda m: None,
              on_step=crash)
    notes = []
    resumed = train(default_pack, good, TrainConfig(**{**cfg, "checkpoint": str(ck)}), quiet=True, log=notes.append)
    assert any("resuming" in n and "step 3" in n for n in notes), notes
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    for (name, a), b in zip(whole.head.state_dict().items(), resumed.head.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=name)


def test_exported_graph_matches_the_torch_forward(default_pack, good, tmp_path):
    t = train(default_pack, good, TrainConfig(**{**FAST, "steps": 5}), quiet=True, log=lambda m: None)
    teacher = _Teacher(default_pack)
    mean, std = position_statistics(raw_maps(t.head, teacher, t.pixels[t.holdout_idx]))
    t.head.pos_mean, t.head.pos_std = torch.from_numpy(mean), torch.from_numpy(std)
    path, err = export_student(default_pack, t.head, teacher, t.pixels, tmp_path, log=lambda m: None)
    assert err <= 1e-4
    # Independently: the fused graph on new frames against teacher features + the torch head.
    scorer = StudentScorer(default_pack, path, threshold=1.0)
    batch = teacher.normalise(t.pixels[-3:].astype(np.float32))
    got = scorer.extractor.backend.run(batch)
    with torch.no_grad():
        want = t.head(torch.from_numpy(batch), torch.from_numpy(teacher.features(batch))).numpy()
    assert got.shape == (3, 1, *default_pack.encoder.feature_shape[1:])
    assert np.abs(got - want).max() <= 1e-4


def test_time_budget_stops_cleanly_with_a_usable_model(default_pack, line, good, tmp_path):
    ck = tmp_path / "budget.ckpt"
    spec = train_student(default_pack, good, tmp_path, TrainConfig(**{**FAST, "steps": 100_000, "time_budget_s": 3,
                                                                      "checkpoint": str(ck)}),
                         quiet=True, log=lambda m: None)
    assert spec.info["stopped_by_time_budget"] and 0 < spec.info["steps"] < 100_000
    t = spec.training
    assert (t.status, t.stopped_by, t.steps_planned, t.time_budget_s) == ("undertrained", "time_budget", 100_000, 3)
    assert t.steps_done == spec.info["steps"] and t.checkpoint == str(ck.resolve())
    assert "stopped by the 3 s time budget after" in t.describe() and "of 100000 steps" in t.describe()
    assert ck.is_file()
    results = StudentScorer.from_spec(default_pack, tmp_path, spec).score(_test_parts(line, 2)[0])
    assert all(np.isfinite(r.score) and np.isfinite(r.anomaly_map).all() for r in results)


def test_bad_input_gets_a_clear_error(default_pack, good, tmp_path):
    with pytest.raises(TrainError, match="at least 3 good images"):
        train(default_pack, [], TrainConfig(**FAST), quiet=True)
    mixed = [good[0], good[1][:200, :180], good[2]]
    with pytest.raises(TrainError, match=r"b\.png: is 180x200 px, a\.png is 256x256"):
        train(default_pack, mixed, TrainConfig(**FAST, mixed_sizes="error"), names=["a.png", "b.png", "c.png"],
              quiet=True)
    ck = tmp_path / "corrupt.ckpt"
    ck.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="corrupt.ckpt: not a usable student checkpoint.*delete it"):
        train(default_pack, good, TrainConfig(**FAST, checkpoint=str(ck)), quiet=True)
    other = tmp_path / "other.ckpt"
    train(default_pack, good, TrainConfig(**{**FAST, "steps": 1, "checkpoint": str(other)}), quiet=True)
    with pytest.raises(TrainError, match="checkpoint is of another training run"):
        train(default_pack, good[:10], TrainConfig(**{**FAST, "checkpoint": str(other)}), quiet=True)


def test_station_state_holds_the_student(default_pack, good, trained, tmp_path):
    spec, out = trained
    good_dir = tmp_path / "good"
    paths = write_good_parts(good_dir, 6, seed=3)
    state_dir = tmp_path / "state"
    cfg = TrainConfig(**{**FAST, "steps": 5})
    enroll(default_pack, paths, state_dir, quiet=True, log=lambda m: None,
           train_student=lambda images, folder: train_student(default_pack, images, folder, cfg, quiet=True,
                                                              log=lambda m: None))
    state = load_state(state_dir, default_pack)
    assert state.student is not None and (state_dir / state.student.file).is_file()
    auto = build_scorer(default_pack, state, None, kind="auto")
    assert isinstance(auto, StudentScorer) == (DEFAULT_SCORER == "student")
    bank = build_scorer(default_pack, state, None, kind="bank")
    assert not isinstance(bank, StudentScorer) and bank.threshold == state.calibration.threshold
    student = build_scorer(default_pack, state, None, kind="student")
    assert student.threshold == state.student.calibration.threshold
    assert state.student.position_mean.shape == tuple(default_pack.encoder.feature_shape[1:])
    # Enrolling more good parts without --scorer student keeps the student (and says so).
    notes = []
    state2 = enroll(default_pack, write_good_parts(tmp_path / "more", 2, seed=8), state_dir, quiet=True,
                    log=notes.append)
    assert state2.student.sha256 == state.student.sha256 and any("kept the student" in n for n in notes)
    # A changed graph is refused by its sha256.
    graph = state_dir / state.student.file
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(StateError, match="does not match the sha256"):
        load_state(state_dir, default_pack)


def _enroll_student(pack, paths, state_dir, **cfg):
    config = TrainConfig(**{**FAST, **cfg})
    return enroll(pack, paths, state_dir, quiet=True, log=lambda m: None,
                  train_student=lambda images, folder: train_student(pack, images, folder, config, quiet=True,
                                                                     log=lambda m: None))


def test_budget_stopped_student_is_undertrained_never_auto_and_refused_until_resumed(default_pack, default_pack_dir,
                                                                                     tmp_path, monkeypatch):
    paths = write_good_parts(tmp_path / "good", 6, seed=5)
    state_dir, ck = tmp_path / "state", tmp_path / "student.ckpt"
    # A budget far below one step's time: exactly one of the 12 planned steps is done.
    _enroll_student(default_pack, paths, state_dir, steps=12, time_budget_s=1e-3, checkpoint=str(ck))
    state = load_state(state_dir, default_pack)  # the record survives state.yaml
    t = state.student.training
    assert (t.status, t.stopped_by, t.steps_done, t.steps_planned) == ("undertrained", "time_budget", 1, 12)
    assert t.final_loss is not None and np.isfinite(t.final_loss)
    # auto never picks it, even where the measured default would be the student.
    monkeypatch.setattr(edge.scoring.student, "DEFAULT_SCORER", "student")
    assert type(build_scorer(default_pack, state, None, kind="auto")) is Scorer
    with pytest.raises(StateError, match=r"student is undertrained: stopped by the 0.001 s time budget after 1 of "
                                         r"12 steps.*student\.ckpt.*--allow-undertrained"):
        build_scorer(default_pack, state, None, kind="student")
    allowed = build_scorer(default_pack, state, None, kind="student", allow_undertrained=True)
    assert isinstance(allowed, StudentScorer) and allowed.threshold == state.student.calibration.threshold
    # A station configured `scorer: student` refuses it at start, unless the config allows it by name.
    import yaml

    from edge.line.config import load_config
    from edge.line.runtime import Runtime
    from station_helpers import write_config

    (tmp_path / "station").mkdir()
    path = write_config(tmp_path / "station", default_pack_dir, state_dir, 1, {"kind": "synthetic", "count": 1})
    raw = {**yaml.safe_load(path.read_text()), "scorer": "student"}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StateError, match="student is undertrained.*student_allow_undertrained: true"):
        Runtime(load_config(path), path)
    path.write_text(yaml.safe_dump({**raw, "student_allow_undertrained": True}))
    assert isinstance(Runtime(load_config(path), path).scorer, StudentScorer)
    # The same enrollment again, without the budget, resumes from the checkpoint and completes.
    _enroll_student(default_pack, paths, state_dir, steps=12, checkpoint=str(ck))
    state = load_state(state_dir, default_pack)
    t = state.student.training
    assert (t.status, t.stopped_by, t.steps_done, t.steps_planned) == ("complete", "completed", 12, 12)
    assert isinstance(build_scorer(default_pack, state, None, kind="auto"), StudentScorer)
    assert isinstance(build_scorer(default_pack, state, None, kind="student"), StudentScorer)


def test_states_without_the_training_record_are_judged_from_their_info(trained):
    spec, _ = trained
    old = spec.to_dict()
    del old["training"]  # as written before the record existed
    assert StudentSpec.from_dict(old).training.status == "complete"
    budget = {**old, "info": {**old["info"], "stopped_by_time_budget": True, "steps": 7}}
    t = StudentSpec.from_dict(budget).training
    assert (t.status, t.stopped_by, t.steps_done, t.steps_planned) == ("undertrained", "time_budget", 7, FAST["steps"])
    assert StudentSpec.from_dict({**old, "info": {}}).training.status == "unknown"
    record = spec.training.to_dict()
    assert StudentTraining.from_dict(record).to_dict() == record
    with pytest.raises(ValueError, match="stopped_by 'crash'"):
        StudentTraining.from_dict({**spec.training.to_dict(), "stopped_by": "crash"})


def test_student_kind_without_a_student_is_refused(default_pack, tmp_path):
    state = enroll(default_pack, write_good_parts(tmp_path / "g", 3, seed=1), tmp_path / "s", quiet=True,
                   log=lambda m: None)
    assert type(build_scorer(default_pack, state, None, kind="auto")) is Scorer
    with pytest.raises(StateError, match="holds no student"):
        build_scorer(default_pack, state, None, kind="student")


def test_runtime_modules_never_import_torch():
    code = ("import sys, edge.line.runtime, edge.scoring.student, edge.station.state, edge.evaluation.evaluate, edge.cli.main; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_cli_enroll_and_score_with_the_student(default_pack_dir, tmp_path):
    state = tmp_path / "state"
    p = run_cli("enroll", "--pack", default_pack_dir, "--synthetic", 6, "--out", state, "--scorer", "student",
                "--steps", 5, "--quiet")
    assert "student student-" in p.stdout and "5 steps" in p.stdout
    assert "student student-" in p.stdout and "complete, completed 5 of 5 steps" in p.stdout
    assert "undertrained" not in p.stderr
    p = run_cli("score", "--pack", default_pack_dir, "--state", state, "--scorer", "student", "--json",
                *sorted((state / "good").iterdir())[:2])
    assert p.stdout.count('"score"') == 2
    (tmp_path / "empty").mkdir()
    p = run_cli("enroll", "--pack", default_pack_dir, "--good", tmp_path / "empty", "--out", tmp_path / "s2",
                "--scorer", "student", check=False)
    assert p.returncode == 2 and "no images found" in p.stderr


def test_cli_says_plainly_when_the_budget_stopped_the_student(default_pack_dir, synthetic_dataset, tmp_path):
    state = tmp_path / "state"
    p = run_cli("enroll", "--pack", default_pack_dir, "--synthetic", 6, "--out", state, "--scorer", "student",
                "--steps", 50, "--time-budget", 0.001, "--quiet")
    assert "warning: student undertrained: stopped by the 0.001 s time budget after 1 of 50 steps (loss " in p.stderr
    assert "the bank stays the active scorer" in p.stderr and "--checkpoint FILE" in p.stderr
    images = sorted((state / "good").iterdir())[:2]
    p = run_cli("score", "--pack", default_pack_dir, "--state", state, "--scorer", "student", *images, check=False)
    assert p.returncode == 2 and "student is undertrained" in p.stderr and "after 1 of 50 steps" in p.stderr
    p = run_cli("score", "--pack", default_pack_dir, "--state", state, "--scorer", "student", "--allow-undertrained",
                "--json", *images)
    assert p.stdout.count('"score"') == 2
    p = run_cli("score", "--pack", default_pack_dir, "--state", state, "--json", *images)  # auto: the bank
    assert p.stdout.count('"score"') == 2
    # eval: the same facts on the command line, in the JSON and in summary.md.
    out = tmp_path / "eval.json"
    p = run_cli("eval", "--pack", default_pack_dir, "--data", synthetic_dataset, "--scorer", "student", "--steps", 50,
                "--time-budget", 0.001, "--checkpoint", tmp_path / "eval.ckpt", "--json", out, "--quiet")
    assert "warning: student undertrained: stopped by the 0.001 s time budget after 1 of 50 steps" in p.stderr
    assert "run the same eval again (--checkpoint" in p.stderr
    training = json.loads(out.read_text())["student_training"]
    assert {k: training[k] for k in ("status", "steps_done", "steps_planned", "stopped_by")} == \
        {"status": "undertrained", "steps_done": 1, "steps_planned": 50, "stopped_by": "time_budget"}
    assert np.isfinite(training["final_loss"])
    summary = (tmp_path / "eval-report" / "summary.md").read_text()
    assert "scorer student (undertrained)" in summary and "**Undertrained student**: stopped by the 0.001 s" in summary


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "magnetic_tile").is_dir(), reason="../shared/data/magnetic_tile not present")
def test_magnetic_tile_16_shot_student(default_pack):
    from edge.evaluation.evaluate import evaluate

    cfg = TrainConfig(steps=300, threads=2)
    r = evaluate(default_pack, SHARED_DATA / "magnetic_tile", 16, quiet=True, log=lambda m: None,
                 train_student=lambda images, folder: train_student(default_pack, images, folder, cfg, quiet=True,
                                                                    log=lambda m: None))
    assert r["scorer"] == "student" and r["image_auroc"] > 0.6 and r["pixel_auroc"] > 0.6


@pytest.mark.timeout(240)
def test_line_runs_on_the_student(broker, default_pack, default_pack_dir, tmp_path):
    """A station configured `scorer: student` scores the synthetic line with its fused graph and
    publishes on a real broker; an enroll-good keeps the student and says it was not retrained."""
    import yaml

    from edge.line.config import load_config
    from edge.line.runtime import Runtime
    from mqtt_helpers import Subscriber, wait_until
    from station_helpers import write_config

    state_dir = tmp_path / "trained"
    cfg = TrainConfig(**{**FAST, "steps": 20})
    enroll(default_pack, write_good_parts(tmp_path / "good", 8, seed=3), state_dir, quiet=True, log=lambda m: None,
           train_student=lambda images, folder: train_student(default_pack, images, folder, cfg, quiet=True,
                                                              log=lambda m: None))
    source = {"kind": "synthetic", "seed": 0, "defect_rate": 0.3, "count": 10}
    path = write_config(tmp_path, default_pack_dir, state_dir, broker.port, source, storage={"keep_images": "all"})
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "scorer": "student"}))
    sub = Subscriber(broker.port, "test/s1/#")
    rt = Runtime(load_config(path), path).start()
    try:
        assert isinstance(rt.scorer, StudentScorer)
        student_threshold = rt.state.student.calibration.threshold
        wait_until(lambda: len(sub.unique_by_topic().get("test/s1/result", [])) >= 10, 60, "10 results")
        got = sub.unique_by_topic()["test/s1/result"]
        assert all(r["threshold"] == pytest.approx(student_threshold, abs=1e-6) for r in got), got
        assert all(np.isfinite(r["score"]) for r in got)
        reply = rt.enroll_good(got[0]["part_id"], "test")
        assert isinstance(rt.scorer, StudentScorer) and reply["threshold"] == pytest.approx(student_threshold, abs=1e-6)
        assert "not retrained" in reply["note"] and reply["references"] == 9
    finally:
        rt.stop()
    # A station asking for the student of a state that holds none is refused at start, by name.
    bank_only = tmp_path / "bank-only"
    enroll(default_pack, write_good_parts(tmp_path / "good2", 3, seed=4), bank_only, quiet=True, log=lambda m: None)
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "state": str(bank_only)}))
    with pytest.raises(StateError, match="holds no student"):
        Runtime(load_config(path), path)
