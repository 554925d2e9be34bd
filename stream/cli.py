"""`python -m stream`: the server's own commands, serve and models.

`grym-stream` (grym/cli.py) adds the client and the benchmarks to these. The serve flags are
made from the Settings fields, so a new setting is a flag and a `GRYM_` variable at once, with
one default in one place.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence

from stream import __version__


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    from stream.settings import Settings

    for name, field in Settings.model_fields.items():
        choices = None
        if typing.get_origin(field.annotation) is typing.Literal:
            choices = typing.get_args(field.annotation)
        default = (
            "(unset)" if field.default is None else field.get_default(call_default_factory=True)
        )
        help_text = (
            f"{field.description or name.replace('_', ' ')} (default: {default}; "
            f"env GRYM_{name.upper()})"
        )
        # Values stay strings here: pydantic converts and validates them like the env vars.
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, choices=choices, default=None, help=help_text
        )


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from models.presets import ExportVerificationError, ModelLoadError
    from stream.pipeline import PipelineError
    from stream.settings import Settings
    from stream.web.server import Server, server_config
    from stream.wiring import (
        ClusterUnavailable,
        TracingUnavailable,
        check_tracing,
        default_analysers,
        load_plugins,
        named_pipelines,
    )

    overrides = {
        k: v for k, v in vars(args).items() if k not in ("command", "func") and v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"grym-stream: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from stream.logs import configure

    configure(
        settings.log_level, settings.log_format, settings.frontend_id if settings.store else None
    )
    if settings.log_format == "json":  # one record, so that every line stays JSON
        logging.getLogger("stream").info(
            "grym-stream %s starting with settings: %s", __version__, settings.describe()
        )
    else:
        print(
            f"grym-stream {__version__} starting with settings:\n{settings.describe()}", flush=True
        )
    try:
        check_tracing(settings)
    except TracingUnavailable as exc:
        print(f"grym-stream: {exc}", file=sys.stderr)
        return 2
    # Models load (and export, the first time) before the server listens, so a bad checkpoint
    # is a clear message and exit status 2, not a traceback from the application's start-up.
    try:
        load_plugins(settings)
    except ImportError as exc:
        print(f"grym-stream: cannot import a plugin: {exc}", file=sys.stderr)
        return 2
    try:
        analysers = default_analysers(settings)
    except (ModelLoadError, ExportVerificationError) as exc:
        print(f"grym-stream: cannot load the analysis model: {exc}", file=sys.stderr)
        return 2
    except ClusterUnavailable as exc:
        print(f"grym-stream: cannot run the models on Ray (--inference ray): {exc}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        named_pipelines(settings, [a.name for a in analysers])
    except PipelineError as exc:
        print(f"grym-stream: {exc}", file=sys.stderr)
        return 2
    local = settings.inference == "local"  # (else: the Ray replicas load the generator)
    if local and settings.generator not in ("none", "auto", "tiny", "s-random"):
        # The worker process loads it; where it lives is checked here, for the same reason.
        from models.audioldm_components import generator_folder

        try:
            generator_folder(settings.generator)
        except ModelLoadError as exc:
            print(f"grym-stream: cannot load the generator: {exc}", file=sys.stderr)
            return 2
    server = Server(server_config(settings, lambda _: analysers))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn has shut down gracefully, then re-raised Ctrl-C
        return 130
    return 130 if server.interrupted else 0  # 130: what a shell reports for Ctrl-C


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`serve` (its flags made from Settings) and `models`, on a parser's subcommands."""
    # No prefix matching: a mistyped or unknown flag is an error, never another setting.
    serve = commands.add_parser("serve", help="run the server", allow_abbrev=False)
    _add_settings_flags(serve)
    serve.set_defaults(func=_serve)
    from models.cli import add_parser as add_models_parser

    add_models_parser(commands)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"grym-stream {__version__}")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
