"""Checking a GGUF file: what it is, that its tokenizer round-trips, that it generates; optionally perplexity."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

from convert.errors import PipelineError
from server.engine.llama import Batch, LlamaContext, LlamaError, LlamaModel
from server.engine.sampling import Sampler, SamplingParams
from server.model_files import ModelFileError, check_gguf

ROUND_TRIP_TEXT = "The quick brown fox jumps over the lazy dog. 1234567890 naïve café — ünïcödé!"


@dataclass
class Report:
    path: str
    architecture: str
    parameters: int
    quantization: str
    size_bytes: int
    sha256: str
    tokenizer_round_trip: bool
    generation: str
    perplexity: float | None = None

    def lines(self) -> list[str]:
        d = asdict(self)
        return [f"{k:21s} {v}" for k, v in d.items() if v is not None]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def file_type_name(path: Path) -> str:
    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"type {value}"


def _greedy(model: LlamaModel, ctx: LlamaContext, prompt: list[int], n: int) -> str:
    batch = Batch(max(len(prompt), 1))
    batch.add(prompt, 0, 0, True)
    ctx.decode(batch)
    sampler = Sampler(SamplingParams(temperature=0.0), model.n_vocab)
    out: list[int] = []
    pos = len(prompt)
    try:
        for _ in range(n):
            token = sampler.sample(ctx.ptr, batch.n_tokens - 1)
            if model.is_eog(token):
                break
            out.append(token)
            batch.clear()
            batch.add_one(token, pos, 0)
            pos += 1
            ctx.decode(batch)
    finally:
        sampler.close()
    return model.detokenize(out)


def perplexity(model: LlamaModel, text: str, n_ctx: int = 512, threads: int = 2) -> float:
    """exp(mean negative log-likelihood) over consecutive windows of ``n_ctx`` tokens, second half scored."""
    import llama_cpp

    tokens = model.tokenize(text)
    if len(tokens) < 16:
        raise PipelineError("the perplexity text is too short (fewer than 16 tokens)")
    n_ctx = min(n_ctx, len(tokens))
    ctx = LlamaContext(model, n_ctx=n_ctx, n_batch=n_ctx, n_seq_max=1, n_threads=threads, n_threads_batch=threads)
    nll, count = 0.0, 0
    try:
        for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
            window = tokens[start:start + n_ctx]
            ctx.clear()
            batch = Batch(n_ctx)
            batch.add(window, 0, 0, False)
            batch.logits[:n_ctx] = 1
            ctx.decode(batch)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx.ptr), shape=(n_ctx * model.n_vocab,))
            logits = logits.reshape(n_ctx, model.n_vocab)
            for i in range(n_ctx // 2, n_ctx - 1):
                row = logits[i].astype(np.float64)
                top = row.max()
                log_z = top + math.log(np.exp(row - top).sum())
                nll += log_z - row[window[i + 1]]
                count += 1
    finally:
        ctx.close()
    return math.exp(nll / count)


def verify(path: Path, *, prompt: str = "Once upon a time", n_tokens: int = 24,
           perplexity_text: str | None = None, threads: int = 2) -> Report:
    try:
        check_gguf(path)
    except ModelFileError as exc:
        raise PipelineError(str(exc)) from exc
    try:
        model = LlamaModel(path)
    except LlamaError as exc:
        raise PipelineError(str(exc)) from exc
    try:
        info = model.info()
        round_trip = model.detokenize(model.tokenize(ROUND_TRIP_TEXT, add_special=False)) == ROUND_TRIP_TEXT
        ctx = LlamaContext(model, n_ctx=512, n_batch=512, n_seq_max=1, n_threads=threads, n_threads_batch=threads)
        try:
            generation = _greedy(model, ctx, model.tokenize(prompt), n_tokens)
        finally:
            ctx.close()
        ppl = perplexity(model, perplexity_text, threads=threads) if perplexity_text is not None else None
        return Report(path=str(path), architecture=info.architecture, parameters=info.n_params,
                      quantization=file_type_name(path), size_bytes=path.stat().st_size, sha256=sha256(path),
                      tokenizer_round_trip=round_trip, generation=generation, perplexity=ppl)
    finally:
        model.close()
