"""Commands from the PLC/MES over MQTT (`<prefix>/cmd/<name>`, JSON) and from the local API.

Payloads are UTF-8 JSON objects of at most 16 kB; an empty payload (what clearing a retained message
looks like) is refused, not read as `{}`, and a retained command is not executed (edge.line.runtime).
Each command's body is validated; anything malformed raises `CommandError` naming what is wrong, and
the runtime answers it on `<prefix>/reply` with `ok: false` instead of acting on a guess.

    cmd/trigger      {"part_id": "A-1234", "request_id": "optional"}   inspect the next frame as this part
    cmd/enroll-good  {"part_id": "A-1234", "by": "jane"}              a stored part is good: add it to the
                                                                     memory bank and recalibrate
    cmd/reload       {}                                                re-read the config and station state
    cmd/deploy       {"pack": "URL or path", "sha256": "...", "state": "optional", "state_sha256": "..."}
                                                                     verify, trial-score and switch to a pack
                                                                     (edge.station.deploy; progress on P/reply)
    cmd/rollback     {}                                                back to the previous pack and state

Owns the command payloads' validation. Must not carry a command out (edge.line.command_handler does).
"""
from __future__ import annotations

import json
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge.line.config import PART_ID_PATTERN
from edge.errors import EdgeError

MAX_COMMAND_BYTES = 16384
_REQUEST_ID = re.compile(r'"request_id"\s*:\s*"([^"\\]{1,128})"')


class CommandError(EdgeError):
    """A command that cannot be carried out as sent."""


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str | None = Field(default=None, max_length=128)


class TriggerCommand(_Command):
    part_id: str = Field(pattern=PART_ID_PATTERN.pattern)


class EnrollGoodCommand(_Command):
    part_id: str = Field(pattern=PART_ID_PATTERN.pattern)
    by: str = Field(default="mqtt", min_length=1, max_length=64)


class ReloadCommand(_Command):
    pass


_SHA256 = r"^[0-9a-fA-F]{64}$"


class DeployCommand(_Command):
    pack: str = Field(min_length=1, max_length=4096)
    sha256: str = Field(pattern=_SHA256)
    state: str | None = Field(default=None, min_length=1, max_length=4096)
    state_sha256: str | None = Field(default=None, pattern=_SHA256)

    @model_validator(mode="after")
    def _state_with_its_hash(self):
        if (self.state is None) != (self.state_sha256 is None):
            raise ValueError("state and state_sha256 go together")
        return self


class RollbackCommand(_Command):
    pass


COMMANDS = {"trigger": TriggerCommand, "enroll-good": EnrollGoodCommand, "reload": ReloadCommand,
            "deploy": DeployCommand, "rollback": RollbackCommand}


def _decode(name: str, payload: bytes | str) -> object:
    """The JSON body of a payload: UTF-8 only, never an exception other than CommandError."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"{name}: payload of {len(payload)} bytes is over the {MAX_COMMAND_BYTES}-byte limit")
    if not payload:
        # What clearing a retained command looks like; it is not `{}`, whatever the command.
        raise CommandError(f"{name}: empty payload (a retained message being cleared?); send {{}} for a command "
                           "without fields")
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CommandError(f"{name}: payload is not UTF-8 (byte 0x{payload[e.start]:02x} at offset {e.start}); "
                               "commands are UTF-8 JSON") from None
    try:
        return json.loads(payload)
    except RecursionError:
        raise CommandError(f"{name}: payload is not JSON the station accepts (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and an integer over Python's digit limit
        raise CommandError(f"{name}: payload is not JSON ({str(e)[:200]})") from None


def parse_command(name: str, payload: bytes | str) -> _Command:
    if name not in COMMANDS:
        raise CommandError(f"unknown command {name!r}; known: {', '.join(COMMANDS)}")
    body = _decode(name, payload)
    if not isinstance(body, dict):
        raise CommandError(f"{name}: payload must be a JSON object, got {type(body).__name__}")
    try:
        return COMMANDS[name].model_validate(body)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(body)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] == "string_pattern_mismatch" and key.endswith("sha256"):
                msg = "must be the 64 hex digits of a sha256"
            elif err["type"] == "string_pattern_mismatch":
                msg = "must be 1-128 letters, digits or . _ : - (starting with a letter or digit)"
            problems.append(f"{key}: {msg}")
        raise CommandError(f"{name}: " + "; ".join(problems)) from None


def request_id_of(payload: bytes | str) -> str | None:
    """Best effort, for replying to a command that failed validation; never raises."""
    try:
        body = _decode("command", payload)
    except CommandError:
        # Not JSON we parse (nested too deeply, a huge number, ...): the id may still be legible.
        text = payload.decode("utf-8", "replace") if isinstance(payload, (bytes, bytearray)) else payload
        found = _REQUEST_ID.search(text[:MAX_COMMAND_BYTES])
        return found.group(1) if found else None
    rid = body.get("request_id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 128 else None
