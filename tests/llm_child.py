"""Run llama.cpp in a child process for tests: a native crash (SIGILL on a CPU the build does not fit)
fails the test with the signal named instead of killing pytest."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_DECODE = r"""
import json, sys
import numpy as np
from edge.explain.llama_engine import LlamaEngine
from edge.explain.llama_model import LlamaModel, llama_lib
model = LlamaModel(sys.argv[1])
engine = LlamaEngine(model, n_ctx=128, n_threads=1)
tokens = model.tokenize("The part has a scratch near the upper edge.", add_bos=True)
logits = engine.evaluate([tokens])
g = engine.generate([tokens], max_tokens=8)
info = llama_lib().llama_print_system_info()
print(json.dumps({"finite": bool(np.isfinite(logits).all()), "n_vocab": model.n_vocab,
                  "generated": len(g.tokens), "file_type": model.metadata.get("general.file_type"),
                  "system_info": info.decode() if isinstance(info, bytes) else str(info)}))
engine.close(); model.close()
"""

_INFO = r"""
from edge.explain.llama_model import llama_lib
info = llama_lib().llama_print_system_info()
print(info.decode() if isinstance(info, bytes) else info)
"""


def _run(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        pytest.fail(f"llama.cpp child process died with {name} (this llama-cpp-python build executes "
                    f"instructions this CPU or kernel does not allow?)\nstderr:\n{proc.stderr[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"llama.cpp child exited {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


_QUANTIZE = r"""
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, sys.argv[3])
p.allow_requantize = True
p.nthread = 1
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
sys.exit(0 if rc == 0 else 1)
"""


def quantize_in_child(src: Path, dst: Path, ftype: str = "LLAMA_FTYPE_MOSTLY_Q4_K_M") -> Path:
    """llama.cpp's quantizer on `src` (re-quantizing allowed), in a child process."""
    _run(_QUANTIZE, str(src), str(dst), ftype, timeout=600)
    return dst


def decode_in_child(gguf: Path) -> dict:
    """Load `gguf`, evaluate a prompt and generate 8 tokens in a child; what it saw, as a dict."""
    return json.loads(_run(_DECODE, str(gguf)).stdout.strip().splitlines()[-1])


def system_info_in_child() -> str:
    """llama.cpp's compiled-in CPU features, read in a child process."""
    return _run(_INFO).stdout.strip()
