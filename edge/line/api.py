"""The station's local API: JSON over HTTP on a UNIX socket (owner/group permissions), optionally also
on a TCP port. The technician console and scripts use it; it never blocks the frame loop.

    GET  /health                               frames/s, latencies, queues, outbox, broker and source
    GET  /parts?limit=20&verdict=anomalous&since=<epoch s>&until=<epoch s>&station=<name>
    GET  /parts/<id>                           one part: findings, explanation, files, feedback
    POST /parts/<id>/feedback  {"label": "defect"|"false_alarm", "by": "jane", "note": "...",
                                "enroll": true}  (enroll: add the image to the good references now)
    POST /parts/<id>/ask       {"question": "How big is it?", "stream": false}   (when the pack has a
                               language model; with "stream": true the answer comes as NDJSON lines
                               {"token": "..."} ... then {"done": true, "answer": "..."} or {"error": ...})
    POST /reload                               re-read the config and station state
    POST /deploy  {"pack": ..., "sha256": ...}  verify, trial-score and switch to a pack (edge.station.deploy)
    POST /rollback                             back to the previous pack and state

Errors come back as {"error": "..."} with 400 (bad request), 401 (TCP without the token), 404 (unknown
part or path), 413 (body over MAX_BODY) or 503. The TCP listener (api.tcp_port) answers only requests
carrying `Authorization: Bearer <token>` (api.token_file); the UNIX socket is guarded by its mode and
group. A Content-Length that is missing where a body is due, negative, malformed or over the limit is
refused before anything is read; a client that sends nothing for api.read_timeout_s is dropped; a
client that goes away costs one log line. `edge.line.api_client.ApiClient` is the matching client.

Owns the HTTP side: routes, limits, authentication, the socket's permissions. Must not reach into the
runtime: everything it does to the station goes through edge.line.api_port.StationPort, and jobs that
change the models go to the station manager's queue (as MQTT commands do) and are waited for.
"""
from __future__ import annotations

import grp
import hmac
import json
import logging
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from edge.errors import EdgeError
from edge.line.api_client import ApiError
from edge.line.store import FEEDBACK_LABELS, StoreError

log = logging.getLogger(__name__)
MAX_BODY = 65536


_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


def _log_request_error(server, request, client_address) -> None:
    """One line, not a traceback, for a client that went away or stalled; a traceback for the rest."""
    import sys

    exc = sys.exc_info()[1]
    if isinstance(exc, _GONE):
        log.info("api: client %s went away: %s", client_address or "local", type(exc).__name__)
    else:
        log.exception("api: request from %s failed", client_address or "local")


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handle_error = _log_request_error


class _TcpHTTPServer(ThreadingHTTPServer):
    handle_error = _log_request_error


class _Handler(BaseHTTPRequestHandler):
    station = None  # edge.line.api_port.StationPort, set per server class
    token: bytes | None = None  # the TCP listener's: every request must carry it
    timeout = 10.0  # socket reads and writes (api.read_timeout_s), set per server class
    protocol_version = "HTTP/1.1"

    def address_string(self) -> str:  # UNIX sockets have no client address
        return "local"

    def log_message(self, fmt, *args) -> None:
        log.debug("api: " + fmt, *args)

    def log_error(self, fmt, *args) -> None:  # malformed requests, read timeouts: one line each
        log.info("api: %s: " + fmt, self.address_string(), *args)

    def _refuse(self, status: int, error: str) -> None:
        """Answer and close: the request's body, if any, is left unread."""
        self.close_connection = True
        data = json.dumps({"error": error}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.token is None:
            return True
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token)

    def _content_length(self) -> int:
        """The declared body size, checked before a byte of the body is read."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            if self.headers.get("Transfer-Encoding"):
                raise ApiError("chunked request bodies are not accepted: send Content-Length", 411)
            return 0
        if not raw.strip().isdigit():
            raise ApiError(f"Content-Length {raw!r} is not a byte count", 400)
        n = int(raw)
        if n > MAX_BODY:
            raise ApiError(f"request body of {n} bytes is over the {MAX_BODY}-byte limit", 413)
        return n

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self, n: int) -> dict:
        raw = self.rfile.read(n) if n else b"{}"
        if len(raw) < n:
            raise ConnectionResetError(f"the client sent {len(raw)} of {n} body bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"request body is not JSON: {e}", 400) from None
        if not isinstance(body, dict):
            raise ApiError("request body must be a JSON object", 400)
        return body

    def _stream(self, stream: "Stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def emit(event: dict) -> None:
            line = (json.dumps(event, default=str) + "\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()

        try:
            emit({"done": True, **stream.run(emit)})
        except _GONE:
            raise
        except EdgeError as e:
            emit({"error": str(e)})
        except Exception as e:
            log.exception("api: stream %s failed", self.path)
            emit({"error": f"internal error: {e}"})
        self.wfile.write(b"0\r\n\r\n")

    def _dispatch(self, method: str) -> None:
        try:
            self._serve(method)
        except _GONE as e:  # the client hung up or stalled mid-request: nothing to answer
            self.close_connection = True
            log.info("api: client %s went away during %s %s: %s", self.address_string(), method, self.path,
                     type(e).__name__)

    def _serve(self, method: str) -> None:
        if not self._authorized():
            self._refuse(401, "this API needs 'Authorization: Bearer <token>' (the token in api.token_file)")
            return
        try:
            length = self._content_length()
        except ApiError as e:
            self._refuse(e.status, str(e))
            return
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        try:
            body = self._body(length) if method == "POST" else {}
            if method != "POST" and length:
                self.rfile.read(length)  # keep the connection in step
            out = route(self.station, method, parts, parse_qs(url.query), body)
            if isinstance(out, Stream):
                self._stream(out)
                return
            self._send(200, out)
        except ApiError as e:
            self._send(e.status or 400, {"error": str(e)})
        except StoreError as e:
            self._send(404 if "no part with id" in str(e) else 503, {"error": str(e)})
        except EdgeError as e:
            self._send(400, {"error": str(e)})
        except _GONE:
            raise
        except Exception as e:  # the API must outlive any one request
            log.exception("api: %s %s failed", method, self.path)
            self._send(500, {"error": f"internal error: {e}"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")


class Stream:
    """A response sent as NDJSON while it is produced: `run(emit)` calls emit(event) and returns the
    final event's fields."""

    def __init__(self, run):
        self.run = run


