"""The line runtime: `anomaly-edge run --config station.yaml`; the composition root of one station.

    capture ──▶ score ──▶ output (edge.line.pipeline) ──▶ PartRecorder (edge.line.recorder): store,
                                                          outbox→MQTT, PLC sinks, explanation worker
    StationManager (edge.line.station_manager): the models and the maintenance queue (enroll-good, reload,
                                                learn, deploy, rollback), one job at a time
    CommandHandler (edge.line.command_handler): P/cmd/* and PLC commands, replies on P/reply
    HealthLoop (edge.line.health): status, watchdog, retention;  LocalApi (edge.line.api) over a StationPort

Owns building these, starting them in order, the ordered stop and the signals. Must not score, record,
build payloads or change models itself: each of those lives in the module named above.
"""
from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from pathlib import Path

from edge.errors import EdgeError
from edge.inference.backend import scoring_device
from edge.line import health, messages
from edge.line.command_handler import CommandHandler
from edge.line.config import StationConfig, load_config, mqtt_password
from edge.line.notify import SystemdNotifier
from edge.line.pipeline import Pipeline
from edge.line.recorder import PartRecorder
from edge.line.sources import ReconnectingSource, make_source
from edge.line.station_manager import StationManager, load_models
from edge.line.store import TraceStore
from edge.station.station_lock import StationLock

log = logging.getLogger(__name__)


