"""What the portable llama.cpp build and the LLM's own process cost, measured side by side in one run.

    python bench/bench_llm_process.py --pack packs/default [--build native=/tmp/venv-native/bin/python ...]
                                      [--rounds 5] [--json out.json]

1. Build: generated tokens/s and prompt decode of the pack's GGUF with this interpreter's llama-cpp-python
   (the portable build of scripts/build-llama-cpp.sh) against other interpreters' (NAME=PYTHON, e.g. a
   native build: scripts/build-llama-cpp.sh VENV --flavour native), each in a fresh child process,
   rounds alternating; a build that crashes is reported with its signal.
2. Process boundary: the same explanation answered by an Explainer in this process and by an LlmProcess
   (edge.explain.llm_process), alternating: time to the first streamed text, time to the first model token, total.
Prints markdown for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_scoring import cpu_name  # noqa: E402

_ENGINE = r"""
import json, sys, time
from edge.explain.llama_engine import LlamaEngine
from edge.explain.llama_model import LlamaModel, llama_lib
model = LlamaModel(sys.argv[1])
engine = LlamaEngine(model, n_ctx=2048, n_threads=1)
prompt = model.tokenize("Describe the defect on the part in one sentence. " * 24, add_bos=True)
t0 = time.monotonic(); engine.evaluate([prompt]); prefill = time.monotonic() - t0
engine.reset()
g = engine.generate([prompt[:16]], max_tokens=128)
info = llama_lib().llama_print_system_info()
print(json.dumps({"prompt_tokens": len(prompt), "prompt_tok_s": len(prompt) / prefill, "gen_tok_s": g.tokens_per_s,
                  "generated": len(g.tokens), "system_info": info.decode() if isinstance(info, bytes) else str(info)}))
"""


_INFO = ("from edge.explain.llama_model import llama_lib; i = llama_lib().llama_print_system_info(); "
         "print(i.decode() if isinstance(i, bytes) else i)")


def system_info(python: str) -> str:
    proc = subprocess.run([python, "-c", _INFO], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc.stdout.strip() or f"(exit {proc.returncode})"


def engine_run(python: str, gguf: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([python, "-c", _ENGINE, str(gguf)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        from edge.explain.llm_process import describe_exit

        return {"error": describe_exit(proc.returncode)[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def boundary(pack, rounds: int) -> dict:
    from bench.bench_llm import flagged_findings, station
    from edge.explain.dialogue import Session
    from edge.explain.explainer import Explainer
    from edge.explain.llm_process import LlmProcess
    from edge.explain.questions import FIRST_QUESTION

    line, scorer = station(pack)
    findings = flagged_findings(line, scorer, 1)[0]  # a real flagged synthetic part
    session = Session("bench", findings.to_dict(), "pending", time.time(), time.time())
    local = Explainer(pack, n_threads=1)
    t0 = time.monotonic()
    child = LlmProcess(pack, n_threads=1, nice=0).start()
    start_s = time.monotonic() - t0
    out = {"in_process": {"first_text_ms": [], "ttft_ms": [], "total_ms": [], "tok_s": []},
           "child_process": {"first_text_ms": [], "ttft_ms": [], "total_ms": [], "tok_s": []}}
    try:
        for _ in range(rounds):
            for name, engine in (("in_process", local), ("child_process", child)):
                engine_answer = engine.answer if name == "child_process" else local.answer
                if name == "in_process":
                    local.engine.reset()  # both decode the prompt from scratch
                first = []
                t0 = time.monotonic()
                a = engine_answer(session, FIRST_QUESTION, on_token=lambda _: first or first.append(time.monotonic()))
                total = time.monotonic() - t0
                r = out[name]
                r["first_text_ms"].append((first[0] - t0) * 1000)
                r["ttft_ms"].append(a.ttft_ms)
                r["total_ms"].append(total * 1000)
                gen_s = total - (a.ttft_ms or 0) / 1000
                r["tok_s"].append((a.n_tokens - 1) / gen_s if a.n_tokens > 1 and gen_s > 0 else float("nan"))
                if name == "child_process":
                    child.close()  # the child's context also starts from scratch next round
                    child.start()
    finally:
        local.close()
        child.close()
    summary = {k: {m: round(statistics.median(v), 1) for m, v in r.items()} for k, r in out.items()}
    summary["child_start_s"] = round(start_s, 2)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default="packs/default")
    ap.add_argument("--build", action="append", default=[], metavar="NAME=PYTHON",
                    help="another interpreter with its own llama-cpp-python build (repeatable)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    from edge.pack import load_pack

    pack = load_pack(args.pack)
    gguf = pack.file(pack.llm.file)
    builds = {"portable": sys.executable}
    for item in args.build:
        name, _, python = item.partition("=")
        if not python:
            ap.error(f"--build takes NAME=PYTHON, got {item!r}")
        builds[name] = python
    runs = {name: [] for name in builds}
    for _ in range(args.rounds):
        for name, python in builds.items():
            runs[name].append(engine_run(python, gguf))
    build = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        build[name] = {"runs": len(rs), "failed": [r["error"] for r in rs if "error" in r],
                       "gen_tok_s": round(statistics.median(r["gen_tok_s"] for r in ok), 1) if ok else None,
                       "prompt_tok_s": round(statistics.median(r["prompt_tok_s"] for r in ok), 1) if ok else None,
                       "system_info": system_info(builds[name])}
    result = {"date": dt.date.today().isoformat(), "cpu": cpu_name(), "gguf": gguf.name, "build": build,
              "boundary": boundary(pack, args.rounds)}
    print(f"\n{result['cpu']}, {result['date']}, {gguf.name}, 1 thread, median of {args.rounds} rounds\n")
    print("| build | generated tok/s | prompt tok/s | runs that crashed | CPU features compiled in |\n|---|---|---|---|---|")
    for name, b in build.items():
        crashed = f"{len(b['failed'])}/{b['runs']}" + (f" ({b['failed'][0]})" if b["failed"] else "")
        print(f"| {name} | {b['gen_tok_s']} | {b['prompt_tok_s']} | {crashed} | {b['system_info']} |")
    bd = result["boundary"]
    print("\n| where the LLM runs | first text ms | first model token ms | total ms | generated tok/s |\n|---|---|---|---|---|")
    for name in ("in_process", "child_process"):
        r = bd[name]
        print(f"| {name.replace('_', ' ')} | {r['first_text_ms']} | {r['ttft_ms']} | {r['total_ms']} | {r['tok_s']} |")
    print(f"\nchild process start (import + model load): {bd['child_start_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
