"""The GGUF model on llama.cpp (llama-cpp-python's low-level API): owns the shared library (imported and
initialised once, its log routed to `logging` and kept for error messages), `LlamaModel` (weights,
vocabulary, GGUF metadata, tokenizer) and `LlmError`, the error of everything that explains parts.

It does not generate: a llama context and its decoding loop are edge.explain.llama_engine's.

    model = LlamaModel("smollm2.gguf")
    model.tokenize("Is there an anomaly?", add_bos=True)
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from edge.errors import EdgeError

log = logging.getLogger(__name__)
GGUF_MAGIC = b"GGUF"


class LlmError(EdgeError):
    """The language model cannot be loaded or used: bad GGUF, prompt too long, bad input."""


# --- llama.cpp library and its log ------------------------------------------------------------------

_LIB_LOCK = threading.Lock()
_LIB = None
_RECENT_LOG: deque[str] = deque(maxlen=40)


def llama_lib():
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


def note_requested_abort(now: float) -> None:
    """An engine asked llama.cpp to abort at `now`: the decode error it logs next is only DEBUG."""
    _ABORTED_AT[0] = now


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


def recent_llama_errors(n: int = 4) -> str:
    """What llama.cpp last warned about, for an error message (empty when it said nothing)."""
    lines = list(_RECENT_LOG)[-n:]
    return ("; llama.cpp said: " + " | ".join(lines)) if lines else ""


# --- the model -----------------------------------------------------------------------------------------

class LlamaModel:
    """A GGUF loaded for inference on the CPU. Errors name the file."""

    def __init__(self, path: str | Path):
        lib = llama_lib()
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
            raise LlmError(f"{self.path}: llama.cpp could not load this GGUF{recent_llama_errors()}")
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
        lib = llama_lib()
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
        lib = llama_lib()
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
        lib = llama_lib()
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
        return buf.raw[:max(n, 0)]

    def token_text(self, token: int) -> str:
        """A token as the vocabulary spells it, control tokens included ('<|im_end|>', '</s>')."""
        text = llama_lib().llama_vocab_get_text(self._vocab, int(token))
        return (text or b"").decode("utf-8", "replace")

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_end(self, token: int) -> bool:
        return bool(llama_lib().llama_vocab_is_eog(self._vocab, int(token)))

    def close(self) -> None:
        with self._lock:
            if self._model:
                llama_lib().llama_model_free(self._model)
                self._model = None

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LlamaModel({str(self.path)!r}, n_embd={self.n_embd}, n_vocab={self.n_vocab})"
