"""``llama-inference fetch | convert | quantize | verify``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from convert.errors import PipelineError


def _fetch(args: argparse.Namespace) -> int:
    from convert.fetch import fetch

    path = fetch(args.repo_id, Path(args.out), revision=args.revision)
    print(path)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from convert.converter import convert
    from convert.progress import Progress

    out = convert(Path(args.hf_dir), Path(args.out), outtype=args.outtype, vocab_pre=args.vocab_pre,
                  verify=not args.no_verify, progress=Progress(mode="off" if args.quiet else args.progress))
    print(out)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from convert.quantize import quantize

    print(quantize(Path(args.src), Path(args.dst), args.type, threads=args.threads))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from convert.verify import verify

    text = Path(args.perplexity).read_text() if args.perplexity else None
    report = verify(Path(args.file), perplexity_text=text, threads=args.threads)
    print("\n".join(report.lines()))
    return 0 if report.tokenizer_round_trip and report.generation.strip() else 1


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("fetch", help="Download a pinned Hugging Face revision (config, safetensors, tokenizer).")
    p.add_argument("repo_id", help="e.g. meta-llama/Llama-2-7b-hf")
    p.add_argument("--revision", default="main", help="branch, tag or commit; pin a commit for reproducibility")
    p.add_argument("--out", required=True, help="directory to download into (resumes if partly there)")
    p.set_defaults(handler=_fetch)

    p = sub.add_parser("convert", help="Convert a Hugging Face checkpoint directory to GGUF.")
    p.add_argument("hf_dir")
    p.add_argument("--outtype", default="f16", choices=["f16", "bf16", "f32"])
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--vocab-pre", default=None, metavar="NAME",
                   help="llama.cpp's name for the BPE pre-tokenizer (default: the one that tokenizes a probe text "
                        "as the checkpoint's tokenizer does)")
    p.add_argument("--no-verify", action="store_true",
                   help="keep the GGUF even if llama.cpp tokenizes the probe text unlike the checkpoint")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "off"],
                   help="auto: a live bar on a terminal, a line per quarter otherwise (log files, CI)")
    p.add_argument("--quiet", action="store_true", help="no progress output (same as --progress off)")
    p.set_defaults(handler=_convert)

    p = sub.add_parser("quantize", help="Quantize a GGUF file with llama.cpp's quantizer.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--type", default="Q4_K_M", help="Q4_K_M (default), Q4_0, Q4_1, Q5_K_M, Q6_K, Q8_0, F16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.set_defaults(handler=_quantize)

    p = sub.add_parser("verify", help="Load a GGUF, print what it is, check its tokenizer, generate a little.")
    p.add_argument("file")
    p.add_argument("--perplexity", metavar="TEXT_FILE", default=None, help="compute perplexity over this text")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4))
    p.set_defaults(handler=_verify)


def run_pipeline_command(handler, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from server.logs import configure_logging

    configure_logging("warning")  # llama.cpp's own log lines: warnings only
    try:
        return int(handler(args))
    except PipelineError as exc:
        print(f"llama-inference: error: {exc}", file=sys.stderr)
        return 1
