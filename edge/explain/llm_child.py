"""The LLM child process's side (`python -m edge.explain.llm_child`, started by edge.explain.llm_process):
it loads the pack's GGUF into an `Explainer`, answers the parent's requests over the socket it was given
(streaming tokens, honouring cancels), forwards its warnings to the parent's log, and exits when the
parent closes or goes away. A native crash here costs one answer; the parent reads how it died.

Drill hook, for fault tests only: ANOMALY_EDGE_LLM_FAULT="SIGNAME@load" or "SIGNAME@token" makes the
child send itself that signal after loading the model, or at the first generated token ("hang@token"
stops it answering).

It owns nothing of the parent's supervision (edge.explain.llm_process) and is never imported by it.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

from edge.errors import EdgeError

FAULT_ENV = "ANOMALY_EDGE_LLM_FAULT"


class _ForwardLog(logging.Handler):
    """Warnings and errors of the child (llama.cpp's included) go to the parent's log."""

    def __init__(self, conn: Connection, lock: threading.Lock):
        super().__init__(logging.WARNING)
        self.conn, self.send_lock = conn, lock  # (logging.Handler's own `lock` is taken around emit)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self.send_lock:
                self.conn.send({"op": "log", "level": record.levelno, "text": record.getMessage()})
        except Exception:
            pass


def _fault(where: str) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if "@" not in spec:
        return
    what, at = spec.split("@", 1)
    if at != where:
        return
    if what == "hang":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), getattr(signal, what))


def child_main(fd: int, nice: int) -> int:
    import faulthandler
    import queue
    from dataclasses import asdict

    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(0, nice))  # (also when started without _CHILD_BOOT)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # Ctrl-C is the parent's to handle
    faulthandler.enable()                               # a native crash leaves its trace in stderr
    conn = Connection(fd)
    send_lock = threading.Lock()

    def send(msg: dict) -> None:
        with send_lock:
            conn.send(msg)

    logging.basicConfig(level=logging.WARNING, handlers=[_ForwardLog(conn, send_lock)])
    requests: queue.Queue = queue.Queue()
    cancels: dict[int, threading.Event] = {}

    def read() -> None:  # its own thread, so a cancel or close reaches a running answer
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the parent is gone
            if msg["op"] == "cancel":
                cancels.setdefault(msg["id"], threading.Event()).set()
            elif msg["op"] == "close":
                for ev in cancels.values():
                    ev.set()
                requests.put(None)
                return
            else:
                requests.put(msg)

    threading.Thread(target=read, name="llm-child-reader", daemon=True).start()
    load = requests.get()
    if load is None:
        return 0
    from edge.explain.answers import Cancelled
    from edge.explain.explainer import Explainer
    from edge.explain.llama_model import llama_lib

    try:
        explainer = Explainer(load["pack"], n_threads=load["n_threads"], max_tokens=load["max_tokens"],
                              time_limit_s=load["time_limit_s"])
    except EdgeError as e:
        send({"op": "error", "type": type(e).__name__, "message": str(e)})
        return 1
    _fault("load")
    try:  # loaded: back to the normal policy at its nice value, so explanations get their share
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # not permitted: it stays SCHED_IDLE and explains when the CPU is otherwise idle
    info = llama_lib().llama_print_system_info()
    send({"op": "ready", "pid": os.getpid(), "model": explainer.model.name, "kind": explainer.kind,
          "n_ctx": explainer.engine.n_ctx, "system_info": info.decode() if isinstance(info, bytes) else str(info)})
    while True:
        req = requests.get()
        if req is None:
            break
        rid = req["id"]
        cancel = cancels.setdefault(rid, threading.Event())
        first = [True]

        def on_token(text: str, rid=rid) -> None:
            if first[0]:
                first[0] = False
                _fault("token")
            send({"op": "token", "id": rid, "text": text})

        try:
            answer = explainer.answer(req["session"], req["question"], on_token=on_token, cancel=cancel)
            send({"op": "done", "id": rid, "answer": asdict(answer)})
        except Cancelled as e:
            send({"op": "error", "id": rid, "type": "Cancelled", "message": str(e)})
        except EdgeError as e:
            send({"op": "error", "id": rid, "type": type(e).__name__, "message": str(e)})
        except Exception as e:  # a bug must not look like a crash: report it and go on
            send({"op": "error", "id": rid, "type": "LlmError", "message": f"{type(e).__name__}: {e}"})
        finally:
            cancels.pop(rid, None)
    explainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 10))
