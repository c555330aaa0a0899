"""The client of a station's local API (edge.line.api): JSON over HTTP on its UNIX socket, used by the
technician console (edge.cli.console), the CLI and scripts.

Owns the client side and ApiError. Must not import the server or anything of the runtime.
"""
from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

from edge.errors import EdgeError


class ApiError(EdgeError):
    """The station's API cannot be reached or refused a request."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class ApiClient:
    """Talks to a station's local API over its UNIX socket."""

    def __init__(self, socket_path: str | Path, timeout: float = 30.0):
        self.socket_path, self.timeout = str(socket_path), timeout

    def request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        conn = _UnixConnection(self.socket_path, timeout or self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            response = conn.getresponse()
            payload = json.loads(response.read() or b"{}")
        except (FileNotFoundError, ConnectionRefusedError):
            raise ApiError(f"the station service is not running (no API at {self.socket_path})") from None
        except PermissionError:
            raise ApiError(f"no permission to use {self.socket_path} (ask to be added to its group)") from None
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
            raise ApiError(f"station API at {self.socket_path}: {e}") from None
        finally:
            conn.close()
        if response.status != 200:
            raise ApiError(payload.get("error", f"HTTP {response.status}"), response.status)
        return payload

    def stream(self, path: str, body: dict, on_event) -> dict:
        """POST and read an NDJSON stream: on_event(event) for each line; returns the final event."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                payload = json.loads(response.read() or b"{}")
                raise ApiError(payload.get("error", f"HTTP {response.status}"), response.status)
            while line := response.readline():
                event = json.loads(line)
                if "error" in event:
                    raise ApiError(event["error"], 400)
                if event.get("done"):
                    return event
                on_event(event)
            raise ApiError(f"station API at {self.socket_path}: the answer stopped before it was complete")
        except (FileNotFoundError, ConnectionRefusedError):
            raise ApiError(f"the station service is not running (no API at {self.socket_path})") from None
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
            raise ApiError(f"station API at {self.socket_path}: {e}") from None
        finally:
            conn.close()

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def post(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        """`timeout`: seconds to wait for the reply (default: the client's), e.g. longer for an enrollment."""
        return self.request("POST", path, body or {}, timeout)
