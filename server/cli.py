"""The ``llama-inference`` command. ``serve`` flags are generated from :class:`server.settings.Settings`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from benchmarks.cli import add_commands as add_benchmark_commands
from convert.cli import add_commands as add_pipeline_commands
from convert.cli import run_pipeline_command
from server.settings import Settings

log = logging.getLogger("llama_inference")

Handler = Callable[[argparse.Namespace], int]


def _list_value(text: str) -> list[str]:
    """A list flag: a JSON list (as in the environment) or comma-separated values."""
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list):
            raise argparse.ArgumentTypeError("expected a JSON list")
        return [str(v) for v in value]
    return [part.strip() for part in text.split(",") if part.strip()]


def _scalar_type(annotation: object) -> type:
    """The type argparse should convert a flag to: the non-None member of an optional annotation."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members[0] if members else str
    return annotation if isinstance(annotation, type) else str


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field, e.g. ``model_path`` -> ``--model-path`` (environment: ``MODEL_PATH``)."""
    for name, field in Settings.model_fields.items():
        kind = _scalar_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env: {name.upper()}]"
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(field.annotation) is list:
            parser.add_argument(flag, dest=name, type=_list_value, default=argparse.SUPPRESS, metavar="LIST",
                                help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind if kind in (int, float, Path) else str,
                                default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**given)


def _fail(message: str, code: int = 1) -> int:
    print(f"llama-inference: error: {message}", file=sys.stderr)
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.logs import configure_logging
    from server.model_files import ModelFileError
    from server.runner import DrainingServer

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        return _fail(f"invalid setting {where}: {first['msg']}", 2)
    configure_logging(settings.log_level, settings.log_json)
    fatal: list[str] = []
    try:
        server: uvicorn.Server | None = None

        def on_fatal(reason: str) -> None:
            fatal.append(reason)
            if server is not None:
                server.should_exit = True

        app = create_app(settings, on_fatal=on_fatal)
    except ModelFileError as exc:
        return _fail(str(exc))
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=5,
        proxy_headers=False,  # client addresses are not used; one middleware less per streamed event
    )
    server = DrainingServer(config, app, settings.drain_timeout_s)
    server.run()
    if fatal:
        return _fail(fatal[0])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-inference", description="CPU inference server for LLaMA-family GGUF models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="Run the HTTP server.", description="Run the HTTP server.")
    add_settings_flags(serve)
    serve.set_defaults(handler=cmd_serve)
    add_pipeline_commands(sub)
    add_benchmark_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    if args.command == "serve":
        return handler(args)
    return run_pipeline_command(handler, args)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
