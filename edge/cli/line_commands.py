"""`anomaly-edge run`, `console` and `fleet`: the line service, the technician console on its socket,
and one line per station from a broker's retained statuses."""
from __future__ import annotations

import logging
from pathlib import Path


def cmd_run(args) -> int:
    from edge.line.config import load_config
    from edge.line.runtime import check, run

    if args.check:
        config = load_config(args.config)
        models = check(config)  # the pack and state as `run` loads them, and the TLS files
        print(f"{args.config}: valid (station {config.station.line}/{config.station.name}, source "
              f"{config.source.kind}, trigger {config.trigger.mode}, topics {config.topic_prefix}/...; {models})")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    return run(args.config, exit_at_end=args.exit_at_end)


def cmd_fleet(args) -> int:
    from edge.cli.fleet import FleetError, run_fleet

    if args.interval <= 0:
        raise FleetError(f"fleet: --interval must be > 0 seconds, got {args.interval:g}")

    password = Path(args.password_file).read_text().strip() if args.password_file else None
    return run_fleet(args.broker, args.port, args.prefix, args.once, args.interval, args.json,
                     username=args.username, password=password, stale_s=args.stale_s)


def cmd_console(args) -> int:
    from edge.cli.console import main as console_main

    if args.socket:
        socket_path = args.socket
    else:
        from edge.line.config import load_config

        socket_path = load_config(args.config).api_socket
    return console_main(socket_path, args.user, False if args.no_colour else None)



def add_parsers(sub) -> None:
    r = sub.add_parser("run", help="the line service: capture, score every frame, MQTT, store, local API")
    r.add_argument("--config", required=True, help="station YAML (see configs/)")
    r.add_argument("--check", action="store_true",
                   help="validate the config, load and verify the pack and state as run does, then exit")
    r.add_argument("--exit-at-end", action="store_true",
                   help="stop once a finite source (file, folder, synthetic count) is done and flushed")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("console", help="technician console: flagged parts, heatmaps, questions, feedback")
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the station's YAML (its API socket is used)")
    where.add_argument("--socket", help="the station's API socket")
    c.add_argument("--user", help="who gives feedback (default: $USER)")
    c.add_argument("--no-colour", action="store_true", help="plain text (also with NO_COLOR set)")
    c.set_defaults(func=cmd_console)

    f = sub.add_parser("fleet", help="one line per station from every station's retained status on a broker")
    f.add_argument("--broker", required=True, help="the (central) broker's host")
    f.add_argument("--port", type=int, default=1883)
    f.add_argument("--prefix", default="anomaly-edge/+/+", help="station topic prefix pattern (MQTT wildcards)")
    f.add_argument("--once", action="store_true", help="print one table and exit")
    f.add_argument("--json", action="store_true", help="the rows as JSON instead of a table")
    f.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes")
    f.add_argument("--stale-s", type=float, default=60.0, help="an online status older than this reads 'stale'")
    f.add_argument("--username")
    f.add_argument("--password-file")
    f.set_defaults(func=cmd_fleet)
