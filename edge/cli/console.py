"""`anomaly-edge console`: the technician's view of a running station, over its local API.

    list [anomalous|normal|error|all] [--since 2h|2026-11-24T06:00] [--until ...] [--station S] [--limit N]
    open <part>               findings, explanation, heatmap preview, overlay path; <part> is an id,
                              the start of one (Tab completes), or a row number of the last list
    ask <question>            about the open part; answers stream in; the dialogue is kept per part
    defect                    confirm the open part's defect
    false-alarm [--enroll]    mark it a false alarm; --enroll also teaches the station it is good
    status                    frames/s, queues, outbox, broker and camera
    help, quit

Line editing and history come from prompt_toolkit; output fits 80 columns and reads without colour
(NO_COLOR, --no-colour, or when the output is not a terminal).
"""
from __future__ import annotations

import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from edge.cli.console_screen import (explain_words, heatmap_preview, model_words, parse_when, part_line, path_lines,
                                     wrapped)
from edge.line.api_client import ApiClient, ApiError
from edge.errors import EdgeError

COMMANDS = ("list", "open", "ask", "defect", "false-alarm", "status", "help", "quit", "exit")
ENROLL_TIMEOUT_S = 600.0


class Console:
    def __init__(self, api: ApiClient, user: str, colour: bool, out=None):
        self.api, self.user, self.colour = api, user, colour
        self.out = out or sys.stdout
        self.part: dict | None = None
        self.listed: list[str] = []  # part ids of the last `list`, in its rows' order

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # -- commands -----------------------------------------------------------------------------

    def do_list(self, args: list[str]) -> None:
        verdict, query = "anomalous", {"limit": "15"}
        it = iter(args)
        for a in it:
            if a in ("anomalous", "flagged", "normal", "error", "learning", "all"):
                verdict = {"flagged": "anomalous"}.get(a, a)
            elif a in ("--since", "--until", "--station", "--limit"):
                value = next(it, None)
                if value is None:
                    raise EdgeError(f"list: {a} needs a value")
                query[a[2:]] = str(parse_when(value)) if a in ("--since", "--until") else value
            else:
                raise EdgeError(f"list: don't know {a!r} (try: list anomalous --since 2h --limit 20)")
        if verdict != "all":
            query["verdict"] = verdict
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        parts = self.api.get(f"/parts?{qs}")["parts"]
        if not parts:
            self.say("no parts match")
            return
        self.listed = [p["part_id"] for p in parts]
        for row, p in enumerate(parts, 1):
            self.say(part_line(p, row))

    def resolve_part(self, word: str) -> str:
        """A part id from what a technician typed: a row number of the last `list`, a whole id, or the
        start of exactly one listed (or recent) id."""
        if word.isdigit() and self.listed and word not in self.listed:
            row = int(word)
            if not 1 <= row <= len(self.listed):
                raise EdgeError(f"open: row {row} is not in the last list (rows 1 to {len(self.listed)})")
            return self.listed[row - 1]
        known = list(dict.fromkeys(self.listed + self._recent_ids()))
        if word in known:
            return word
        matches = [i for i in known if i.startswith(word)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise EdgeError(f"open: {word!r} is the start of {len(matches)} parts ({', '.join(matches[:3])}"
                            f"{', …' if len(matches) > 3 else ''}); type more of the id, or its row number")
        return word  # not listed: the station may still know it

    def _recent_ids(self) -> list[str]:
        try:
            return [p["part_id"] for p in self.api.get("/parts?limit=200")["parts"]]
        except ApiError:
            return []

    def do_open(self, args: list[str]) -> None:
        if len(args) != 1:
            raise EdgeError("open: give one part id, the start of one, or a row number of `list`")
        p = self.api.get(f"/parts/{self.resolve_part(args[0])}")
        self.part = p
        score = "-" if p["score"] is None else format(p["score"], ".3f")
        for line in (f"part {p['part_id']}", f"  {p['time']}  station {p['station']}  trigger {p['trigger']}",
                     f"verdict {p['verdict']}  score {score}  threshold {'-' if p['threshold'] is None else format(p['threshold'], '.3f')}",
                     f"model {p['model_id']}"):
            for piece in wrapped(line, "    "):
                self.say(piece)
        for sentence in ((p.get("findings") or {}).get("summary") or "").split(". Region"):
            if sentence:
                text = (sentence if sentence.startswith("Anomalous") or sentence.startswith("No ")
                        else "Region" + sentence).rstrip(".") + "."
                for piece in wrapped(text, "    ", "  "):
                    self.say(piece)
        status = p.get("explanation_status")
        if p.get("explanation"):
            text = p["explanation"]
        elif p["verdict"] == "anomalous" and not status:
            text = "none: this part was flagged while explanations were off, so it has no dialogue"
        else:
            text = status
        if text:
            for piece in wrapped(text, "  ", "explanation: "):
                self.say(piece)
        if p.get("feedback"):
            when = datetime.fromtimestamp(p["feedback_at"], timezone.utc).strftime("%Y-%m-%d %H:%M")
            self.say(f"feedback: {p['feedback']} by {p['feedback_by']} at {when} UTC")
        files = p.get("files") or {}
        for line in heatmap_preview(files.get("overlay"), files.get("mask"), files.get("image"), self.colour):
            self.say(line)
        if files.get("overlay"):
            for piece in path_lines(files["overlay"], "overlay: "):
                self.say(piece)

    def _open_part(self, command: str) -> dict:
        if self.part is None:
            raise EdgeError(f"{command}: open a part first (open <part-id>)")
        return self.part

    def do_ask(self, question: str) -> None:
        p = self._open_part("ask")
        if not question.strip():
            raise EdgeError("ask: type a question after ask, e.g. ask How big is it?")
        try:
            e = self.api.get("/health").get("explain") or {}
        except ApiError:
            e = {}
        if e.get("busy") and e.get("busy_part") not in (None, p["part_id"]):
            self.say(f"(the model is finishing part {e['busy_part']}; your question goes next, ahead of "
                     f"{e.get('pending', 0)} waiting)")
        streamed = []

        def show(event: dict) -> None:
            streamed.append(event["token"])
            print(event["token"], end="", file=self.out, flush=True)

        final = self.api.stream(f"/parts/{p['part_id']}/ask", {"question": question, "stream": True}, show)
        if not streamed:
            self.say(final["answer"])
        else:
            self.say()

    def do_feedback(self, label: str, args: list[str]) -> None:
        p = self._open_part(label.replace("_", "-"))
        enroll = "--enroll" in args
        unknown = [a for a in args if a != "--enroll"]
        if unknown or (enroll and label != "false_alarm"):
            raise EdgeError("usage: defect | false-alarm [--enroll]")
        if enroll:
            self.say("enrolling the part as good and recalibrating (this takes a few seconds) ...")
        # Re-enrolling rebuilds the bank and the threshold: up to minutes on a busy 2-core box.
        out = self.api.post(f"/parts/{p['part_id']}/feedback", {"label": label, "by": self.user, "enroll": enroll},
                            timeout=ENROLL_TIMEOUT_S if enroll else None)
        self.part = out["part"]
        self.say(f"recorded: {p['part_id']} is {'a defect' if label == 'defect' else 'a false alarm'} "
                 f"(by {self.user})")
        if "enrolled" in out:
            e = out["enrolled"]
            self.say(f"enrolled as good: {e['references']} references, threshold {e['threshold_before']:.3f} "
                     f"-> {e['threshold']:.3f}")
            if e.get("note"):
                self.say(e["note"])

    def do_status(self) -> None:
        h = self.api.get("/health")
        c, q = h["counts"], h["queues"]
        lat = (h["latency_ms"] or {}).get("score") or {}
        self.say(f"station {h['line']}/{h['station']}  {h['state']}  up {h['uptime_s']:.0f} s  model {h['model_id']}")
        self.say(f"frames/s captured {h['fps']['captured']:.1f}  scored {h['fps']['scored']:.1f}  "
                 f"score p50 {lat.get('p50', '-')} ms p99 {lat.get('p99', '-')} ms")
        self.say(f"parts {c['parts']}  flagged {c['flagged']}  dropped {c['dropped_frames']}  "
                 f"bad frames {c['bad_frames']}  errors {c['errors']}")
        self.say(f"queues: score {q['score']}  output {q['output']}  triggers {q['triggers']}")
        self.say(model_words(h))
        b = h.get("broker")
        self.say("broker: " + (f"{'connected' if b['connected'] else 'DISCONNECTED'}  outbox {b['outbox_size']}"
                               + (f"  ({b['last_error']})" if b.get("last_error") else "") if b else "MQTT off"))
        s = h["source"]
        self.say(f"camera: {s['name']} {s['state']}" + (f" ({s['detail']})" if s["detail"] else ""))
        if h.get("explain"):
            for piece in wrapped(explain_words(h["explain"]), "  "):
                self.say(piece)

    def do_help(self) -> None:
        self.say(__doc__.split("\n\n")[1])

    # -- loop ---------------------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Run one command line; False when the technician wants to leave."""
        line = line.strip()
        if not line:
            return True
        command, _, rest = line.partition(" ")
        try:
            if command in ("quit", "exit"):
                return False
            if command == "ask":
                self.do_ask(rest)
                return True
            args = shlex.split(rest)
            if command == "list":
                self.do_list(args)
            elif command == "open":
                self.do_open(args)
            elif command == "defect":
                self.do_feedback("defect", args)
            elif command == "false-alarm":
                self.do_feedback("false_alarm", args)
            elif command == "status":
                self.do_status()
            elif command == "help":
                self.do_help()
            else:
                self.say(f"unknown command {command!r}; commands: {', '.join(COMMANDS[:-1])}")
        except ApiError as e:
            self.say(f"error: {e}" + (" — is the service running? (systemctl status anomaly-edge@...)"
                                      if e.status == 0 and "not running" not in str(e) else ""))
        except (EdgeError, ValueError) as e:
            self.say(f"error: {e}")
        return True

    def run(self, history: Path | None = None) -> int:
        self.say("anomaly-edge console — `help` for commands, `quit` to leave")
        try:
            self.do_status()
        except ApiError as e:
            self.say(f"error: {e}")
        if sys.stdin.isatty():
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory, InMemoryHistory

            if history is not None:
                history.parent.mkdir(parents=True, exist_ok=True)
            session = PromptSession(history=FileHistory(str(history)) if history else InMemoryHistory(),
                                    completer=self._completer(), color_depth=None)
            read = lambda: session.prompt(self._prompt())  # noqa: E731
        else:
            read = lambda: input(self._prompt())  # noqa: E731
        while True:
            try:
                line = read()
            except KeyboardInterrupt:
                continue
            except EOFError:
                return 0
            if not self.handle(line):
                return 0

    def _completer(self):
        """Command names first; after `open `, the ids of the last list (and recent parts)."""
        from prompt_toolkit.completion import Completer, Completion

        console = self

        class PartCompleter(Completer):
            def get_completions(self, document, complete_event):
                text = document.text_before_cursor
                if " " not in text:
                    for c in COMMANDS:
                        if c.startswith(text):
                            yield Completion(c, -len(text))
                    return
                command, _, word = text.partition(" ")
                if command == "open" and " " not in word.strip():
                    word = word.strip()
                    for i in dict.fromkeys(console.listed + console._recent_ids()):
                        if i.startswith(word):
                            yield Completion(i, -len(word))

        return PartCompleter()

    def _prompt(self) -> str:
        return f"[{self.part['part_id']}]> " if self.part else "> "


def main(socket_path: str | Path, user: str | None, colour: bool | None) -> int:
    if colour is None:
        colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    user = user or os.environ.get("SUDO_USER") or os.environ.get("USER") or "technician"
    history = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "anomaly-edge" / "history"
    return Console(ApiClient(socket_path), user, colour).run(history)
