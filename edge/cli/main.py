"""`anomaly-edge`: the one command. Subcommands: export, enroll, score, eval, demo, ask, run, console, fleet."""
# Each group of subcommands is one module of edge/cli with `add_parsers(sub)`; this one builds the parser
# from them and turns errors into exit codes.
from __future__ import annotations

import argparse
import logging
import sys

from edge.cli import ask_command, export_command, line_commands, scoring_commands, station_commands
from edge.errors import EdgeError

COMMAND_MODULES = (export_command, station_commands, scoring_commands, ask_command, line_commands)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anomaly-edge", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        from edge.explain.llm_process import LlmProcessError

        return 3 if isinstance(e, LlmProcessError) else 2  # 3: the LLM process crashed or hung
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
