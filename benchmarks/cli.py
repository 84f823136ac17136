"""``llama-inference bench`` and ``llama-inference plan``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not levels or any(n < 1 or n > 256 for n in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be between 1 and 256")
    return levels


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
        results = run_bench(url, api=args.api, levels=args.concurrency, requests=args.requests,
                            duration_s=args.duration, prompt_words=args.prompt_words, max_tokens=args.max_tokens,
                            model=args.model, pid=pid, name=args.name, progress=not args.quiet)
    print(markdown(results, f"{args.name} at {url} ({args.api} API)"))
    files = write_results(Path(args.out), {args.name: results},
                          {"url": url, "api": args.api, "prompt_words": args.prompt_words,
                           "max_tokens": args.max_tokens, "requests": args.requests, "duration_s": args.duration})
    print("wrote " + ", ".join(str(f) for f in files))
    return 0 if all(r.ok for r in results) else 1


def _plan(args: argparse.Namespace) -> int:
    from benchmarks.planner import SHAPES, calibrate, make_plan, render, shape_from_gguf
    from convert.errors import PipelineError
    from server.model_files import resolve_model_path

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
    calibration = None
    if args.calibrate:
        calibration = calibrate(resolve_model_path(Path(args.calibration_model) if args.calibration_model else None),
                                threads=args.calibration_threads)
    plan = make_plan(shape, quant=quant, weights_bytes=weights, ctx_size=args.ctx_size, parallel=args.parallel,
                     cores=args.cores, kv_type=args.kv_type, use_mmap=not args.no_mmap, calibration=calibration,
                     calibration_cores=args.calibration_threads, prompt_tokens=args.prompt_tokens,
                     output_tokens=args.output_tokens, target_rps=args.target_rps)
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(plan), indent=2))
    else:
        print(render(plan))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="Load-test a server: latency, throughput, the server's memory and CPU.")
    p.add_argument("--url", default=None, help="server to load (default: start llama-inference for the run)")
    p.add_argument("--api", choices=["native", "openai"], default="native")
    p.add_argument("--model", default=None, help="model name for the OpenAI API")
    p.add_argument("--model-path", default=None, help="GGUF for the server this command starts")
    p.add_argument("--concurrency", type=_levels, default=[1, 2, 4], help="levels, e.g. 1,2,4,8")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default 4 x max level)")
    p.add_argument("--duration", type=float, default=None, help="seconds per level instead of a count")
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--pid", type=int, default=None, help="server process to watch for RSS and CPU")
    p.add_argument("--name", default="llama-inference")
    p.add_argument("--out", default="benchmarks/results/bench")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_bench)

    p = sub.add_parser("plan", help="Predict memory, speed and Kubernetes sizing for a model.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", default=None, help="read the shape from this GGUF")
    src.add_argument("--shape", default="llama-2-7b", help="a named shape: llama-2-7b, llama-2-13b, llama-3-8b")
    p.add_argument("--quant", default="Q4_K_M")
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    p.add_argument("--kv-type", choices=["f16", "q8_0", "f32"], default="f16")
    p.add_argument("--no-mmap", action="store_true", help="the server runs with USE_MMAP=false")
    p.add_argument("--calibrate", action="store_true", help="measure this machine's speed first (seconds)")
    p.add_argument("--calibration-model", default=None)
    p.add_argument("--calibration-threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--output-tokens", type=int, default=200)
    p.add_argument("--target-rps", type=float, default=None, help="requests/s the deployment must serve")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_plan)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run through `llama-inference bench|plan`")
