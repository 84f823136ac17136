"""Decode speed with a JSON Schema grammar against without, same prompt and length, on one server.

    .venv/bin/python -m benchmarks.grammar_decode [--tokens 192] [--rounds 8] [--threads 2]

Each round sends the same prompt twice through ``POST /generate``: once free (``ignore_eos``, so it runs the
full length), once with a schema whose output runs as long (an object holding at least 64 strings),
and compares the server-reported decode tokens per second. Rounds alternate which goes first, so a drift in
the machine's speed favours neither. The grammar is checked after sampling (the whole vocabulary is masked
only when the sampled token is refused), so its cost should stay within 15%.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx

from benchmarks.common import free_port, median, our_server_cmd, running
from server.model_files import resolve_model_path

PROMPT = "Here is a JSON list of many fruit and vegetable names, one string each:"
# At least 64 names: the answer runs to the length asked, like the free one.
SCHEMA = {"type": "object", "required": ["names"], "properties": {
    "names": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 64}}}


def generate(client: httpx.Client, tokens: int, schema: dict[str, object] | None) -> tuple[int, float]:
    body: dict[str, object] = {"prompt": PROMPT, "max_length": tokens, "temperature": 0.7, "seed": 1,
                               "cache_prompt": False}
    if schema is None:
        body["ignore_eos"] = True
    else:
        body["json_schema"] = schema
    out = client.post("/generate", json=body).json()
    return int(out["usage"]["completion_tokens"]), float(out["timings"]["decode_tokens_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = str(resolve_model_path(None if args.model_path is None else Path(args.model_path)))
    port = free_port()
    cmd = our_server_cmd(port, "--model-path", model, "--n-threads", str(args.threads), "--parallel", "1",
                         "--ctx-size", "2048")
    free: list[float] = []
    constrained: list[float] = []
    lengths: list[int] = []
    with running(cmd, f"http://127.0.0.1:{port}/ready"), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                                                        timeout=300) as client:
        generate(client, 16, None)  # warm-up, both ways
        generate(client, 16, SCHEMA)
        for i in range(args.rounds):
            order = [None, SCHEMA] if i % 2 == 0 else [SCHEMA, None]
            for schema in order:
                n, tps = generate(client, args.tokens, schema)
                (free if schema is None else constrained).append(tps)
                if schema is not None:
                    lengths.append(n)
            print(f"  round {i}: free {free[-1]:7.1f} tok/s | json schema {constrained[-1]:7.1f} tok/s "
                  f"({lengths[-1]} tokens)")
    paired = median([c / f for c, f in zip(constrained, free, strict=True)])
    print(f"model {model}, {args.threads} threads, {args.tokens} tokens asked, median of {args.rounds} rounds")
    print(f"decode tok/s  free:        {median(free):.1f}")
    print(f"decode tok/s  json schema: {median(constrained):.1f}  (median length {median(lengths):.0f} tokens)")
    print(f"ratio (median of per-round ratios): {paired:.3f}")


if __name__ == "__main__":
    main()