def _number(query: dict, key: str, kind=float):
    if key not in query:
        return None
    try:
        return kind(query[key][0])
    except ValueError:
        raise ApiError(f"query parameter {key}={query[key][0]!r} is not a {kind.__name__}", 400) from None


def route(station, method: str, parts: list[str], query: dict, body: dict) -> dict:
    """The API's routing, apart from HTTP so it can be called and tested directly. `station`: the
    narrow interface of edge.line.api_port.StationPort."""
    if method == "GET" and parts == ["health"]:
        return station.health()
    if method == "GET" and parts == ["parts"]:
        verdict = query.get("verdict", [None])[0]
        if verdict not in (None, "anomalous", "normal", "error"):
            raise ApiError(f"verdict={verdict!r}: use anomalous, normal or error", 400)
        limit = _number(query, "limit", int) or 20
        if not 1 <= limit <= 1000:
            raise ApiError(f"limit={limit}: use 1..1000", 400)
        return {"parts": station.parts(limit, verdict, _number(query, "since"), _number(query, "until"),
                                       query.get("station", [None])[0])}
    if len(parts) >= 2 and parts[0] == "parts":
        part_id = parts[1]
        if method == "GET" and len(parts) == 2:
            return station.part(part_id)
        if method == "POST" and parts[2:] == ["feedback"]:
            return feedback(station, part_id, body)
        if method == "POST" and parts[2:] == ["ask"]:
            why = station.explain_unavailable()
            if why is not None:
                raise ApiError(f"this station has no language model ({why})", 503)
            return ask(station, part_id, body)
    if method == "POST" and parts == ["reload"]:
        return station.reload()
    if method == "POST" and parts in (["deploy"], ["rollback"]):
        from edge.line.commands import parse_command

        command = parse_command(parts[0], json.dumps(body))  # CommandError (400) naming the bad key
        return station.deploy(command) if parts == ["deploy"] else station.rollback(command)
    raise ApiError(f"no such endpoint: {method} /{'/'.join(parts)}", 404)


def ask(station, part_id: str, body: dict):
    from edge.explain.dialogue import DialogueError
    from edge.explain.questions import clean_question

    unknown = set(body) - {"question", "stream"}
    if unknown:
        raise ApiError(f"ask: unknown keys {sorted(unknown)} (question, stream)", 400)
    question = body.get("question")
    if not isinstance(question, str):
        raise ApiError("ask: give a 'question'", 400)
    clean_question(question)  # empty or over-long questions are refused here, with the reason
    row = station.part(part_id)
    try:
        station.check_dialogue(part_id)
    except DialogueError:
        if row["verdict"] == "anomalous":
            raise ApiError(f"part {part_id} was flagged while explanations were off, so there is no "
                           "dialogue to ask about (parts flagged while they are on have one)", 400) from None
        raise ApiError(f"part {part_id} is {row['verdict']}: only flagged parts have a dialogue to ask "
                       "about", 400) from None
    if body.get("stream"):
        return Stream(lambda emit: {"part_id": part_id, "question": question, "answer": station.ask(
            part_id, question, on_token=lambda t: emit({"token": t}), timeout=120)})
    return {"part_id": part_id, "question": question, "answer": station.ask(part_id, question, timeout=120)}


