"""The station's models and the one path that changes them: enroll-good, reload, learn-mode build,
deploy and rollback all run as jobs on one maintenance thread, one at a time, whether they come from
MQTT (P/cmd/*, answered on P/reply), the local API (which waits for the job's outcome) or SIGHUP.

Owns the current config, pack, backend, state, scorer and learner, the lock that swaps them together,
and `station_scorer`, the one call through which the line builds a scorer (edge.scoring.factory). Must
not publish payloads itself (the runtime's command handler replies), touch the pipeline's queues or
serve HTTP.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from edge.errors import EdgeError
from edge.inference.backend import create_backend
from edge.line.commands import CommandError, DeployCommand
from edge.line.config import StationConfig, load_config
from edge.line.config_reload import changed_keys, needs_restart, with_reloaded
from edge.line.store import iso_time
from edge.pack import load_pack
from edge.inference.features import FeatureExtractor
from edge.scoring.student import StudentScorer
from edge.scoring.factory import build_scorer
from edge.station.deploy import keep_deployed, run_deploy, run_rollback, start_models
from edge.station.engine_calibration import follow_engine
from edge.station.line_learning import LineLearner
from edge.station.enrollment import enroll
from edge.station.state import load_state

log = logging.getLogger(__name__)


def station_scorer(pack, state, config: StationConfig, backend, replacing=None):
    """The scorer the station runs for `state` (an undertrained student refused), through the one factory;
    `replacing`: the scorer it takes over from, whose encoder session it keeps (not a student's)."""
    return build_scorer(pack, state, config.tiling_spec(), backend=backend, kind=config.scorer,
                        allow_undertrained=config.student_allow_undertrained, cpu_scoring=config.gpu.cpu_scoring,
                        replacing=replacing)


def load_models(config: StationConfig):
    """(pack, backend, state, scorer) as the station runs them: the pack's files checked against their sha256, the
    state's schema, hashes and encoder against the pack, the scorer built (an undertrained student refused).
    In learn mode with no state yet: (pack, backend, None, None)."""
    pack = load_pack(config.pack)
    backend = create_backend(pack, config.gpu.backend, gpu=config.gpu.options())
    if config.learn is not None and not (Path(config.state) / "state.yaml").is_file():
        return pack, backend, None, None
    state = follow_engine(pack, load_state(config.state, pack), FeatureExtractor(pack, backend),
                          config.gpu.on_calibration_mismatch, config.tiling_spec())
    return pack, backend, state, station_scorer(pack, state, config, backend)


class StationManager:
    """The models of one station and the maintenance jobs that change them. `store`: the traceability
    store (parts to enroll, flagged parts for a deployment's trial); `reply(kind, request_id, ok, **fields)`
    answers on P/reply."""

    def __init__(self, config: StationConfig, config_path: Path | None, store, reply):
        self.config_path = config_path
        self.store = store
        self.reply = reply
        # The pack and state deployed last (edge.station.deploy), the previous ones if those fail to load.
        self.config, models, self.deploy_note = start_models(config, load_models)
        self.pack, self.backend, self.state, self.scorer = models
        self.deploy_last: dict | None = None
        self.learner: LineLearner | None = None
        if self.scorer is None:
            # Learn mode: no state yet; the first learn.parts parts build it (edge.station.line_learning).
            c = self.config
            self.learner = LineLearner(self.pack, c.state, c.storage.dir, c.learn.parts, c.learn.suspect_z,
                                       c.target_false_reject)
        self.refiner: LineLearner | None = self._refiner_for(self.state)
        self.jobs: queue.Queue = queue.Queue()
        self._state_lock = threading.Lock()  # one enrollment or reload at a time
        self._thread: threading.Thread | None = None

    # -- the maintenance queue ----------------------------------------------------------------

    def submit(self, kind: str, command=None, reply: bool = True) -> Future:
        """Queue a job (reload, learn, enroll-good, deploy, rollback). `reply`: answer it on P/reply (MQTT,
        SIGHUP); the returned future holds the job's reply fields or its error either way."""
        done: Future = Future()
        self.jobs.put((kind, command, reply, done))
        return done

    def run_job(self, kind: str, command=None) -> dict:
        """Submit a job and wait for its outcome (the local API): raises the job's error."""
        return self.submit(kind, command, reply=False).result()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._maintenance_loop, name="edge-maintenance", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """No job after those queued now: the maintenance thread ends once it has run them."""
        self.jobs.put(None)

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _maintenance_loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                break
            kind, command, reply, done = job
            rid = getattr(command, "request_id", None)
            try:
                result = self._run(kind, command)
            except Exception as e:
                log.warning("%s failed: %s", kind, e)
                done.set_exception(e)
                if reply:
                    step = {"step": e.step, "done": True} if hasattr(e, "step") else {}
                    self.reply(kind, rid, False, error=str(e), **step)
            else:
                done.set_result(result)
                if reply:
                    self.reply(kind, rid, True, **result)
        while True:  # the station stopped: nothing queued is waited on forever
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job[3].set_exception(CommandError(f"{job[0]}: not carried out: the station stopped"))

    def _run(self, kind: str, command) -> dict:
        if kind == "reload":
            return self.reload()
        if kind == "learn":
            return self.learn_state()
        if kind == "refine":
            return self.refine_state()
        if kind == "deploy":
            return self.deploy(command)
        if kind == "rollback":
            return self.rollback(getattr(command, "request_id", None))
        return self.enroll_good(command.part_id, command.by)

    # -- the jobs -----------------------------------------------------------------------------

    def threshold(self) -> float | None:
        return round(self.scorer.threshold, 6) if self.scorer is not None else None

    def collect_for_learning(self, part) -> dict:
        """Learn mode: keep the part's frame for the state being learned (a part that arrives while the
        state is being built, or after a failed attempt filled nothing, is still answered `learning`)."""
        learner = self.learner
        if learner is None:  # learned while this part waited in the queue
            return {"collected": None, "of": None, "note": "arrived while the learned state was being installed; not scored"}
        try:
            progress, full = learner.add(part.part_id, part.frame.image)
        except Exception as e:
            log.warning("learn mode: part %s not kept: %s", part.part_id, e)
            return {**learner.progress(), "error": str(e)}
        if full:
            log.info("learn mode: %d parts collected; building the station state", learner.parts)
            self.submit("learn")
        return progress

    def learn_state(self) -> dict:
        """Build the state from the collected parts and score from the next part on."""
        learner = self.learner
        with self._state_lock:
            state, summary = learner.build(log=log.info)
            state = self._state_for_backend(state)
            scorer = self._scorer_for(state)
            self.state, self.scorer, self.learner = state, scorer, None
        log.info("learn mode: state built from %d parts (%d set aside as suspect: %s); threshold %.4f",
                 summary["parts"], len(summary["suspects"]),
                 ", ".join(s["part_id"] for s in summary["suspects"]) or "none", scorer.threshold)
        return summary

    def _to_refine(self, state) -> bool:
        """Whether learn.refine applies to `state`: configured, a state, not refined or learned from the line
        yet, and enrolled from fewer than learn.parts references."""
        spec = self.config.learn
        if state is None or spec is None or not spec.refine:
            return False
        return "refined" not in state.info and "learn" not in state.info and len(state.references) < spec.parts

    def _refiner_for(self, state) -> LineLearner | None:
        """The collector that refines `state` from the line (learn.refine), or None where it does not apply."""
        if not self._to_refine(state):
            return None
        c, spec = self.config, self.config.learn
        refiner = LineLearner(self.pack, c.state, c.storage.dir, spec.parts, spec.suspect_z, c.target_false_reject,
                              refining=True, tiling=c.tiling_spec())
        log.info("learn.refine: the state from %d references is refined with the next %d parts (%d kept so far); "
                 "every part is scored as usual meanwhile", len(state.references), spec.parts,
                 refiner.progress()["collected"])
        return refiner

    def collect_for_refinement(self, part) -> dict | None:
        """Keep a scored part's frame for the refinement (the part that fills the collection queues it);
        returns {collected, of} for its result, or None once there is nothing to refine."""
        refiner = self.refiner
        if refiner is None:
            return None
        try:
            progress, full = refiner.add(part.part_id, part.frame.image)
        except Exception as e:
            log.warning("learn.refine: part %s not kept: %s", part.part_id, e)
            progress, full = {**refiner.progress(), "error": str(e)}, False
        if full:
            log.info("learn.refine: %d parts kept; refining the station state", refiner.parts)
            self.submit("refine")
        return {k: progress[k] for k in ("collected", "of", "error") if k in progress}

    def refine_state(self) -> dict:
        """Refine the state with the kept parts; the refined scorer scores from the next part on."""
        refiner = self.refiner
        if refiner is None:
            raise CommandError("refine: nothing to refine (learn.refine is off, or the state was refined already)")
        with self._state_lock:
            if self.state is None or "refined" in self.state.info:
                refiner.clear()
                self.refiner = None
                raise CommandError("refine: the state changed since the parts were kept; not refined")
            state, summary = refiner.build(log=log.info)
            state = self._state_for_backend(state)
            self.state, self.scorer, self.refiner = state, self._scorer_for(state), None
        log.info("learn.refine: %d parts kept of %d (%d set aside as suspect: %s); references %d -> %d, threshold "
                 "%.4f -> %.4f", summary["kept"], summary["parts"],
                 len(summary["suspects"]), ", ".join(s["part_id"] for s in summary["suspects"]) or "none",
                 summary["references_before"], summary["references"], summary["threshold_before"],
                 self.scorer.threshold)
        return summary

    def enroll_good(self, part_id: str, by: str) -> dict:
        """A stored part is good: add its image to the station's references, rebuild the bank,
        recalibrate, and score with the new state from the next frame on."""
        if self.scorer is None:
            raise CommandError("enroll-good: the station is in learn mode and has no state yet; it builds one "
                               "from its first learn.parts parts")
        row = self.store.get(part_id)
        image = row["files"].get("image")
        if not image:
            raise CommandError(f"enroll-good: part {part_id!r} has no stored image (storage.keep_images is "
                               f"{self.config.storage.keep_images!r}, or its files were removed by retention)")
        if row["verdict"] == "anomalous" and row.get("feedback") is None:
            self.store.set_feedback(part_id, "false_alarm", by, "enrolled as good")
        old = self.scorer.threshold
        with self._state_lock:
            state = enroll(self.pack, [Path(image)], self.config.state, quiet=True, log=log.info,
                           extractor=FeatureExtractor(self.pack, self.backend),
                           tiling=self.config.tiling_spec(), target_false_reject=self.config.target_false_reject)
            self.state = state
            self.scorer = self._scorer_for(state)
        log.info("enrolled part %s as good (by %s): %d references, threshold %.4f -> %.4f", part_id, by,
                 len(state.references), old, self.scorer.threshold)
        reply = {"part_id": part_id, "references": len(state.references), "threshold_before": round(old, 6),
                 "threshold": round(self.scorer.threshold, 6)}
        if isinstance(self.scorer, StudentScorer):
            # Training needs torch and minutes of CPU: not on the line.
            reply["note"] = ("added to the references and the bank; the learned scorer was not retrained: run "
                             f"anomaly-edge enroll --scorer student --out {self.config.state} off the line to include it")
        return reply

    def switch_models(self, config: StationConfig, models, expect_state=None) -> None:
        """Swap pack, backend, state and scorer together (edge.station.deploy); the score loop takes the next batch's
        scorer from here. The explainer keeps the LLM it started with until a restart. `expect_state`: refuse
        (CommandError) if an enrollment or reload replaced the state since the models were built."""
        with self._state_lock:
            if expect_state is not None and self.state is not expect_state:
                raise CommandError("the station state changed during the deployment (an enrollment or reload); "
                                   "nothing switched: send it again")
            self.config = config
            self.pack, self.backend, self.state, self.scorer = models
            if self.refiner is not None:  # parts kept for the state it replaces
                self.refiner.clear()
            self.refiner = self._refiner_for(self.state)

    def deploy(self, command: DeployCommand) -> dict:
        """Verify, trial-score and switch to a pack (and state); every step is replied on P/reply."""
        def progress(step, **fields):
            self.reply("deploy", command.request_id, True, step=step, done=False, **fields)
        return self._deploy_outcome(command.request_id, lambda: run_deploy(self, command, load_models, progress))

    def rollback(self, request_id: str | None = None) -> dict:
        def progress(step, **fields):
            self.reply("rollback", request_id, True, step=step, done=False, **fields)
        return self._deploy_outcome(request_id, lambda: run_rollback(self, load_models, progress))

    def _deploy_outcome(self, request_id, attempt) -> dict:
        try:
            result = attempt()
        except EdgeError as e:
            self.deploy_last = {"request_id": request_id, "ok": False, "step": getattr(e, "step", None),
                                "error": str(e)[:500], "time": iso_time(time.time())}
            raise
        self.deploy_last = {"request_id": request_id, "ok": True, "model_id": result["model_id"],
                            "time": iso_time(time.time())}
        log.info("deployed: now on pack %s (%s)", result["model_id"], result["pack_dir"])
        return result

    def _state_for_backend(self, state):
        """The state, or (gpu.on_calibration_mismatch: recalibrate) it recalibrated for this backend."""
        return follow_engine(self.pack, state, FeatureExtractor(self.pack, self.backend),
                             self.config.gpu.on_calibration_mismatch, self.config.tiling_spec())

    def _scorer_for(self, state):
        # load_models' call; the new scorer keeps the encoder session of the one it replaces (not a student's).
        return station_scorer(self.pack, state, self.config, self.backend, replacing=self.scorer)

    def reload(self) -> dict:
        """Re-read the config file (applying what can be applied live) and the station state."""
        applied, restart = [], []
        if self.config_path is not None:
            new = keep_deployed(load_config(self.config_path), self.config)  # edge.station.deploy's pack stays
            keys = changed_keys(self.config, new)
            restart = needs_restart(keys)
            applied = [k for k in keys if k not in restart]
            self.config = with_reloaded(self.config, new)
            self.store.retention_days = new.storage.retention_days
            self.store.disk_budget_mb = new.storage.disk_budget_mb
            self.store.min_free_mb = new.storage.min_free_mb
            logging.getLogger().setLevel(new.log_level.upper())
            if restart:
                log.warning("reload: %s changed but need a restart to take effect", ", ".join(restart))
        if self.scorer is None:
            log.info("reloaded: applied %s; still learning (no state yet)", applied or "nothing new")
            return {"applied": applied, "needs_restart": restart, "threshold": None,
                    "learning": self.learner.progress() if self.learner else None}
        with self._state_lock:
            state = self._state_for_backend(load_state(self.config.state, self.pack))
            scorer = self._scorer_for(state)  # may refuse (an undertrained student): the old pair keeps scoring
            self.state, self.scorer = state, scorer
            if self.refiner is not None and not self._to_refine(state):  # refined off the line meanwhile
                self.refiner.clear()
                self.refiner = None
        log.info("reloaded: applied %s; threshold %.4f", applied or "nothing new", self.scorer.threshold)
        return {"applied": applied, "needs_restart": restart, "threshold": round(self.scorer.threshold, 6)}
