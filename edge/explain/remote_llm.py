"""Explanations from a remote OpenAI-compatible server (`explain.backend: remote`): owns the HTTP side
(POST /v1/chat/completions with `stream: true`, server-sent events read with http.client, a time limit,
retries with backoff, the API key read from a file at each request) and `RemoteFirst`, which the
explanation worker (edge.explain.worker) uses in place of the local LLM child: remote first, the local child
as fallback when there is one.

The prompt is the local one (edge.explain.prompts.chat_messages: findings in the system message, the dialogue,
the question) with the runtime's opening as a final assistant message to continue; the answer goes
through the same sentence check as a local one (edge.explain.answers.grounded_answer), so the yes/no is still
the runtime's. A server that does not continue the final message (llama-cpp-python's) starts a message
of its own, and that is judged as it is. AnomalyGPT packs send their findings the same way (a chat
server takes no image embeddings).

A server that is down, slow past the time limit, refuses the key or answers something that is not a
chat-completions stream raises `RemoteUnavailable` after the retries; the worker leaves the part pending
(or answers it locally) and the server is not tried again before a backoff has passed. It loads no
model and owns no queue (the worker's)."""
from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from edge.errors import EdgeError
from edge.explain.answers import grounded_answer
from edge.explain.findings import Findings
from edge.explain.prompts import chat_messages

log = logging.getLogger(__name__)

DOWN_BACKOFF_S = (1.0, 2.0, 5.0, 15.0, 30.0)  # not tried again for this long after the n-th failure in a row


class RemoteUnavailable(EdgeError):
    """The remote LLM server gave no usable answer (down, too slow, refused the key, or garbage)."""


