"""Carries out the station's commands (P/cmd/<name> over MQTT, or the same from a PLC protocol):
triggers go to the pipeline's trigger queue (durable in the store first), enroll-good, reload, deploy
and rollback to the station manager's maintenance queue; every command gets a reply on P/reply.

Owns accepting or refusing a command and the replies. Must not change models itself
(edge.line.station_manager runs the jobs) nor parse payloads (edge.line.commands).
"""
from __future__ import annotations

import logging
import time

from edge.errors import EdgeError
from edge.line import messages
from edge.line.commands import (CommandError, DeployCommand, EnrollGoodCommand, ReloadCommand, RollbackCommand,
                                TriggerCommand, parse_command, request_id_of)

log = logging.getLogger(__name__)


class CommandHandler:
    """The commands of the runtime `rt` (edge.line.runtime): its config, store, publisher, pipeline,
    manager and counts."""

    def __init__(self, rt):
        self.rt = rt

    def reply(self, command: str, request_id: str | None, ok: bool, **fields) -> None:
        if self.rt.publisher is not None:
            self.rt.publisher.publish("reply", messages.reply_message(command, request_id, ok, fields, time.time()))

    def on_command(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Every command gets a reply on P/reply; a refused one is also logged and counted (bad_commands)."""
        rt = self.rt
        name = topic.rsplit("/", 1)[-1]
        try:
            if retained:
                # A retained command is an old order replayed by the broker at each (re)connect:
                # acting on it would trigger, enroll or reload again on every reconnection.
                raise CommandError(f"{name}: ignored because it is retained (the broker replays it at every "
                                   "connect); publish commands with retain false, and clear this one by publishing "
                                   f"an empty retained message to {topic}")
            command = parse_command(name, payload)
            if isinstance(command, TriggerCommand):
                self.trigger(command.part_id, command.request_id)
                self.reply(name, command.request_id, True, part_id=command.part_id, queued=True)
            elif isinstance(command, EnrollGoodCommand):
                rt.store.get(command.part_id)  # unknown ids are answered now, not after a queue
                rt.manager.submit("enroll-good", command)
            elif isinstance(command, ReloadCommand):
                rt.manager.submit("reload", command)
            elif isinstance(command, (DeployCommand, RollbackCommand)):
                self.reply(name, command.request_id, True, step="queued", done=False)
                rt.manager.submit(name, command)
        except Exception as e:  # EdgeError: refused as sent; anything else is ours, still answered
            rt.counts["bad_commands"] += 1
            error = str(e) if isinstance(e, EdgeError) else f"{name}: not carried out: {type(e).__name__}: {e}"
            (log.warning if isinstance(e, EdgeError) else log.exception)("command on %s refused: %s", topic, error)
            self.reply(name, request_id_of(payload), False, error=error, **({"retained": True} if retained else {}))

    def command(self, name: str, payload: bytes) -> None:
        """A command from another protocol (edge.line.plc), handled as `<prefix>/cmd/<name>` would be."""
        self.on_command(f"{self.rt.config.topic_prefix}/cmd/{name}", payload)

    def trigger(self, part_id: str, request_id: str | None = None) -> None:
        """Inspect the next frame as part `part_id` (trigger.mode mqtt)."""
        rt, pipeline = self.rt, self.rt.pipeline
        if rt.config.trigger.mode != "mqtt":
            raise CommandError(f"trigger: this station runs trigger.mode {rt.config.trigger.mode}; "
                               "set trigger.mode: mqtt to inspect parts on command")
        with pipeline.ids_lock:
            if part_id in pipeline.queued_ids:
                raise CommandError(f"trigger: part {part_id!r} is already waiting to be inspected")
            try:
                rt.store.get(part_id)
                known = True
            except EdgeError:
                known = False
            if known:
                raise CommandError(f"trigger: part {part_id!r} was already inspected; send a new part id")
            pipeline.queued_ids.add(part_id)
            # Durable before it is acknowledged: a stop or crash from here on replays it at the next start.
            rt.store.add_trigger(part_id, request_id)
        pipeline.triggers.put((part_id, "mqtt", request_id))

    def replay_triggers(self) -> int:
        """Triggers accepted before the last stop or crash whose part was never recorded: inspected now,
        before new ones, under the part ids the PLC sent."""
        rt, pipeline = self.rt, self.rt.pipeline
        pending = rt.store.pending_triggers()
        if pending and rt.config.trigger.mode != "mqtt":
            log.warning("%d trigger(s) accepted before the last stop are kept for trigger.mode mqtt "
                        "(this start runs %s)", len(pending), rt.config.trigger.mode)
            return 0
        with pipeline.ids_lock:
            for part_id, request_id in pending:
                pipeline.queued_ids.add(part_id)
                pipeline.triggers.put((part_id, "mqtt", request_id))
        if pending:
            log.warning("replaying %d trigger(s) accepted before the last stop", len(pending))
        return len(pending)
