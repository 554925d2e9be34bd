"""`grym-stream`: serve, models (the server's own commands), client, bench, chaos, cluster."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from stream import __version__
from stream.cli import add_commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grym-stream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"grym-stream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_commands(commands)
    # These two parse their own arguments (and answer their own --help).
    commands.add_parser(
        "client", help="stream a microphone or a file (see `client --help`)", add_help=False
    )
    commands.add_parser(
        "bench",
        help="latency benchmarks against a real server (see `bench --help`)",
        add_help=False,
    )
    commands.add_parser(
        "chaos",
        help="attack a server and measure that it holds (see `chaos --help`)",
        add_help=False,
    )
    commands.add_parser(
        "cluster",
        help="several front-ends, PostgreSQL and a balancer here (see `cluster --help`)",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "client":
        from clients.mic import main as client_main

        return client_main(list(rest))
    if args.command == "bench":
        from benchmarks.bench import main as bench_main

        return bench_main(list(rest))
    if args.command == "chaos":
        from benchmarks.chaos.run import main as chaos_main

        return chaos_main(list(rest))
    if args.command == "cluster":
        from grym.cluster.run import main as cluster_main

        return cluster_main(list(rest))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
