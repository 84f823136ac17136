"""Decode speed with a JSON Schema grammar against without, same prompt and length, on one server.

    .venv/bin/python -m benchmarks.grammar_decode [--tokens 192] [--rounds 8] [--threads 2]
    .venv/bin/python -m benchmarks.grammar_decode --sampler-only     # sampling cost per token, in process

Each round sends the same prompt twice through ``POST /generate``: once free (``ignore_eos``, so it runs the
full length), once with a schema whose output runs as long (an object holding at least 64 strings),
and compares the server-reported decode tokens per second. Rounds alternate which goes first, so a drift in
the machine's speed favours neither. The grammar is checked after sampling (the whole vocabulary is masked
only when the sampled token is refused), so its cost should stay within 15%.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import httpx
import llama_cpp

from benchmarks.common import free_port, median, our_server_cmd, running
from server.engine.llama import Batch, LlamaContext, LlamaModel
from server.engine.sampling import Sampler, SamplingParams
from server.grammar import schema_to_grammar
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


def sampler_cost(model_path: str, tokens: int, threads: int) -> None:
    """Milliseconds of sampling per token for the same generated text: free, with the grammar checked after
    sampling (this server), and with the grammar masking the whole vocabulary first at every token."""
    model = LlamaModel(Path(model_path))
    ctx = LlamaContext(model, n_ctx=1024, n_batch=256, n_seq_max=1, n_threads=threads, n_threads_batch=threads)
    batch = Batch(256)
    grammar = schema_to_grammar(SCHEMA)
    prompt = model.tokenize(PROMPT)

    def run(params: SamplingParams, mask_first: bool = False) -> tuple[float, list[int]]:
        ctx.seq_rm(0, 0, -1)
        batch.clear()
        index = batch.add(prompt, 0, 0, True)
        ctx.decode(batch)
        sampler = Sampler(params, model.n_vocab, model.vocab)
        spent, out = 0.0, []
        for pos in range(len(prompt), len(prompt) + tokens):
            t0 = time.perf_counter()
            if mask_first:  # llama.cpp's grammar_first: the grammar masks every token, then the chain samples
                array = sampler._candidates(sampler._logits(ctx.ptr, index))
                llama_cpp.llama_sampler_apply(sampler._grammar, ctypes.byref(array))
                llama_cpp.llama_sampler_apply(sampler._ptr, ctypes.byref(array))
                token = int(array.data[array.selected].id)
                llama_cpp.llama_sampler_accept(sampler._grammar, token)
            else:
                token = sampler.sample(ctx.ptr, index)
            spent += time.perf_counter() - t0
            if model.is_eog(token):
                break
            out.append(token)
            batch.clear()
            index = batch.add_one(token, pos, 0)
            ctx.decode(batch)
        sampler.close()
        return spent * 1000 / max(1, len(out)), out

    greedy = dict(temperature=0.0)
    free_ms, _ = run(SamplingParams(**greedy))  # type: ignore[arg-type]
    after_ms, after = run(SamplingParams(**greedy, grammar=grammar))  # type: ignore[arg-type]
    first_ms, first = run(SamplingParams(**greedy, grammar=grammar), mask_first=True)  # type: ignore[arg-type]
    print(f"{len(after)} tokens, greedy, same text both ways with the grammar: {after == first}")
    print(f"sampling ms/token  free:                          {free_ms:.2f}")
    print(f"sampling ms/token  grammar checked after (server): {after_ms:.2f}")
    print(f"sampling ms/token  grammar masks every token:      {first_ms:.2f}")
    ctx.close()
    model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sampler-only", action="store_true", help="only the in-process sampling cost")
    args = parser.parse_args()
    model = str(resolve_model_path(None if args.model_path is None else Path(args.model_path)))
    if args.sampler_only:
        sampler_cost(model, args.tokens, args.threads)
        return
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
