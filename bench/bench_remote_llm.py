"""Explanations per minute and flag->explanation latency: S simulated stations (one explanation worker
each, explain.backend remote) submitting their flagged parts at once to one `python -m llama_cpp.server`
on loopback, against one station's local worker (the LLM child, edge.explain.llm_process) on the same parts.

    PYTHONPATH=. python bench/bench_remote_llm.py --stations 4 --parts 4 --threads 1 [--json out.json]

Both ways use the default pack's GGUF (SmolLM2-135M) with the same thread count, so on one machine this
measures the overhead and queueing of the remote path; a central server on its own hardware is what
the remote backend is for. Latency is each message's latency_ms (submit to explanation)."""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(workers, parts_per_worker: int, findings) -> dict:
    messages = [m for _, _, m in workers]
    t0 = time.monotonic()
    for w, _, _ in workers:  # every station flags its parts at once
        for i in range(parts_per_worker):
            w.submit(f"P-{i}", findings[i % len(findings)])
    total = parts_per_worker * len(workers)
    while sum(len(m) for m in messages) < total:
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    lat = np.array([m["latency_ms"] for ms in messages for m in ms])
    failed = sum(m["status"] != "done" for ms in messages for m in ms)
    return {"explanations": total, "failed": failed, "seconds": round(elapsed, 1),
            "per_minute": round(total / elapsed * 60, 1), "latency_ms_p50": round(float(np.percentile(lat, 50))),
            "latency_ms_p99": round(float(np.percentile(lat, 99))),
            "tokens_mean": round(float(np.mean([m.get("n_tokens") or 0 for ms in messages for m in ms])), 1),
            "model_sentences_kept": sum(m.get("source") == "findings+model" for ms in messages for m in ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stations", type=int, default=4)
    ap.add_argument("--parts", type=int, default=4, help="flagged parts per station")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads, server and local child alike")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json")
    args = ap.parse_args()

    from conftest import llm_pack
    from edge.explain.dialogue import DialogueStore
    from edge.explain.worker import ExplainWorker
    from edge.explain.remote_llm import RemoteFirst, RemoteLlm
    from export import assets
    from test_remote_llm import flagged_findings

    gguf = assets.fetch(assets.SMOLLM2_135M, log=lambda m: None)
    findings = [flagged_findings(i) for i in range(8)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    pack = llm_pack(tmp / "pack", gguf)
    out = {"machine": "2-core Intel Xeon (shared)", "gguf": gguf.name, **vars(args)}

    def worker(name, llm=None):
        messages = []
        store = DialogueStore(tmp / f"{name}.sqlite")
        w = ExplainWorker(pack, store, messages.append, queue_size=64, n_threads=args.threads,
                          max_tokens=args.max_tokens, time_limit_s=60, llm=llm).start()
        return w, store, messages

    port = free_port()
    log = open(tmp / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                               "--port", str(port), "--n_threads", str(args.threads), "--n_ctx", "2048",
                               "--interrupt_requests", "False"],  # queue the stations, do not cut them off
                              stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"llama_cpp.server did not start; see {log.name}")
                time.sleep(0.1)
        stations = [worker(f"remote-{s}", RemoteFirst(RemoteLlm(f"http://127.0.0.1:{port}", "smollm2",
                                                                time_limit_s=60, max_tokens=args.max_tokens)))
                    for s in range(args.stations)]
        out["remote"] = run_workers(stations, args.parts, findings)
        for w, store, _ in stations:
            w.stop()
            store.close()
    finally:
        server.kill()
        server.wait()
    local = [worker("local")]
    out["local"] = run_workers(local, args.parts * args.stations, findings)
    local[0][0].stop()
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
