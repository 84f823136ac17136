"""The ``llama-inference`` command. ``serve`` flags are generated from :class:`server.settings.Settings`."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import socket
import sys
import types
import typing
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from pydantic import ValidationError

from benchmarks.cli import PLAN_SETTINGS
from benchmarks.cli import add_commands as add_benchmark_commands
from convert.cli import add_commands as add_pipeline_commands
from convert.cli import run_pipeline_command
from server import __version__
from server.settings import Settings

log = logging.getLogger("llama_inference")

Handler = Callable[[argparse.Namespace], int]

# One example per subcommand, shown at the end of its --help.
EXAMPLES = {
    "serve": "llama-inference serve                                   # the embedded toy model on 127.0.0.1:8000\n"
             "  llama-inference serve models/llama-2-7b.Q4_K_M.gguf --host 0.0.0.0 --ctx-size 4096 --parallel 2\n"
             "  llama-inference serve TheBloke/Llama-2-7B-GGUF:Q4_K_M    # pulled from the Hub on first start\n"
             "  llama-inference serve TheBloke/Llama-2-7B-GGUF@<commit>:Q4_K_M   # that commit's file",
    "pull": "llama-inference pull TheBloke/Llama-2-7B-GGUF --quant Q4_K_M\n"
            "  llama-inference pull TheBloke/Llama-2-7B-GGUF@<commit>:Q8_0\n"
            "  HF_TOKEN=hf_... llama-inference pull org/gated-model-GGUF --file model.Q8_0.gguf --revision <commit>",
    "fetch": "llama-inference fetch meta-llama/Llama-2-7b-hf --revision <commit> --out models/llama-2-7b-hf",
    "convert": "llama-inference convert models/llama-2-7b-hf --outtype f16 --out models/llama-2-7b.f16.gguf",
    "quantize": "llama-inference quantize models/llama-2-7b.f16.gguf models/llama-2-7b.Q4_K_M.gguf --type Q4_K_M",
    "verify": "llama-inference verify models/llama-2-7b.Q4_K_M.gguf --perplexity some-text.txt",
    "bench": "llama-inference bench --url http://127.0.0.1:8000 --concurrency 1,4,8 --requests 32 --pid $(pgrep -f "
             "'llama-inference serve')",
    "plan": "llama-inference plan --shape llama-2-7b --quant Q4_K_M --ctx-size 4096 --parallel 2 --n-threads 4 "
            "--calibrate --target-rps 1",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults after each option, examples kept as written. An option without a default (None, a flag that is
    off) or whose help already states it shows no "(default: ...)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text.lower():
            return text
        return super()._get_help_string(action)


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


def _default_text(name: str) -> str:
    """A setting's default as --help shows it."""
    field = Settings.model_fields[name]
    if name == "n_threads":
        return f"the CPUs this process may use ({field.get_default(call_default_factory=True)} here)"
    value = field.get_default(call_default_factory=True)
    if value is None or value == []:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def settings_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def configuration_markdown() -> str:
    """docs/configuration.md: every setting, from the fields themselves (a test fails when the file is stale;
    `make docs` writes it)."""
    rows = ["# Configuration", "",
            "Every setting of `llama-inference serve`, as an environment variable and a flag (the flag wins). This "
            "file is generated from `server/settings.py` by `make docs`; a test fails when it is stale.", "",
            "| Variable | Flag | Default | What it does |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "the CPUs this process may use" if name == "n_threads" else _default_text(name)
        text = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{name.upper()}` | `{settings_flag(name)}` | {default.replace('|', chr(92) + '|')} | {text} |")
    return "\n".join(rows) + "\n"


def add_settings_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One flag per settings field, e.g. ``model_path`` -> ``--model-path`` (environment: ``MODEL_PATH``).

    Every flag defaults to "not given", so the environment and then the field's default apply."""
    for name in names or Settings.model_fields:
        field = Settings.model_fields[name]
        kind = _scalar_type(field.annotation)
        flags = ["-m", settings_flag(name)] if name == "model_path" else [settings_flag(name)]
        description = (field.description or "").replace("%", "%%")
        help_text = f"{description} Default: {_default_text(name)}. [env: {name.upper()}]"
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        if kind is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(field.annotation) is list or name == "served_model_name":
            parser.add_argument(*flags, dest=name, type=_list_value, default=argparse.SUPPRESS, metavar="LIST",
                                help=help_text)
        elif choices:
            parser.add_argument(*flags, dest=name, choices=choices, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, type=kind if kind in (int, float, Path) else str,
                                default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the flags given, then the environment, then the defaults."""
    given = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**given)


def settings_error(exc: ValidationError) -> str:
    """A settings validation error as one line naming the flag and the variable."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not loc:
        return f"invalid settings: {message}"
    name = loc[0]
    return f"invalid {settings_flag(name)} ({name.upper()}): {message}"


def _fail(message: str, code: int = 1) -> int:
    print(f"llama-inference: error: {message}", file=sys.stderr)
    return code


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port``, found before the model loads; None if it can."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror}"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use; stop the other server or choose another --port"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def resolve_model(settings: Settings) -> Settings:
    """A model given as a Hub repository (``REPO[@REVISION][:QUANT]``) is pulled (or found in the Hub cache and
    checked against the SHA-256 it was pulled with) and replaced by its local path; a local path is left as it
    is."""
    from convert.pull import parse_model_ref, pull

    update = {}
    for field in ("model_path", "embedding_model_path"):  # the chat model, and the embedding model beside it
        given = getattr(settings, field)
        if given is None or given.exists() or given.suffix == ".gguf":
            continue
        ref = parse_model_ref(str(given))
        if ref is not None:
            update[field] = pull(ref.repo_id, quant=ref.quant, revision=ref.revision, prefer_cache=True)
    return settings.model_copy(update=update) if update else settings


def cmd_serve(args: argparse.Namespace) -> int:
    from convert.errors import PipelineError

    if hasattr(args, "model"):
        if hasattr(args, "model_path"):
            return _fail("the model is given twice: as an argument and with -m/--model-path", 2)
        args.model_path = args.model
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        return _fail(settings_error(exc), 2)
    problem = settings.exposure_problem() or port_problem(settings.host, settings.port)
    if problem is not None:
        return _fail(problem)
    try:
        settings = resolve_model(settings)
    except PipelineError as exc:
        return _fail(str(exc))
    return _run_server(settings)


def _run_server(settings: Settings) -> int:
    import uvicorn

    from server.app import create_app
    from server.logs import configure_logging
    from server.model_files import ModelFileError
    from server.runner import DrainingServer

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


def cmd_pull(args: argparse.Namespace) -> int:
    from convert.errors import PipelineError
    from convert.pull import parse_model_ref, pull

    ref = parse_model_ref(args.repo_id)
    if ref is None:
        raise PipelineError(f"not a Hugging Face repository id: {args.repo_id!r} "
                            "(expected OWNER/NAME[@REVISION][:QUANT])")
    if ref.quant and args.quant:
        raise PipelineError("the quantization is given twice: as REPO:QUANT and with --quant")
    if ref.revision and args.revision:
        raise PipelineError("the revision is given twice: as REPO@REVISION and with --revision")
    print(pull(ref.repo_id, quant=ref.quant or args.quant, filename=args.file, revision=ref.revision or args.revision))
    return 0


def _add_pull(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("pull", help="Download a ready GGUF file from a Hugging Face repository, by quantization.",
                       description="Download a ready GGUF from a Hugging Face repository into the Hub cache "
                       "(HF_HOME; resumable; HF_TOKEN for gated repositories) and print its path. The file is "
                       "the repository's only GGUF, else the one of --quant (Q4_K_M if not given), or --file.")
    p.add_argument("repo_id", metavar="REPO[@REVISION][:QUANT]",
                   help="e.g. TheBloke/Llama-2-7B-GGUF, TheBloke/Llama-2-7B-GGUF:Q8_0 or "
                        "TheBloke/Llama-2-7B-GGUF@<commit>:Q8_0")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quant", default=None, help="quantization to pick from the repository's files, e.g. Q8_0 "
                       "(default: the repository's only GGUF, else its Q4_K_M)")
    which.add_argument("--file", default=None, help="exact file name in the repository")
    p.add_argument("--revision", default=None, help="branch, tag or commit (same as REPO@REVISION); pin a commit "
                   "for reproducibility (default: main)")
    p.set_defaults(handler=cmd_pull)


def _version() -> str:
    try:
        llama = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:  # pragma: no cover - always installed with the server
        llama = "not installed"
    return f"llama-inference {__version__} (llama-cpp-python {llama}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-inference", description="CPU inference server for LLaMA-family GGUF models.",
        formatter_class=HelpFormatter,
        epilog="examples:\n  llama-inference serve\n  llama-inference pull TheBloke/Llama-2-7B-GGUF:Q4_K_M\n"
               "  llama-inference COMMAND --help",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="Run the HTTP server.",
        description="Run the HTTP server. Every option is also an environment variable (in brackets); a flag "
                    "wins over the environment.")
    serve.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL",
                       help="GGUF file or Hugging Face repository REPO[@REVISION][:QUANT] (same as "
                            "-m/--model-path)")
    add_settings_flags(serve)
    serve.set_defaults(handler=cmd_serve)
    _add_pull(sub)
    add_pipeline_commands(sub)
    add_benchmark_commands(sub)
    add_settings_flags(sub.choices["plan"], PLAN_SETTINGS)  # plan sizes a pod for these serve settings
    for name, command in sub.choices.items():
        command.formatter_class = HelpFormatter
        for action in command._actions:  # an option given without help still shows its default
            if action.help is None and action.option_strings and action.default not in (None, False,
                                                                                       argparse.SUPPRESS):
                action.help = "default: %(default)s"
        if name in EXAMPLES:
            command.epilog = "example:\n  " + EXAMPLES[name]
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
