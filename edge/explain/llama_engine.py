"""The LLM engine: one llama context on a `LlamaModel` (edge.explain.llama_model), never in the frame path.

`LlamaEngine` owns the context and generates from a prompt given as segments, each either token ids or
rows of input embeddings (n x n_embd float32, fed through `llama_batch_init(n, n_embd, 1)`), so a chat
prompt and AnomalyGPT's image-and-prompt-embedding input go through the same loop:

    model = LlamaModel("smollm2.gguf")
    engine = LlamaEngine(model, n_ctx=2048, n_threads=1)
    g = engine.generate([tokens, image_rows, more_tokens], max_tokens=64, time_limit_s=10,
                        cancel=event, on_token=print, stop=["###"])

Decoding is greedy (reproducible answers) with an optional repetition penalty. The engine keeps what
the context already holds and re-decodes only past the common prefix, so a follow-up in a dialogue
costs only its new tokens. A time limit or a cancel event also interrupts a long prompt decode
(llama.cpp's abort callback). It knows nothing of findings, prompts or questions (edge.explain.prompts).
"""
from __future__ import annotations

import codecs
import ctypes
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge.explain.llama_model import (LlamaModel, LlmError, llama_lib, note_requested_abort,
                                      recent_llama_errors)


class ContextOverflow(LlmError):
    """A prompt does not fit the context window."""


# --- generation ----------------------------------------------------------------------------------------

Segment = Sequence[int] | np.ndarray  # token ids, or an n x n_embd float array of input embeddings
STOP_REASONS = ("end", "stop", "max_tokens", "time", "cancelled", "context")


@dataclass
class Generation:
    text: str
    tokens: list[int]
    n_prompt: int            # prompt positions (tokens + embedding rows)
    n_decoded: int           # prompt positions actually decoded (the rest were already in the context)
    ttft_s: float            # request to first generated token
    total_s: float
    stop_reason: str         # one of STOP_REASONS
    stop_string: str | None = None  # which stop string ended it

    @property
    def tokens_per_s(self) -> float:
        gen_s = self.total_s - self.ttft_s
        return (len(self.tokens) - 1) / gen_s if len(self.tokens) > 1 and gen_s > 0 else float("nan")


