"""The LLM engine: a GGUF on llama.cpp (llama-cpp-python's low-level API), never in the frame path.

`LlamaModel` owns the model handle (weights, vocabulary, GGUF metadata); `LlamaEngine` owns one llama
context on it and generates from a prompt given as segments, each either token ids or rows of input
embeddings (n x n_embd float32, fed through `llama_batch_init(n, n_embd, 1)`), so a chat prompt and
AnomalyGPT's image-and-prompt-embedding input go through the same loop:

    model = LlamaModel("smollm2.gguf")
    engine = LlamaEngine(model, n_ctx=2048, n_threads=1)
    g = engine.generate([tokens, image_rows, more_tokens], max_tokens=64, time_limit_s=10,
                        cancel=event, on_token=print, stop=["###"])

Decoding is greedy (reproducible answers) with an optional repetition penalty. The engine keeps what
the context already holds and re-decodes only past the common prefix, so a follow-up in a dialogue
costs only its new tokens. A time limit or a cancel event also interrupts a long prompt decode
(llama.cpp's abort callback).
"""
from __future__ import annotations

import codecs
import ctypes
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import EdgeError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


class LlmError(EdgeError):
    """The language model cannot be loaded or used: bad GGUF, prompt too long, bad input."""


class ContextOverflow(LlmError):
    """A prompt does not fit the context window."""


# --- llama.cpp library and its log ------------------------------------------------------------------

_LIB_LOCK = threading.Lock()
_LIB = None
_RECENT_LOG: deque[str] = deque(maxlen=40)


def _lib():
    """llama_cpp, imported and initialised once, its log routed to `logging` (and kept for errors)."""
    global _LIB
    with _LIB_LOCK:
        if _LIB is None:
            try:
                import llama_cpp
            except ImportError as e:
                raise LlmError(f"the LLM needs llama-cpp-python: pip install 'anomaly-edge[llm]' ({e})") from None
            llama_cpp.llama_backend_init()
            llama_cpp.llama_log_set(_log_callback(llama_cpp), ctypes.c_void_p(0))
            _LIB = llama_cpp
    return _LIB


_LOG_CALLBACK = None  # the ctypes callback must outlive every call into llama.cpp
_ABORTED_AT = [0.0]   # llama.cpp reports an abort we asked for as a decode error: not worth an ERROR line


def _log_callback(llama_cpp):
    global _LOG_CALLBACK
    # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line
    levels = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def callback(level, text, _user):
        line = text.decode("utf-8", "replace").rstrip("\n")
        last[0] = levels.get(level, last[0])
        if line.strip():
            if last[0] >= logging.WARNING:
                _RECENT_LOG.append(line.strip())
            after_abort = time.monotonic() - _ABORTED_AT[0] < 1.0
            log.log(logging.DEBUG if after_abort else last[0], "llama.cpp: %s", line)

    _LOG_CALLBACK = callback
    return callback


def _recent_errors(n: int = 4) -> str:
    lines = list(_RECENT_LOG)[-n:]
    return ("; llama.cpp said: " + " | ".join(lines)) if lines else ""


# --- the model -----------------------------------------------------------------------------------------

class LlamaModel:
    """A GGUF loaded for inference on the CPU. Errors name the file."""

    def __init__(self, path: str | Path):
        lib = _lib()
        self.path = Path(path)
        if not self.path.is_file():
            raise LlmError(f"{self.path}: GGUF model file not found")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise LlmError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        _RECENT_LOG.clear()
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise LlmError(f"{self.path}: llama.cpp could not load this GGUF{_recent_errors()}")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_embd = int(lib.llama_model_n_embd(self._model))
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self._model))
        self.bos = int(lib.llama_vocab_bos(self._vocab))
        self.eos = int(lib.llama_vocab_eos(self._vocab))
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self.metadata = self._read_metadata()
        self._lock = threading.Lock()

    @property
    def handle(self):
        if not self._model:
            raise LlmError(f"{self.path}: model is closed")
        return self._model

    @property
    def name(self) -> str:
        return self.metadata.get("general.name") or self.path.stem

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def _read_metadata(self) -> dict[str, str]:
        lib = _lib()
        out = {}
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(lib.llama_model_meta_count(self._model)):
            n = lib.llama_model_meta_key_by_index(self._model, i, buf, len(buf))
            key = buf.value.decode("utf-8", "replace") if n >= 0 else None
            n = lib.llama_model_meta_val_str_by_index(self._model, i, buf, len(buf))
            if key and n >= 0:
                if n >= len(buf):  # long values (chat templates) need a bigger buffer
                    big = ctypes.create_string_buffer(n + 1)
                    lib.llama_model_meta_val_str_by_index(self._model, i, big, len(big))
                    out[key] = big.value.decode("utf-8", "replace")
                else:
                    out[key] = buf.value.decode("utf-8", "replace")
        return out

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of `text`; `special` parses control tokens written in the text (chat templates)."""
        lib = _lib()
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (ctypes.c_int32 * cap)()
        n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (ctypes.c_int32 * cap)()
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            raise LlmError(f"{self.path}: could not tokenize {len(data)} bytes of text")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens: empty)."""
        lib = _lib()
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
        return buf.raw[:max(n, 0)]

    def token_text(self, token: int) -> str:
        """A token as the vocabulary spells it, control tokens included ('<|im_end|>', '</s>')."""
        text = _lib().llama_vocab_get_text(self._vocab, int(token))
        return (text or b"").decode("utf-8", "replace")

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_end(self, token: int) -> bool:
        return bool(_lib().llama_vocab_is_eog(self._vocab, int(token)))

    def close(self) -> None:
        with self._lock:
            if self._model:
                _lib().llama_model_free(self._model)
                self._model = None

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LlamaModel({str(self.path)!r}, n_embd={self.n_embd}, n_vocab={self.n_vocab})"


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
        lib = _lib()
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
            raise LlmError(f"{model.path}: llama.cpp could not create a context of {n_ctx} tokens{_recent_errors()}")
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
            _ABORTED_AT[0] = now
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
        lib = _lib()
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
                raise LlmError(f"{self.model.path.name}: llama_decode failed with code {rc}{_recent_errors()}")
            self._held += [it[0] for it in items[i:j]]
            i = j

    def _forget_from(self, pos: int) -> None:
        lib = _lib()
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
        ptr = _lib().llama_get_logits_ith(self._ctx, -1)
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
            lib = _lib()
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