class Runtime:
    """One station: source, scorer, store, MQTT, local API, health. `start()`, then `stop()`."""

    def __init__(self, config: StationConfig, config_path: str | Path | None = None, exit_at_end: bool = False):
        self.config_path = Path(config_path) if config_path else None
        self.exit_at_end = exit_at_end
        self.station = config.station.name
        self.commands = CommandHandler(self)
        # The encoder backend of the whole station (TensorRT engines and GPU banks live on the process's
        # device thread, edge.inference.device); the state's threshold must have been calibrated with its numerics.
        self.manager = StationManager(config, self.config_path, None, self.commands.reply)
        if self.manager.deploy_note:
            log.error("%s", self.manager.deploy_note)
        config = self.manager.config
        self.store = TraceStore(config.storage.dir, config.storage.retention_days, config.storage.disk_budget_mb,
                                config.storage.min_free_mb)
        self.manager.store = self.store
        self.publisher = None
        self.sinks: list = []  # edge.line.plc: Sparkplug B, OPC UA
        self.explainer = None
        self.explain_error: str | None = None
        self.projector = None
        self.api = None
        self.notifier = SystemdNotifier()
        self.lock = StationLock(config.storage.dir)
        self.stopped = threading.Event()    # everything is down
        self.started_at = time.time()
        self.counts = collections.Counter()
        self.pipeline = Pipeline(self, config.pipeline.capture_queue, config.pipeline.output_queue)
        self.recorder = PartRecorder(self)
        self.health_loop = health.HealthLoop(self)
        p = self.pipeline
        self._stop, self._source_done, self._queue, self._output = p.stop_event, p.source_done, p.queue, p.output
        self._threads = p.threads  # capture, score, output (tests and benches watch them)

        source = make_source(config.source)
        rc = config.source.reconnect
        self.source = ReconnectingSource(source, rc.initial_delay_s, rc.max_delay_s, self._on_source_state, self._stop)

    # The current models, held (and swapped together) by the station manager; read here by the PLC sinks,
    # edge.station.deploy's health, tests and benches.
    config = property(lambda self: self.manager.config)
    pack = property(lambda self: self.manager.pack)
    backend = property(lambda self: self.manager.backend)
    state = property(lambda self: self.manager.state)
    scorer = property(lambda self: self.manager.scorer)
    learner = property(lambda self: self.manager.learner)

    # -- what other parts of the station call ------------------------------------------------------

    def health(self) -> dict:
        return health.health(self)

    def trigger(self, part_id: str, request_id: str | None = None) -> None:
        """Inspect the next frame as part `part_id` (trigger.mode mqtt)."""
        self.commands.trigger(part_id, request_id)

    def command(self, name: str, payload: bytes) -> None:
        """A command from another protocol (edge.line.plc), handled as `<prefix>/cmd/<name>` would be."""
        self.commands.command(name, payload)

    def reload(self) -> dict:
        """Re-read the config file and the station state, now, in the caller's thread."""
        return self.manager.reload()

    def enroll_good(self, part_id: str, by: str) -> dict:
        """Enroll a stored part as good, now, in the caller's thread."""
        return self.manager.enroll_good(part_id, by)

    def _on_source_state(self, state: str, detail: str) -> None:
        self.counts[f"source_{state}"] += 1
        health.publish_source_state(self)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "Runtime":
        """Refuses (StationLockError, naming the owner's PID) when another station runs on storage.dir."""
        self.lock.acquire()
        try:
            return self._start()
        except BaseException:
            self.lock.release()
            raise

    def _start(self) -> "Runtime":
        c = self.config
        self.store.enforce_retention()
        self.commands.replay_triggers()  # before the broker can hand over new ones
        if c.mqtt.enabled:
            from edge.line.publish import MqttPublisher

            tls = c.mqtt.tls
            self.publisher = MqttPublisher(
                Path(c.storage.dir) / "outbox.sqlite", host=c.mqtt.host, port=c.mqtt.port,
                topic_prefix=c.topic_prefix, client_id=c.mqtt.client_id or f"anomaly-edge-{c.station.line}-{self.station}",
                username=c.mqtt.username, password=mqtt_password(c), keepalive=c.mqtt.keepalive,
                tls_ca=tls.ca if tls else None, tls_cert=tls.cert if tls else None, tls_key=tls.key if tls else None,
                reconnect_min_delay=1, reconnect_max_delay=10, persistent_session=True, connect=False,
                online_status=self.health)
            self.store.siblings.append(self.publisher.outbox)
            self.recorder.replay_unpublished()
            self.publisher.subscribe("cmd/+", self.commands.on_command)
            # Connected once the handler is in place: the persistent session hands over at once the
            # commands the broker kept for us while we were away.
            self.publisher.connect()
        from edge.line.plc import start_sinks

        self.sinks = start_sinks(self)
        self._start_explainer()
        if c.api.enabled:
            from edge.line.api import LocalApi
            from edge.line.api_port import StationPort

            port = StationPort(self.store, lambda: self.explainer, lambda: self.explain_error, self.health,
                               self.manager.run_job)
            self.api = LocalApi(port, c.api_socket, mode=int(c.api.mode, 8), group=c.api.group,
                                tcp=(c.api.tcp_host, c.api.tcp_port) if c.api.tcp_port else None,
                                token_file=c.api.token_file, read_timeout_s=c.api.read_timeout_s).start()
        self.pipeline.start()
        self.manager.start()
        self.health_loop.start()
        self.notifier.ready(messages.status_line(self.health()))
        if self.backend is not None:
            log.info("%s", scoring_device(self.backend, getattr(self.scorer, "bank", None)))
        log.info("station %s running: pack %s, source %s, trigger %s, threshold %.4f", self.station,
                 self.pack.model_id, self.source.name, c.trigger.mode,
                 self.scorer.threshold if self.scorer is not None else float("nan"))
        if self.learner is not None:
            log.info("learn mode: no state in %s yet; building it from the first %d parts (%d collected)",
                     c.state, self.learner.parts, self.learner.progress()["collected"])
            if self.learner.full():  # collected before a restart, not built yet
                self.manager.submit("learn")
        if self.manager.refiner is not None and self.manager.refiner.full():  # the same for learn.refine
            self.manager.submit("refine")
        return self

    def _start_explainer(self) -> None:
        """The LLM worker, when the pack has a language model and explanations are enabled. The model
        runs in a supervised child process (edge.explain.llm_process); one that cannot be loaded, or whose process
        dies loading it, turns explanations off (logged, in health); the line keeps running."""
        spec = self.config.explain
        if not (spec.enabled and (self.pack.llm is not None or spec.backend == "remote")):
            return
        try:
            from edge.explain.dialogue import DialogueStore
            from edge.explain.worker import ExplainWorker

            local_llm = spec.backend == "local" or spec.remote.fallback_local  # a remote server gets findings only
            if local_llm and self.pack.llm is not None and self.pack.llm.kind == "anomalygpt":
                from edge.scoring.anomalygpt import Projector

                self.projector = Projector(self.pack, threads=1)
            store = DialogueStore(Path(self.config.storage.dir) / "dialogue.sqlite")
            self.store.siblings.append(store)
            self.explainer = ExplainWorker(self.pack, store, self.recorder.on_explanation, queue_size=spec.queue_size,
                                           n_threads=spec.threads, max_tokens=spec.max_tokens,
                                           time_limit_s=spec.time_limit_s, max_attempts=spec.max_attempts,
                                           max_crashes=spec.max_crashes, llm=remote_answerer(self.pack, spec)).start()
        except (ImportError, EdgeError) as e:
            self.explain_error = str(e)
            log.error("explanations off: %s", e)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop capturing, score and output what is queued, flush the outbox, close everything."""
        if self.stopped.is_set():
            return
        self.notifier.stopping()
        self._stop.set()
        deadline = time.monotonic() + timeout
        self.pipeline.drain(deadline, then=self.manager.finish)
        self.manager.join(max(0.1, deadline - time.monotonic()))
        self.health_loop.join(max(0.1, deadline - time.monotonic()))
        # What the timeout cut short still leaves with a result: scored parts recorded as they are, queued
        # ones (or inside the scorer) recorded and published as errors that say so (triggered ones answer their PLC).
        self.recorder.record_leftovers(*self.pipeline.leftovers())
        if self.explainer is not None:
            self.explainer.stop(timeout=2.0)
            self.explainer.store.close()
        waiting = len(self.store.pending_triggers())
        if waiting:
            log.warning("%d accepted trigger(s) not inspected before the stop: they are replayed at the next start",
                        waiting)
        if self.api is not None:
            self.api.stop()
        from edge.line.plc import close_sinks

        close_sinks(self.sinks)
        if self.publisher is not None:
            # The retained source must not say "streaming" after the station is gone.
            health.publish_source_state(self, "stopped", "the station stopped")
            self.publisher.close(flush_timeout=max(0.5, deadline - time.monotonic()))
        self.source.close()
        self.store.close()
        self.notifier.close()
        self.lock.release()
        self.stopped.set()
        log.info("station %s stopped", self.station)

    def run_forever(self) -> int:
        """Serve until SIGTERM/SIGINT (or the end of a finite source with exit_at_end); SIGHUP reloads."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.manager.submit("reload"))
        self.start()
        try:
            while not self._stop.is_set():
                if self.exit_at_end and self._source_done.is_set() and self.pipeline.idle():
                    break
                self._stop.wait(0.2)
        finally:
            self.stop()
        return 0