def feedback(station, part_id: str, body: dict) -> dict:
    unknown = set(body) - {"label", "by", "note", "enroll"}
    if unknown:
        raise ApiError(f"feedback: unknown keys {sorted(unknown)} (label, by, note, enroll)", 400)
    label, by = body.get("label"), body.get("by")
    if label not in FEEDBACK_LABELS:
        raise ApiError(f"feedback: label must be one of {', '.join(FEEDBACK_LABELS)}, got {label!r}", 400)
    if not isinstance(by, str) or not by.strip():
        raise ApiError("feedback: say who gives it ('by')", 400)
    enroll = body.get("enroll", False)
    if enroll and label != "false_alarm":
        raise ApiError("feedback: only a false alarm can be enrolled as good", 400)
    row = station.set_feedback(part_id, label, by.strip(), body.get("note"))
    out = {"part": row}
    if enroll:
        out["enrolled"] = station.enroll_good(part_id, by.strip())  # the maintenance queue, as over MQTT
    return out


class LocalApi:
    """The HTTP servers (UNIX socket, optional TCP) over a station's StationPort."""

    def __init__(self, station, socket_path: str | Path, mode: int = 0o660, group: str | None = None,
                 tcp: tuple[str, int] | None = None, token_file: str | Path | None = None,
                 read_timeout_s: float = 10.0):
        self.station, self.socket_path, self.mode, self.group, self.tcp = station, Path(socket_path), mode, group, tcp
        self.token_file, self.read_timeout_s = token_file, read_timeout_s
        self._servers = []

    def read_token(self) -> bytes:
        if self.token_file is None:
            raise ApiError("api.tcp_port needs api.token_file: the TCP listener does not run without a token")
        try:
            token = Path(self.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ApiError(f"api.token_file {self.token_file}: cannot read the token: {e}") from None
        if len(token) < 16:
            raise ApiError(f"api.token_file {self.token_file}: the token must be at least 16 characters "
                           f"(it has {len(token)}); e.g. openssl rand -hex 32 > {self.token_file}")
        return token.encode()

    def _give_group(self, gid: int) -> None:
        """The socket and its folder to api.group: the folder gets the group and the search bit (g+x)
        that a umask of 0027 (the shipped unit's) leaves it without otherwise, or 0077."""
        folder = self.socket_path.parent
        try:
            st = folder.stat()
            if st.st_uid == os.getuid():
                os.chown(folder, -1, gid)
                os.chmod(folder, (st.st_mode & 0o7777) | 0o010)
            elif st.st_gid != gid or not st.st_mode & 0o010:
                log.warning("api: %s is not ours to give to group %s: its members may not reach %s", folder,
                            self.group, self.socket_path.name)
        except OSError as e:
            log.warning("api: cannot give %s to group %s: %s", folder, self.group, e)

    def start(self) -> "LocalApi":
        base = {"station": self.station, "timeout": self.read_timeout_s}
        handler = type("Handler", (_Handler,), base)
        tcp_handler = type("TcpHandler", (_Handler,), {**base, "token": self.read_token()}) if self.tcp else None
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.is_socket():
            self.socket_path.unlink()  # left by a process that died
        old_umask = os.umask(0o177)  # no window in which others could connect
        try:
            self._servers.append(_UnixHTTPServer(str(self.socket_path), handler))
        finally:
            os.umask(old_umask)
        if self.group:
            try:
                gid = grp.getgrnam(self.group).gr_gid
                os.chown(self.socket_path, -1, gid)
                self._give_group(gid)
            except (KeyError, PermissionError) as e:
                log.warning("api: cannot give %s to group %s: %s", self.socket_path, self.group, e)
        os.chmod(self.socket_path, self.mode)
        if self.tcp:
            self._servers.append(_TcpHTTPServer(self.tcp, tcp_handler))
        for server in self._servers:
            threading.Thread(target=server.serve_forever, name="edge-api", daemon=True).start()
        log.info("api on %s%s", self.socket_path, f" and {self.tcp[0]}:{self.tcp[1]}" if self.tcp else "")
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