class RemoteLlm:
    """One OpenAI-compatible chat-completions endpoint. One caller at a time."""

    kind = "chat"

    def __init__(self, url: str, model: str = "default", api_key_file: str | Path | None = None,
                 time_limit_s: float = 30.0, retries: int = 2, retry_backoff_s: float = 0.5,
                 max_tokens: int = 96, connect_timeout_s: float = 3.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EdgeError(f"explain.remote.url: {url!r} is not an http:// or https:// URL")
        self.url = url
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.https else 80)
        path = parts.path.rstrip("/")
        self.path = path if path.endswith("/chat/completions") else f"{path or ''}/v1/chat/completions"
        self.model = model
        self.name = f"{model} @ {parts.scheme}://{parts.netloc}"
        self.api_key_file = Path(api_key_file) if api_key_file else None
        self.time_limit_s, self.retries, self.retry_backoff_s = float(time_limit_s), int(retries), float(retry_backoff_s)
        self.max_tokens, self.connect_timeout_s = int(max_tokens), float(connect_timeout_s)
        self.failures_in_row = 0
        self.next_try_at = 0.0
        self.last_error: str | None = None
        self.stats = {"answers": 0, "failures": 0}
        self._sock = None  # the request in progress, for abort()
        self._lock = threading.Lock()

    # -- state -------------------------------------------------------------------------------------------

    def available(self) -> bool:
        """False while in the backoff after a failure."""
        return time.monotonic() >= self.next_try_at

    def status(self) -> dict:
        return {"url": self.url, "model": self.model, "up": self.failures_in_row == 0,
                "retry_in_s": round(max(0.0, self.next_try_at - time.monotonic()), 1),
                "last_error": self.last_error, **self.stats}

    def abort(self) -> None:
        """Break the request in progress (the worker is stopping)."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(2)
            except OSError:
                pass

    # -- answers -----------------------------------------------------------------------------------------

    def answer(self, session, question: str, on_token: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None):
        f = Findings.from_dict(session.findings)

        def describe(q: str, model_start: str, gate):
            messages = chat_messages(f, session.exchanges(), q)
            if model_start:
                messages.append({"role": "assistant", "content": model_start})
            text, n_chunks, ttft_ms, stop = self.complete(messages, cancel)
            if model_start and text.lstrip()[:1].isupper():
                gate.fresh_message()  # a message of its own, not the continuation of the opening
            gate.feed(text)
            return n_chunks, ttft_ms, stop

        with self._lock:
            return grounded_answer(session, question, on_token, describe)

    def complete(self, messages: list[dict], cancel: threading.Event | None = None) -> tuple[str, int, float | None, str]:
        """The streamed completion's text, its chunk count, ms to the first content and the stop reason;
        retried with backoff; RemoteUnavailable when no attempt gave a complete answer."""
        if not self.available():
            raise RemoteUnavailable(f"{self.name}: not tried again for {self.next_try_at - time.monotonic():.1f} s "
                                    f"after: {self.last_error}")
        errors = []
        for attempt in range(self.retries + 1):
            if attempt:
                if cancel is not None and cancel.wait(self.retry_backoff_s * 2 ** (attempt - 1)):
                    return "", 0, None, "cancelled"
                if cancel is None:
                    time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            try:
                result = self._stream(messages, cancel)
            except _Refused as e:
                errors.append(str(e))
                break  # a wrong key or a refused request: retrying now will not help
            except (OSError, http.client.HTTPException, _BadStream) as e:
                errors.append(f"{type(e).__name__}: {e}" if not isinstance(e, _BadStream) else str(e))
                continue
            self.failures_in_row, self.last_error = 0, None
            self.stats["answers"] += 1
            return result
        self.failures_in_row += 1
        self.stats["failures"] += 1
        self.last_error = errors[-1]
        self.next_try_at = time.monotonic() + DOWN_BACKOFF_S[min(self.failures_in_row, len(DOWN_BACKOFF_S)) - 1]
        raise RemoteUnavailable(f"{self.name}: {len(errors)} attempt(s) failed; last: {errors[-1]}")

    def _stream(self, messages: list[dict], cancel: threading.Event | None):
        deadline = time.monotonic() + self.time_limit_s
        body = json.dumps({"model": self.model, "messages": messages, "stream": True, "max_tokens": self.max_tokens,
                           "temperature": 0, "stop": ["\n\n", "<|", "</s>"],
                           # vLLM: continue the final assistant message instead of opening a new one
                           "continue_final_message": messages[-1]["role"] == "assistant",
                           "add_generation_prompt": messages[-1]["role"] != "assistant"}).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=min(self.connect_timeout_s, self.time_limit_s))
        started = time.monotonic()
        try:
            conn.request("POST", self.path, body, headers)
            sock = self._sock = conn.sock  # http.client lets go of it once a closing response is read
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            response = conn.getresponse()
            if response.status in (401, 403):
                raise _Refused(f"HTTP {response.status} {response.reason}: the server refused the API key "
                               f"({self.api_key_file or 'none sent'})")
            if response.status != 200:
                detail = response.read(300).decode("utf-8", "replace").strip()
                if 400 <= response.status < 500 and response.status not in (408, 429):
                    raise _Refused(f"HTTP {response.status} {response.reason}: {detail}")
                raise _BadStream(f"HTTP {response.status} {response.reason}: {detail}")
            text, n_chunks, ttft_ms, stop, done = "", 0, None, "length", False
            while True:
                if cancel is not None and cancel.is_set():
                    return text, n_chunks, ttft_ms, "cancelled"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _BadStream(f"no complete answer within the time limit of {self.time_limit_s:g} s")
                sock.settimeout(remaining)
                line = response.readline()
                if not line:
                    break  # the stream ended (the server closed it, or died)
                line = line.strip()
                if not line or line.startswith(b":"):
                    continue
                if not line.startswith(b"data:"):
                    raise _BadStream(f"not a server-sent event: {line[:80]!r}")
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    choice = json.loads(data)["choices"][0]
                    piece = (choice.get("delta") or {}).get("content") or ""
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    raise _BadStream(f"not a chat-completions chunk: {data[:80]!r}") from None
                if not isinstance(piece, str):
                    raise _BadStream(f"chunk content is not text: {data[:80]!r}")
                if piece:
                    if ttft_ms is None:
                        ttft_ms = round((time.monotonic() - started) * 1000, 1)
                    text += piece
                    n_chunks += 1
                if choice.get("finish_reason"):
                    stop = str(choice["finish_reason"])
            if not done:
                raise _BadStream(f"the stream broke off after {n_chunks} chunk(s) (no [DONE])")
            return text, n_chunks, ttft_ms, stop
        except TimeoutError:
            raise _BadStream(f"no complete answer within the time limit of {self.time_limit_s:g} s") from None
        finally:
            self._sock = None
            conn.close()

    def _api_key(self) -> str | None:
        if self.api_key_file is None:
            return None
        try:
            return self.api_key_file.read_text().strip()
        except OSError as e:
            raise _Refused(f"explain.remote.api_key_file {self.api_key_file}: {e.strerror}") from None


class _BadStream(Exception):
    """This attempt gave no complete answer (retried)."""


class _Refused(Exception):
    """The server refused the request (not retried now)."""


class RemoteFirst:
    """The explanation worker's answerer for `explain.backend: remote`: the remote server first, the
    local LLM child (edge.explain.llm_process.LlmProcess) when the server fails or is in its backoff, if there is
    one. Without a local child a failure raises RemoteUnavailable and the part stays pending."""

    def __init__(self, remote: RemoteLlm, local=None):
        self.remote, self.local = remote, local
        self.kind = local.kind if local is not None else "chat"  # an AnomalyGPT fallback needs the embeddings
        self.name = remote.name
        self.local_answers = 0

    @property
    def alive(self) -> bool:
        return self.local.alive if self.local is not None else True

    @property
    def pid(self) -> int | None:
        return self.local.pid if self.local is not None else None

    def start(self) -> "RemoteFirst":
        if self.local is not None:
            self.local.start()
        return self

    def close(self, timeout: float = 3.0) -> None:
        self.remote.abort()
        if self.local is not None:
            self.local.close(timeout)

    def kill(self) -> None:
        self.remote.abort()
        if self.local is not None:
            self.local.kill()

    def retry_in_s(self) -> float:
        """Seconds until an answer can be tried at all (0 with a local fallback)."""
        if self.local is not None:
            return 0.0
        return max(0.0, self.remote.next_try_at - time.monotonic())

    def status(self) -> dict:
        return {"backend": "remote", "fallback": "local" if self.local is not None else None,
                "local_answers": self.local_answers, **self.remote.status()}

    def answer(self, session, question: str, on_token=None, cancel: threading.Event | None = None):
        pieces: list[str] = []  # held back until the remote answer is complete, so a fallback does not repeat it
        try:
            answer = self.remote.answer(session, question, on_token if self.local is None else pieces.append, cancel)
            if self.local is not None and on_token is not None:
                for piece in pieces:
                    on_token(piece)
            return answer
        except RemoteUnavailable as e:
            if self.local is None:
                raise
            log.info("remote LLM unavailable (%s); answering part %s locally", e, session.part_id)
        answer = self.local.answer(session, question, on_token, cancel)
        self.local_answers += 1
        return answer
