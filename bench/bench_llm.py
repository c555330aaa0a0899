"""The explanation LLM on this machine: time to first token, tokens/s, explanation latency per flagged
part, and the frame loop's latency with the LLM busy against idle.

    python bench/bench_llm.py --pack packs/default [--parts 12] [--frames 240] [--json out.json]

1. Raw engine: the chat prompt of a flagged part's findings (~270 tokens) decoded from scratch, then
   64 generated tokens; 1 and 2 threads.
2. ExplainWorker (1 thread): explanations of synthetic flagged parts, one at a time (compute time) and
   as a burst through the queue (latency seen by the MES, queue wait included).
3. Frame loop: the scorer on one thread (ONNX Runtime and BLAS at 1 thread) scoring synthetic frames
   while the worker (1 thread) explains a stream of parts, against the same loop with the worker idle;
   idle and busy blocks alternate to spread drift from other load on the machine.
4. With --sentences: how many of the model's sentences survive the check against the findings
   (edge.explain.claims.check_claims), over the first explanation and the follow-ups the model answers
   (descriptions), on synthetic flagged parts and issue 17's three-region part; why the rest were dropped.
Prints markdown for docs/benchmarks.md.
"""
from __future__ import annotations

import os

# One thread for the frame loop's ONNX Runtime and BLAS: the other core belongs to the LLM worker.
os.environ.setdefault("ANOMALY_EDGE_THREADS", "1")
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_scoring import cpu_name  # noqa: E402
from edge.explain.dialogue import DialogueStore  # noqa: E402
from edge.explain.dialogue import Session  # noqa: E402
from edge.explain.explainer import Explainer, lower_thread_priority  # noqa: E402
from edge.explain.findings import describe  # noqa: E402
from edge.explain.llama_engine import LlamaEngine  # noqa: E402
from edge.explain.llama_model import LlamaModel  # noqa: E402
from edge.pack import load_pack  # noqa: E402
from edge.explain.prompts import ChatPrompt  # noqa: E402
from edge.explain.questions import FIRST_QUESTION  # noqa: E402
from edge.explain.runtime_words import opening  # noqa: E402
from edge.scoring.factory import build_scorer  # noqa: E402
from edge.station.enrollment import build_state  # noqa: E402
from edge.line.synthetic import SyntheticLine  # noqa: E402
from edge.explain.worker import ExplainWorker  # noqa: E402

MM_PER_PIXEL = 0.05


def station(pack, seed: int = 0):
    line = SyntheticLine(seed=seed, defect_rate=0.5)
    state = build_state(pack, line.good(16), seed=seed, quiet=True)
    return line, build_scorer(pack, state)


def flagged_findings(line, scorer, n: int) -> list:
    out = []
    for part in line.parts(20 * n):
        r = scorer.score_one(part.image)
        if r.anomalous and r.regions:
            out.append(describe(part.image, r, mm_per_pixel=MM_PER_PIXEL))
            if len(out) == n:
                break
    return out


def bench_engine(pack, findings, threads: int, repeats: int = 5) -> dict:
    model = LlamaModel(pack.file(pack.llm.file))
    engine = LlamaEngine(model, n_ctx=pack.llm.context_length, n_threads=threads)
    prompt = ChatPrompt(model)
    tokens = prompt.tokens(findings, [], "Describe this part's defect in detail, in several sentences.",
                           opening(findings) + " It looks like a")
    ttft, tps, n_gen = [], [], []
    engine.generate([tokens], max_tokens=8)  # warm-up
    for _ in range(repeats):
        engine.reset()
        g = engine.generate([tokens], max_tokens=64)
        ttft.append(g.ttft_s * 1000)
        tps.append(g.tokens_per_s)
        n_gen.append(len(g.tokens))
    engine.close()
    model.close()
    return {"threads": threads, "prompt_tokens": len(tokens), "ttft_ms": float(np.median(ttft)),
            "prompt_tokens_per_s": len(tokens) / (np.median(ttft) / 1000), "tokens_per_s": float(np.median(tps)),
            "generated": int(np.median(n_gen))}


def bench_worker(pack, findings: list, work: Path) -> dict:
    messages = []
    with DialogueStore(work / "serial.sqlite") as store, \
            ExplainWorker(pack, store, messages.append, queue_size=len(findings), n_threads=1) as worker:
        compute = []
        for i, f in enumerate(findings):  # one at a time: the cost of one explanation
            worker.submit(f"serial-{i}", f)
            _wait(worker, i + 1)
            compute.append(messages[-1]["compute_ms"])
    messages.clear()
    with DialogueStore(work / "burst.sqlite") as store, \
            ExplainWorker(pack, store, messages.append, queue_size=4, n_threads=1) as worker:
        t0 = time.monotonic()
        accepted = [worker.submit(f"burst-{i}", f) for i, f in enumerate(findings)]  # all at once
        _wait(worker, len(findings))
        burst_s = time.monotonic() - t0
    latency = [m["latency_ms"] for m in messages]
    return {"parts": len(findings), "compute_ms_p50": float(np.percentile(compute, 50)),
            "compute_ms_p90": float(np.percentile(compute, 90)), "compute_ms_max": float(np.max(compute)),
            "model_sentence_kept": sum(m["source"] == "findings+model" for m in messages) / len(messages),
            "burst_queue_size": 4, "burst_overflowed": accepted.count(False),
            "burst_latency_ms_p50": float(np.percentile(latency, 50)), "burst_latency_ms_max": float(np.max(latency)),
            "burst_s": burst_s}