def check(config: StationConfig) -> str:
    """What `run --check` verifies beyond the config file: the models exactly as `run` loads them and
    the MQTT TLS files; returns a one-line summary, raises EdgeError naming what is wrong."""
    pack, _, state, scorer = load_models(config)
    tls = config.mqtt.tls
    if config.mqtt.enabled and tls is not None:
        from edge.line.publish import tls_context

        tls_context(tls.ca, tls.cert, tls.key)
    if config.api.enabled and config.api.tcp_port:
        from edge.line.api import LocalApi

        LocalApi(None, config.api_socket, token_file=config.api.token_file).read_token()  # readable, long enough
    if state is None:
        return (f"pack {pack.model_id}, learn mode: no state in {config.state} yet, built from the first "
                f"{config.learn.parts} parts")
    return (f"pack {pack.model_id}, state with {len(state.references)} references, scorer "
            f"{type(scorer).__name__}, threshold {scorer.threshold:.4f}")


def remote_answerer(pack, spec):
    """explain.backend remote: the server first, the pack's LLM in a local child as fallback if asked for."""
    if spec.backend != "remote":
        return None
    from edge.explain.llm_process import LlmProcess
    from edge.explain.remote_llm import RemoteFirst, RemoteLlm

    r = spec.remote
    local = None
    if r.fallback_local and pack.llm is not None:
        local = LlmProcess(pack, n_threads=spec.threads, max_tokens=spec.max_tokens, time_limit_s=spec.time_limit_s)
    return RemoteFirst(RemoteLlm(r.url, r.model, r.api_key_file, r.time_limit_s, r.retries,
                                 max_tokens=spec.max_tokens), local)


def run(config_path: str | Path, exit_at_end: bool = False) -> int:
    config = load_config(config_path)
    logging.getLogger().setLevel(config.log_level.upper())
    runtime = Runtime(config, config_path, exit_at_end=exit_at_end)
    return runtime.run_forever()

