"""`anomaly-edge ask`: score one image and hold a dialogue about it with the pack's LLM, which runs in a
supervised child process; the session is kept in SQLite."""
from __future__ import annotations

import sys
from pathlib import Path

from edge.cli.options import positive, positive_float
from edge.errors import EdgeError


def cmd_ask(args) -> int:
    import hashlib
    from contextlib import closing

    from edge.explain.dialogue import DialogueStore
    from edge.explain.answers import respond
    from edge.explain.findings import describe
    from edge.explain.llm_process import LlmProcess, LlmProcessError
    from edge.pack import load_pack
    from edge.inference.preprocess import read_image
    from edge.explain.questions import FIRST_QUESTION
    from edge.station.state import load_state
    from edge.scoring.factory import build_scorer

    pack = load_pack(args.pack)
    state = load_state(args.state, pack)
    scorer = build_scorer(pack, state, state.tiling_spec)
    image = read_image(args.image)
    findings = describe(image, scorer.score_one(image), mm_per_pixel=args.mm_per_pixel).to_dict()
    part_id = args.part_id or f"{Path(args.image).stem}-{hashlib.sha256(image.tobytes()).hexdigest()[:12]}"
    # The LLM runs in a supervised child process: a crash inside llama.cpp (SIGILL on a CPU it was not
    # built for, SIGSEGV, the OOM killer) ends this command with one line naming the signal.
    explainer = LlmProcess(pack, n_threads=args.threads, nice=0).start()
    with closing(explainer), DialogueStore(args.db or Path(args.state) / "dialogue.sqlite") as store:
        session = store.get(part_id)
        if session is None or session.findings != findings:
            store.open_session(part_id, findings)
            session = store.session(part_id)
        print(f"part {part_id}: {findings['summary']}", file=sys.stderr)

        def say(question: str, echo: bool = True) -> None:
            if echo:
                print(f"> {question}")
            try:
                respond(explainer, store, part_id, question, on_token=lambda t: print(t, end="", flush=True))
            finally:
                print()

        for q, a in session.exchanges():
            print(f"> {q}\n{a}")
        if not session.turns:
            say(FIRST_QUESTION)
        if args.question is not None:
            say(args.question)
            return 0
        while True:  # interactive: one question per line, until an empty line or end of input
            try:
                question = input("? ").strip()
            except EOFError:
                break
            if not question or question.lower() in ("quit", "exit"):
                break
            try:
                say(question, echo=not sys.stdin.isatty())  # a terminal shows what was typed
            except LlmProcessError:
                raise  # the engine is gone: main() prints the one-line reason
            except EdgeError as e:
                print(f"error: {e}", file=sys.stderr)
    return 0



def add_parsers(sub) -> None:
    a = sub.add_parser("ask", help="score one image and talk about it with the pack's LLM (session kept in SQLite)")
    a.add_argument("--pack", required=True)
    a.add_argument("--state", required=True)
    a.add_argument("--image", required=True)
    a.add_argument("--question", help="one follow-up question (default: interactive, one question per line)")
    a.add_argument("--mm-per-pixel", type=positive_float, help="the station's scale, for sizes in mm")
    a.add_argument("--part-id", help="session key (default: image name and content hash)")
    a.add_argument("--db", help="dialogue database (default: STATE/dialogue.sqlite)")
    a.add_argument("--threads", type=positive, default=1, help="LLM threads")
    a.set_defaults(func=cmd_ask)
