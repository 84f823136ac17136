"""The seed's design, reproduced as the baseline: FastAPI + transformers + torch on the CPU, serving a Hugging
Face checkpoint with the seed's ``POST /generate`` ({"prompt", "max_length", "temperature"}).

As in the seed, each request runs ``model.generate`` in FastAPI's thread pool (requests are not batched
together). For the load generator it also streams, in this server's native event format, through transformers'
``TextIteratorStreamer``.

    python -m benchmarks.baselines.transformers_server --model-dir DIR --port 8001 --threads 2
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
from collections.abc import Iterator

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class TokenStreamer(BaseStreamer):
    """One item per generated token (transformers' TextIteratorStreamer groups tokens into words, which would
    hide the per-token timing the load generator measures)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[int | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(int(token))

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[int]:
        while (token := self.queue.get()) is not None:
            yield token


class GenerateRequest(BaseModel):
    prompt: str
    max_length: int = 50
    temperature: float = 0.7
    stream: bool = False
    ignore_eos: bool = False


def create_app(model_dir: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    app = FastAPI(title="transformers baseline (the seed's design)")

    def kwargs(body: GenerateRequest) -> dict[str, object]:
        inputs = tokenizer(body.prompt, return_tensors="pt")
        args: dict[str, object] = {**inputs, "max_new_tokens": body.max_length,
                                   "do_sample": body.temperature > 0, "pad_token_id": tokenizer.eos_token_id}
        if body.temperature > 0:
            args["temperature"] = body.temperature
        if body.ignore_eos:
            args["min_new_tokens"] = body.max_length
        return args

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate", response_model=None)
    def generate(body: GenerateRequest) -> dict[str, object] | StreamingResponse:
        args = kwargs(body)
        if not body.stream:
            with torch.inference_mode():
                out = model.generate(**args)
            n_prompt = args["input_ids"].shape[1]  # type: ignore[union-attr]
            return {"text": tokenizer.decode(out[0][n_prompt:], skip_special_tokens=True)}
        streamer = TokenStreamer()

        def run() -> None:
            with torch.inference_mode():
                model.generate(**args, streamer=streamer)

        threading.Thread(target=run, daemon=True).start()

        def events() -> Iterator[str]:
            for token in streamer:
                text = tokenizer.decode([token], skip_special_tokens=True)
                yield f"event: token\ndata: {json.dumps({'type': 'token', 'text': text})}\n\n"
            yield f"event: done\ndata: {json.dumps({'type': 'done'})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    uvicorn.run(create_app(args.model_dir), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
