"""What the local API (edge.line.api) may do to a station: read its health and parts, give feedback,
ask about a flagged part, and submit a job (reload, deploy, rollback, enroll-good) to the station
manager's maintenance queue, waiting for its outcome; the same queue MQTT commands go through.

Owns that narrow interface. Must not hand out the runtime, its store or its explainer whole.
"""
from __future__ import annotations

from edge.line.commands import EnrollGoodCommand


class StationPort:
    """`store`: the traceability store; `explainer`: a callable giving the explanation worker (or None)
    and `explain_error` why it is off; `health`: a callable giving the status snapshot; `run_job(kind,
    command)`: edge.line.station_manager.StationManager.run_job."""

    def __init__(self, store, explainer, explain_error, health, run_job):
        self._store, self._explainer, self._explain_error = store, explainer, explain_error
        self._health, self._run_job = health, run_job

    def health(self) -> dict:
        return self._health()

    def parts(self, limit: int, verdict: str | None, since: float | None, until: float | None,
              station: str | None) -> list:
        return self._store.query(limit=limit, verdict=verdict, since=since, until=until, station=station)

    def part(self, part_id: str) -> dict:
        """The part's row; StoreError naming the id when there is none."""
        return self._store.get(part_id)

    def set_feedback(self, part_id: str, label: str, by: str, note: str | None) -> dict:
        return self._store.set_feedback(part_id, label, by, note)

    def explain_unavailable(self) -> str | None:
        """None when the station can answer questions, else why not."""
        if self._explainer() is not None:
            return None
        error = self._explain_error()
        return (f"its language model could not be started: {error}" if error
                else "the pack has no llm section or explain.enabled is false")

    def check_dialogue(self, part_id: str) -> None:
        """DialogueError when the part has no dialogue to ask about."""
        self._explainer().store.session(part_id)

    def ask(self, part_id: str, question: str, on_token=None, timeout: float = 120) -> str:
        if on_token is None:
            return self._explainer().ask(part_id, question, timeout=timeout)
        return self._explainer().ask(part_id, question, on_token=on_token, timeout=timeout)

    def reload(self) -> dict:
        return self._run_job("reload", None)

    def deploy(self, command) -> dict:
        return self._run_job("deploy", command)

    def rollback(self, command) -> dict:
        return self._run_job("rollback", command)

    def enroll_good(self, part_id: str, by: str) -> dict:
        # Built without the MQTT payload's checks: the API has checked its own fields.
        return self._run_job("enroll-good", EnrollGoodCommand.model_construct(part_id=part_id, by=by))