class LlamaEngine:
    """One llama context on a model: prompt decoding and greedy generation. One caller at a time
    (a lock serialises calls); each worker thread that needs the LLM owns its own engine."""

    def __init__(self, model: LlamaModel, n_ctx: int = 2048, n_threads: int = 1, n_batch: int = 256):
        lib = llama_lib()
        if n_ctx < 16:
            raise LlmError(f"n_ctx {n_ctx} is too small (at least 16)")
        if n_threads < 1:
            raise LlmError(f"n_threads must be >= 1, got {n_threads}")
        self.model = model
        self.n_batch = int(n_batch)
        self._deadline = float("inf")
        self._cancel: threading.Event | None = None
        self._abort_cb = lib.ggml_abort_callback(self._should_abort)
        params = lib.llama_context_default_params()
        params.n_ctx = int(n_ctx)
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = 1
        params.n_threads = int(n_threads)
        params.n_threads_batch = int(n_threads)
        params.abort_callback = self._abort_cb
        params.no_perf = True
        self._ctx = lib.llama_init_from_model(model.handle, params)
        if not self._ctx:
            raise LlmError(f"{model.path}: llama.cpp could not create a context of {n_ctx} tokens{recent_llama_errors()}")
        self.n_ctx = int(lib.llama_n_ctx(self._ctx))
        self.n_threads = int(n_threads)
        self._mem = lib.llama_get_memory(self._ctx)
        self._tokens = lib.llama_batch_init(self.n_batch, 0, 1)
        self._embeds = lib.llama_batch_init(self.n_batch, model.n_embd, 1)
        self._held: list = []  # keys of what the context holds, position by position
        self._lock = threading.Lock()

    def _should_abort(self, _data) -> bool:
        now = time.monotonic()
        if now > self._deadline or (self._cancel is not None and self._cancel.is_set()):
            note_requested_abort(now)
            return True
        return False

    # -- prompt ----------------------------------------------------------------------------------------

    def _items(self, segments: Sequence[Segment]) -> list[tuple]:
        """Flatten segments into (key, kind, payload, segment) per position; keys compare what the context
        holds."""
        items = []
        for i, seg in enumerate(segments):
            if isinstance(seg, np.ndarray) and seg.ndim == 2 and seg.dtype.kind == "f":
                if seg.shape[1] != self.model.n_embd:
                    raise LlmError(f"segment {i}: embeddings of width {seg.shape[1]}, but {self.model.path.name} "
                                   f"has n_embd {self.model.n_embd}")
                rows = np.ascontiguousarray(seg, np.float32)
                if not np.isfinite(rows).all():
                    raise LlmError(f"segment {i}: embeddings contain NaN or infinity")
                for row in rows:
                    items.append((("e", hashlib.blake2b(row.tobytes(), digest_size=16).digest()), "e", row, i))
            else:
                ids = np.asarray(seg).ravel()
                if ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= self.model.n_vocab):
                    raise LlmError(f"segment {i}: token ids must be integers in 0..{self.model.n_vocab - 1}")
                items += [(int(t), "t", int(t), i) for t in ids]
        if not items:
            raise LlmError("empty prompt")
        return items

    def _decode(self, items: list[tuple], start: int, want_logits: bool) -> None:
        """Decode items (positions start, start+1, ...) in batches within one segment; logits for the last.

        Batches never span segments, so the same segments give the same batches whether a segment holds
        token ids or their embedding rows (and so bit-identical results)."""
        lib = llama_lib()
        i = 0
        while i < len(items):
            kind, segment = items[i][1], items[i][3]
            j = i
            while j < len(items) and j - i < self.n_batch and items[j][3] == segment:
                j += 1
            batch = self._embeds if kind == "e" else self._tokens
            n = j - i
            batch.n_tokens = n
            if kind == "e":
                rows = np.stack([it[2] for it in items[i:j]])
                ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            else:
                np.ctypeslib.as_array(batch.token, shape=(self.n_batch,))[:n] = [it[2] for it in items[i:j]]
            np.ctypeslib.as_array(batch.pos, shape=(self.n_batch,))[:n] = np.arange(start + i, start + j)
            np.ctypeslib.as_array(batch.n_seq_id, shape=(self.n_batch,))[:n] = 1
            logits = np.ctypeslib.as_array(batch.logits, shape=(self.n_batch,))
            logits[:n] = 0
            if want_logits and j == len(items):
                logits[n - 1] = 1
            for k in range(n):
                batch.seq_id[k][0] = 0
            rc = lib.llama_decode(self._ctx, batch)
            if rc != 0:
                # What got in is unknown after an abort or error: forget everything from this batch on.
                self._forget_from(start + i)
                if rc == 2:
                    raise _Aborted()
                if rc == 1:
                    raise ContextOverflow(f"{self.model.path.name}: no room in the {self.n_ctx}-token context")
                raise LlmError(f"{self.model.path.name}: llama_decode failed with code {rc}{recent_llama_errors()}")
            self._held += [it[0] for it in items[i:j]]
            i = j

    def _forget_from(self, pos: int) -> None:
        lib = llama_lib()
        if not lib.llama_memory_seq_rm(self._mem, 0, pos, -1):
            lib.llama_memory_clear(self._mem, True)
            pos = 0
        del self._held[pos:]

    def _prefill(self, items: list[tuple]) -> int:
        """Make the context hold exactly `items`, decoding only past the common prefix; returns how many
        positions were decoded. Logits of the last item are ready afterwards."""
        common = 0
        for held, item in zip(self._held, items):
            if held != item[0]:
                break
            common += 1
        common = min(common, len(items) - 1)  # the last item is always decoded, for its logits
        self._forget_from(common)
        self._decode(items[common:], common, want_logits=True)
        return len(items) - common

    def _logits(self) -> np.ndarray:
        ptr = llama_lib().llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def evaluate(self, segments: Sequence[Segment]) -> np.ndarray:
        """The next-token logits after the prompt (a copy)."""
        with self._lock:
            items = self._items(segments)
            self._check_fits(len(items))
            self._deadline, self._cancel = float("inf"), None
            self._prefill(items)
            return self._logits().copy()

    def _check_fits(self, n: int) -> None:
        if n >= self.n_ctx:
            raise ContextOverflow(f"{self.model.path.name}: prompt of {n} tokens does not fit the context of "
                                  f"{self.n_ctx} (leave room for the answer)")

    # -- generation ------------------------------------------------------------------------------------

    def generate(self, segments: Sequence[Segment], max_tokens: int = 128, time_limit_s: float | None = None,
                 cancel: threading.Event | None = None, on_token: Callable[[str], None] | None = None,
                 stop: Sequence[str] = (), repeat_penalty: float = 1.0) -> Generation:
        """Greedy continuation of the prompt. Streams text pieces to `on_token` (never a partial stop
        string); ends at an end-of-generation token, a stop string, max_tokens, the time limit, a set
        `cancel` event, or a full context, and says which in `stop_reason`."""
        if max_tokens < 1:
            raise LlmError(f"max_tokens must be >= 1, got {max_tokens}")
        t0 = time.monotonic()
        with self._lock:
            items = self._items(segments)
            self._check_fits(len(items))
            self._deadline = t0 + time_limit_s if time_limit_s else float("inf")
            self._cancel = cancel
            out: list[int] = []
            stop_string = None
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            text, emitted = "", 0
            ttft = float("nan")
            n_decoded = 0
            reason = "max_tokens"
            try:
                n_decoded = self._prefill(items)
                while len(out) < max_tokens:
                    if cancel is not None and cancel.is_set():
                        reason = "cancelled"
                        break
                    if time.monotonic() > self._deadline:
                        reason = "time"
                        break
                    token = self._pick(self._logits(), out, repeat_penalty)
                    if not out:
                        ttft = time.monotonic() - t0
                    if self.model.is_end(token):
                        reason = "end"
                        break
                    out.append(token)
                    text += decoder.decode(self.model.piece(token))
                    cut, stop_string = _find_stop(text, stop)
                    if cut is not None:
                        text = text[:cut]
                        reason = "stop"
                        break
                    safe = len(text) - _partial_stop(text, stop)
                    if on_token and safe > emitted:
                        on_token(text[emitted:safe])
                        emitted = safe
                    if len(out) >= max_tokens:
                        break
                    if len(self._held) + 1 >= self.n_ctx:
                        reason = "context"
                        break
                    self._decode([(token, "t", token, -1)], len(self._held), want_logits=True)
            except _Aborted:
                reason = "cancelled" if cancel is not None and cancel.is_set() else "time"
            finally:
                self._deadline, self._cancel = float("inf"), None
            text += decoder.decode(b"", final=True)
            if reason != "stop":
                cut, stop_string = _find_stop(text, stop)
                if cut is not None:
                    text, reason = text[:cut], "stop"
            if on_token and len(text) > emitted:
                on_token(text[emitted:])
            return Generation(text=text, tokens=out, n_prompt=len(items), n_decoded=n_decoded,
                              ttft_s=ttft, total_s=time.monotonic() - t0, stop_reason=reason,
                              stop_string=stop_string)

    @staticmethod
    def _pick(logits: np.ndarray, generated: list[int], penalty: float) -> int:
        if penalty != 1.0 and generated:
            logits = logits.copy()
            seen = np.unique(generated)
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / penalty, values * penalty)
        return int(np.argmax(logits))

    def reset(self) -> None:
        """Forget what the context holds."""
        with self._lock:
            self._forget_from(0)

    def close(self) -> None:
        with self._lock:
            lib = llama_lib()
            if self._ctx:
                lib.llama_batch_free(self._tokens)
                lib.llama_batch_free(self._embeds)
                lib.llama_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> "LlamaEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Aborted(Exception):
    pass


def _find_stop(text: str, stop: Sequence[str]) -> tuple[int | None, str | None]:
    """Where the first stop string starts in `text`, and which one it is."""
    hits = [(text.find(s), s) for s in stop if s and s in text]
    return min(hits) if hits else (None, None)


def _partial_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-k:]):
                best = k
                break
    return best
