"""The load generator behind ``llama-inference bench``: concurrent streaming clients against any server that speaks
our ``/generate`` or the OpenAI API, with latency statistics and the server's resource use."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx

WORDS = ("the lighthouse keeper watched the sea while ships passed by in the night and storms came from the "
         "west over the old harbour town").split()


def make_prompt(n_words: int, seed: int) -> str:
    """A prompt of about ``n_words`` words (roughly as many tokens), different for each seed."""
    words = [WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(max(1, n_words - 4))]
    return f"Story {seed}: " + " ".join(words) + ". Once upon a time,"


@dataclass
class RequestResult:
    status: int  # HTTP status, or 0 for a transport error
    start: float
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed token event
    end: float = 0.0
    error: str = ""  # the server's error message (or the transport error), for the report

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def inter_token(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def decode_tps(self) -> float:
        span = self.token_times[-1] - self.token_times[0] if len(self.token_times) > 1 else 0.0
        return (len(self.token_times) - 1) / span if span > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 1]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class LevelStats:
    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]
    wall_s: float
    tokens: int
    aggregate_tps: float
    per_stream_tps_p50: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    server_peak_rss_mb: float | None = None
    server_cpu_percent: float | None = None
    error_messages: dict[str, str] = field(default_factory=dict)  # status -> the first error message seen


def _pcts(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    return {f"p{int(q * 100)}": round(percentile(values, q) * scale, 2) for q in (0.5, 0.95, 0.99)}


def summarize(concurrency: int, results: list[RequestResult], wall_s: float) -> LevelStats:
    good = [r for r in results if r.ok]
    errors = Counter(str(r.status) for r in results if not r.ok)
    messages: dict[str, str] = {}
    for r in results:
        if not r.ok:
            messages.setdefault(str(r.status), r.error or "no tokens streamed")
    tokens = sum(len(r.token_times) for r in good)
    return LevelStats(
        concurrency=concurrency, requests=len(results), ok=len(good), errors=dict(errors), wall_s=round(wall_s, 3),
        tokens=tokens, aggregate_tps=round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        per_stream_tps_p50=round(percentile([r.decode_tps for r in good], 0.5), 2) if good else 0.0,
        ttft_ms=_pcts([r.ttft for r in good]), itl_ms=_pcts([x for r in good for x in r.inter_token]),
        e2e_ms=_pcts([r.e2e for r in good]), error_messages=messages,
    )


def iter_sse_data(buffer: bytearray) -> list[str]:
    """Pop complete events off ``buffer``; return their data fields."""
    out = []
    while True:
        text = bytes(buffer).replace(b"\r\n", b"\n")
        cut = text.find(b"\n\n")
        if cut < 0:
            buffer[:] = text
            return out
        block, rest = text[:cut], text[cut + 2:]
        buffer[:] = rest
        data = [ln[5:].lstrip() for ln in block.decode(errors="replace").split("\n") if ln.startswith("data:")]
        if data:
            out.append("\n".join(data))


def is_token(api: str, data: str) -> bool:
    if data == "[DONE]":
        return False
    payload = json.loads(data)
    if api == "native":
        return payload.get("type") == "token"
    choices = payload.get("choices") or []
    if not choices:
        return False
    delta = choices[0].get("delta")
    return bool(delta.get("content") if isinstance(delta, dict) else choices[0].get("text"))


async def one_request(client: httpx.AsyncClient, api: str, model: str | None, prompt: str,
                      max_tokens: int) -> RequestResult:
    if api == "native":
        path, body = "/generate", {"prompt": prompt, "max_length": max_tokens, "temperature": 0, "stream": True,
                                   "ignore_eos": True}
    else:
        path, body = "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                         "temperature": 0, "stream": True}
    result = RequestResult(status=0, start=time.perf_counter())
    try:
        async with client.stream("POST", path, json=body) as response:
            result.status = response.status_code
            if response.status_code == 200:
                buffer = bytearray()
                async for chunk in response.aiter_raw():
                    buffer += chunk
                    for data in iter_sse_data(buffer):
                        if is_token(api, data):
                            result.token_times.append(time.perf_counter())
            else:
                result.error = _error_message(await response.aread())
    except httpx.HTTPError as exc:
        result.status = 0
        result.error = f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    return result


async def run_level(url: str, api: str, concurrency: int, *, requests: int | None, duration_s: float | None,
                    prompt_words: int, max_tokens: int, model: str | None,
                    on_done: Callable[[], None] = lambda: None, timeout_s: float = 600.0) -> LevelStats:
    """``concurrency`` clients send requests back to back until ``requests`` are done or ``duration_s`` passes
    (both bounded: a duration run stops starting requests at the deadline)."""
    if requests is None and duration_s is None:
        raise ValueError("give a request count or a duration")
    results: list[RequestResult] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + duration_s if duration_s is not None else math.inf

    def take() -> int | None:
        nonlocal issued
        if (requests is not None and issued >= requests) or time.perf_counter() >= deadline:
            return None
        issued += 1
        return issued

    async def client_loop(client: httpx.AsyncClient) -> None:
        while (n := take()) is not None:
            results.append(await one_request(client, api, model, make_prompt(prompt_words, n), max_tokens))
            on_done()

    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return summarize(concurrency, results, time.perf_counter() - start)


def _error_message(body: bytes) -> str:
    """The message of an error answer: our (and OpenAI's) envelope, else the body's start."""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:200]
        if isinstance(error, str):
            return error[:200]
    except (ValueError, AttributeError):
        pass
    return body.decode(errors="replace").strip()[:200]


def _finite(value: object) -> object:
    """NaN (a percentile of no values) becomes None, so the JSON is valid and reports show a dash."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def stats_dict(stats: LevelStats) -> dict[str, object]:
    return {k: _finite(v) for k, v in asdict(stats).items()}
