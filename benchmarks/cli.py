"""``llama-inference bench`` and ``llama-inference plan``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.settings import Settings


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not levels or any(n < 1 or n > 256 for n in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be between 1 and 256")
    return levels


def _share(text: str) -> float:
    try:
        share = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not 0 <= share < 1:
        raise argparse.ArgumentTypeError("a share of prompt tokens: at least 0 and below 1 (e.g. 0.5)")
    return share


def _bench(args: argparse.Namespace) -> int:
    from benchmarks.bench import markdown, run_bench, write_results
    from benchmarks.common import free_port, our_server_cmd, running

    if args.requests is None and args.duration is None:
        args.requests = 4 * max(args.concurrency)
    url, pid = args.url, args.pid
    server: AbstractContextManager[subprocess.Popen[bytes] | None] = nullcontext(None)
    if url is None:  # start our own server for the run
        port = free_port()
        extra = ["--parallel", str(max(args.concurrency)), "--queue-size", "64"]
        if args.model_path:
            extra += ["--model-path", args.model_path]
        server = running(our_server_cmd(port, *extra), f"http://127.0.0.1:{port}/ready")
        url = f"http://127.0.0.1:{port}"
    with server as proc:
        if proc is not None:
            pid = proc.pid
        model = args.model
        if model is None:
            from benchmarks.bench import model_id
            from convert.errors import PipelineError

            try:
                model = model_id(url)
            except RuntimeError as exc:
                if args.api == "openai":
                    raise PipelineError(str(exc)) from exc
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "url": url, "api": args.api,
                "model": model, "prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
                "requests": args.requests, "duration_s": args.duration, "client_cpus": os.cpu_count()}
        results = run_bench(url, api=args.api, levels=args.concurrency, requests=args.requests,
                            duration_s=args.duration, prompt_words=args.prompt_words, max_tokens=args.max_tokens,
                            model=model, pid=pid, name=args.name, progress=not args.quiet)
    print(markdown(results, f"{args.name} at {url} ({args.api} API)", meta))
    files = write_results(Path(args.out), {args.name: results}, meta)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0 if all(r.ok for r in results) else 1


# The settings of `serve` that the plan depends on: `plan` takes them as the same flags, environment variables
# and defaults (server/cli.py adds the flags from server.settings.Settings).
PLAN_SETTINGS = ("ctx_size", "parallel", "n_threads", "batch_size", "cache_type", "use_mmap", "flash_attn",
                 "cache_ram_mib", "embedding_model_path", "embedding_pooling", "embedding_batch_size")


def plan_settings(args: argparse.Namespace) -> Settings:
    """The Settings `serve` would run with, given the same flags (and environment)."""
    from server.settings import Settings

    return Settings(**{name: getattr(args, name) for name in PLAN_SETTINGS if hasattr(args, name)})


def _plan(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from benchmarks.planner import (
        EMBEDDING_SHAPES,
        SHAPES,
        calibrate,
        embedding_from_gguf,
        make_plan,
        render,
        resolved_cache_type,
        shape_from_gguf,
    )
    from convert.errors import PipelineError
    from server.model_files import resolve_model_path

    try:
        settings = plan_settings(args)
    except ValidationError as exc:
        raise PipelineError(f"invalid settings: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from exc
    weights = None
    if args.gguf:
        path = Path(args.gguf)
        if not path.is_file():
            raise PipelineError(f"GGUF file not found: {path}")
        shape, quant, weights = shape_from_gguf(path)
    else:
        if args.shape not in SHAPES:
            raise PipelineError(f"unknown shape {args.shape!r}; known: {', '.join(SHAPES)}")
        shape, quant = SHAPES[args.shape], args.quant
    # The embedding model beside it: EMBEDDING_MODEL_PATH's header (a local file: plan reads it), or a named one.
    embedding = embedding_path = None
    if args.embedding_shape and settings.embedding_model_path is not None:
        raise PipelineError("give --embedding-model-path (EMBEDDING_MODEL_PATH) or --embedding-shape, not both")
    if settings.embedding_model_path is not None:
        emb_file = settings.embedding_model_path.expanduser()
        if not emb_file.is_file():
            raise PipelineError(f"embedding GGUF file not found: {emb_file} (plan reads its header; for a Hub "
                                "repository, `llama-inference pull` it and give the path it prints)")
        embedding, embedding_path = embedding_from_gguf(emb_file), str(settings.embedding_model_path)
    elif args.embedding_shape:
        if args.embedding_shape not in EMBEDDING_SHAPES:
            raise PipelineError(f"unknown embedding shape {args.embedding_shape!r}; known: "
                                f"{', '.join(EMBEDDING_SHAPES)}")
        embedding = EMBEDDING_SHAPES[args.embedding_shape]
    calibration = None
    if args.calibrate:
        # The target GGUF itself when it is at hand (a direct measurement), else the embedded model, scaled.
        model = Path(args.calibration_model) if args.calibration_model else Path(args.gguf) if args.gguf else None
        calibration = calibrate(resolve_model_path(model), threads=args.calibration_threads,
                                streams=(1, settings.parallel) if model else (1,),
                                cache_type=resolved_cache_type(shape, settings) if model else "f16")
    plan = make_plan(shape, quant=quant, settings=settings, weights_bytes=weights, model_path=args.gguf,
                     calibration=calibration, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                     target_rps=args.target_rps, embedding=embedding, embedding_path=embedding_path,
                     cache_hit_share=args.cache_hit_share, router=args.router)
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(plan), indent=2))
    else:
        print(render(plan))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="Load-test a server: latency, throughput, the server's memory and CPU.",
                       description="Load-test a server at several concurrency levels: streamed requests back to "
                       "back, latency percentiles, throughput, the server's peak memory and CPU. Writes JSON, a "
                       "Markdown table (with the definition of each figure) and PNG plots.")
    p.add_argument("--url", default=None, help="server to load (default: start llama-inference for the run)")
    p.add_argument("--api", choices=["native", "openai"], default="native",
                   help="native: /generate; openai: /v1/completions (any OpenAI-compatible server)")
    p.add_argument("--model", default=None, help="model name for the OpenAI API (default: the first id of the "
                   "server's /v1/models)")
    p.add_argument("--model-path", default=None, help="GGUF for the server this command starts")
    p.add_argument("--concurrency", type=_levels, default=[1, 2, 4], help="levels, e.g. 1,2,4,8")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default 4 x max level)")
    p.add_argument("--duration", type=float, default=None, help="seconds per level instead of a count")
    p.add_argument("--prompt-words", type=int, default=32, help="prompt length in words (about as many tokens)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--pid", type=int, default=None, help="server process to watch for RSS and CPU")
    p.add_argument("--name", default="llama-inference", help="the server's name in the report")
    p.add_argument("--out", default="benchmarks/results/bench", help="directory for results.json, .md and plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_bench)

    p = sub.add_parser("plan", help="Predict memory, speed and Kubernetes sizing for a model.",
                       description="Predict the memory, speed and Kubernetes sizing of a pod running `serve` with "
                       "the settings given (same flags, environment variables and defaults as `serve`), and print "
                       "the environment to deploy it with.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", default=None, help="read the shape from this GGUF (and calibrate on it)")
    src.add_argument("--shape", default="llama-2-7b", help="a named shape: " + ", ".join(
        ("llama-2-7b", "llama-2-13b", "llama-3-8b", "smollm2-135m")))
    p.add_argument("--quant", default="Q4_K_M", help="quantization of a named shape")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine's speed first (about 30 s; a 7B GGUF takes longer to load)")
    p.add_argument("--calibration-model", default=None,
                   help="GGUF to decode for the calibration (default: --gguf, else the embedded model)")
    p.add_argument("--calibration-threads", type=int, default=2, help="threads of the calibration decode")
    p.add_argument("--prompt-tokens", type=int, default=100, help="prompt length of a typical request")
    p.add_argument("--output-tokens", type=int, default=200, help="tokens generated by a typical request")
    p.add_argument("--target-rps", type=float, default=None,
                   help="requests/s the deployment must serve (needs --calibrate): the replicas for it")
    p.add_argument("--cache-hit-share", type=_share, default=0.0,
                   help="share of a request's prompt tokens found cached (default 0): its prefill scales by "
                   "(1 - share). Conversations behind a router that keeps each on its replica: the fleet tests "
                   "found >= 0.9 of later turns' history cached (sticky_least_loaded, tuned cache_aware), round "
                   "robin less; over N turns adding the same tokens each, about 0.9 x (N - 1) / (N + 1)")
    p.add_argument("--router", choices=["vllm-router"], default=None,
                   help="plan the router's own pod in front of the replicas (k8s/overlays/vllm-router)")
    p.add_argument("--embedding-shape", default=None,
                   help="a named embedding model served beside the chat model, when its GGUF is not at hand "
                   "(--embedding-model-path reads the file's header): all-minilm-l6-v2")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=_plan)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run through `llama-inference bench|plan`")