def _wait(worker: ExplainWorker, done: int, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s = worker.stats()
        if s["done"] + s["failed"] >= done:
            return
        time.sleep(0.01)
    raise RuntimeError(f"worker stuck: {worker.stats()}")


MODEL_QUESTIONS = (FIRST_QUESTION, "Can you describe it more precisely?", "What does it look like?",
                   "Describe the defect in detail.", "What about region 2?")


def bench_sentences(pack, findings: list, work: Path) -> dict:
    """Model sentences checked and kept, per question, over every part's dialogue; the reasons for drops."""
    import collections
    import re as _re

    from edge.explain.answers import respond

    explainer = Explainer(pack, n_threads=1)
    judged = kept = answers = model_answers = 0
    reasons: collections.Counter = collections.Counter()
    with DialogueStore(work / "sentences.sqlite") as store:
        for i, f in enumerate(findings):
            store.open_session(f"part-{i}", f.to_dict())
            for q in MODEL_QUESTIONS:
                a = respond(explainer, store, f"part-{i}", q)
                answers += 1
                judged += a.model_sentences
                kept += a.kept_sentences
                model_answers += a.source == "findings+model"
                for why in a.rejected:
                    reason = why.rsplit(": ", 1)[-1] if not why.startswith("unfinished") else "unfinished or too short"
                    reasons[_re.sub(r"[\d.]+|'[^']*'", "#", reason.split(";")[0]).strip()] += 1
    explainer.close()
    return {"parts": len(findings), "questions": list(MODEL_QUESTIONS), "answers": answers,
            "model_sentences": judged, "kept_sentences": kept, "kept_fraction": kept / max(1, judged),
            "answers_with_a_model_sentence": model_answers / max(1, answers),
            "drop_reasons": dict(reasons.most_common(8))}


def bench_frame_loop(pack, line, scorer, findings: list, frames: int, blocks: int, nice: int) -> dict:
    """Frame latency with the LLM explaining (busy) and not (idle), in short alternating blocks so that
    other load on the machine falls on both alike. The LLM runs the worker's code (Explainer, 1 thread,
    the worker's priority) on parts cycling through `findings`; a busy block ends by letting the
    explanation in progress finish (not timed), so the LLM always makes progress."""
    stream = [p.image for p in line.parts(frames)]
    for img in stream[:5]:
        scorer.score_one(img)  # warm-up
    explainer = Explainer(pack, n_threads=1)
    busy, idle_now, finish = threading.Event(), threading.Event(), threading.Event()
    idle_now.set()
    counts = {"answers": 0, "seconds": 0.0}

    def explain_while_busy():
        lower_thread_priority(nice)
        i = 0
        while not finish.is_set():
            if not busy.wait(0.05):
                continue
            idle_now.clear()
            while busy.is_set():
                f = findings[i % len(findings)].to_dict()
                i += 1
                t = time.perf_counter()
                explainer.answer(Session(f"load-{i}", f, "pending", 0.0, 0.0), FIRST_QUESTION)
                counts["answers"] += 1
                counts["seconds"] += time.perf_counter() - t
            idle_now.set()

    thread = threading.Thread(target=explain_while_busy, daemon=True)
    thread.start()
    lat = {"idle": [], "busy": []}
    try:
        for _ in range(blocks):
            for mode in ("idle", "busy"):
                if mode == "busy":
                    busy.set()
                    while idle_now.is_set():
                        time.sleep(0.001)
                else:
                    busy.clear()
                    idle_now.wait()
                for img in stream:
                    t0 = time.perf_counter()
                    r = scorer.score_one(img)
                    if r.anomalous:
                        describe(img, r, mm_per_pixel=MM_PER_PIXEL)  # the frame path's own share of the work
                    lat[mode].append((time.perf_counter() - t0) * 1000)
    finally:
        busy.clear()
        finish.set()
        thread.join()
        explainer.close()
    idle, busy_ms = np.asarray(lat["idle"]), np.asarray(lat["busy"])
    return {"frames_per_mode": len(idle), "blocks": blocks, "nice": nice, "load_average": os.getloadavg()[0],
            **{f"{name}_p{q}_ms": float(np.percentile(values, q)) for name, values in (("idle", idle), ("busy", busy_ms))
               for q in (50, 90, 99)},
            "p99_ratio": float(np.percentile(busy_ms, 99) / np.percentile(idle, 99)),
            "explained_while_busy": counts["answers"],
            "explanation_ms_while_busy": 1000 * counts["seconds"] / max(1, counts["answers"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default="packs/default")
    ap.add_argument("--parts", type=int, default=12, help="flagged parts for the explanation latency")
    ap.add_argument("--frames", type=int, default=20, help="frames per idle/busy block")
    ap.add_argument("--blocks", type=int, default=30, help="idle/busy block pairs")
    ap.add_argument("--nice", type=int, nargs="+", default=[10, 0],
                    help="worker nice values to measure the frame loop with (the default worker uses 10)")
    ap.add_argument("--frame-loop-only", action="store_true", help="measure only the frame loop")
    ap.add_argument("--sentences", action="store_true",
                    help="measure only how many model sentences survive the check (see the module docstring)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    pack = load_pack(args.pack)
    if pack.llm is None or pack.llm.kind != "chat":
        print(f"{args.pack}: needs a pack with a chat LLM (the default pack has one)", file=sys.stderr)
        return 2
    line, scorer = station(pack)
    findings = flagged_findings(line, scorer, args.parts)
    results = {"date": dt.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
               "pack": pack.model_id, "llm": pack.manifest.provenance.get("llm", pack.llm.file)}
    if args.sentences:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_explain_adversarial import issue_part

        with tempfile.TemporaryDirectory() as tmp:
            results["sentences"] = bench_sentences(pack, findings + [issue_part()], Path(tmp))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        print(sentences_report(results))
        return 0
    if not args.frame_loop_only:
        results["engine"] = [bench_engine(pack, findings[0], t) for t in (1, 2)]
        with tempfile.TemporaryDirectory() as tmp:
            results["worker"] = bench_worker(pack, findings, Path(tmp))
    results["frame_loop"] = [bench_frame_loop(pack, line, scorer, findings, args.frames, args.blocks, n)
                             for n in args.nice]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(report(results))
    return 0


def sentences_report(r: dict) -> str:
    s = r["sentences"]
    reasons = "; ".join(f"{why} ({n})" for why, n in s["drop_reasons"].items())
    return (f"Date {r['date']}, {r['cpu']}; LLM {r['llm']}. {s['parts']} flagged parts x {len(s['questions'])} "
            f"questions the model answers ({s['answers']} answers): {s['kept_sentences']} of "
            f"{s['model_sentences']} model sentences kept ({s['kept_fraction']:.0%}); "
            f"{s['answers_with_a_model_sentence']:.0%} of answers carry at least one. Dropped: {reasons}.")


def report(r: dict) -> str:
    lines = [f"Date {r['date']}, {r['cpu']}, {r['cores']} cores; pack {r['pack']}, LLM {r['llm']}."]
    if "engine" in r:
        lines += ["", "| threads | prompt tokens | time to first token | prompt tokens/s | generated tokens/s |",
                  "|---|---|---|---|---|"]
        for e in r["engine"]:
            lines.append(f"| {e['threads']} | {e['prompt_tokens']} | {e['ttft_ms']:.0f} ms | "
                         f"{e['prompt_tokens_per_s']:.0f} | {e['tokens_per_s']:.0f} |")
    if "worker" in r:
        w = r["worker"]
        lines += ["", f"Explanation of a flagged part ({FIRST_QUESTION!r}, worker on 1 thread, {w['parts']} parts): "
                      f"p50 {w['compute_ms_p50']:.0f} ms, p90 {w['compute_ms_p90']:.0f} ms, "
                      f"max {w['compute_ms_max']:.0f} ms; the model's sentence kept in {w['model_sentence_kept']:.0%} "
                      f"of answers. A burst of {w['parts']} parts into a queue of {w['burst_queue_size']} "
                      f"({w['burst_overflowed']} marked pending): latency p50 {w['burst_latency_ms_p50']:.0f} ms, "
                      f"max {w['burst_latency_ms_max']:.0f} ms, all done in {w['burst_s']:.1f} s."]
    lines += ["", "| LLM thread nice | idle p50 / p90 / p99 ms | busy p50 / p90 / p99 ms | busy/idle p99 | "
                  "explanations | ms per explanation |", "|---|---|---|---|---|---|"]
    for f in r["frame_loop"]:
        lines.append(f"| {f['nice']} | {f['idle_p50_ms']:.1f} / {f['idle_p90_ms']:.1f} / {f['idle_p99_ms']:.1f} | "
                     f"{f['busy_p50_ms']:.1f} / {f['busy_p90_ms']:.1f} / {f['busy_p99_ms']:.1f} | "
                     f"{f['p99_ratio']:.2f} | {f['explained_while_busy']} | {f['explanation_ms_while_busy']:.0f} |")
    f = r["frame_loop"][0]
    lines.append(f"\n({f['frames_per_mode']} frames per mode, in {f['blocks']} alternating idle/busy blocks; "
                 f"load average {f['load_average']:.1f} at the end)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
