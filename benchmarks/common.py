"""Helpers shared by the benchmark scripts: starting a server, streaming from it, summarizing."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(cmd: list[str], ready_url: str, *, env: dict[str, str] | None = None, timeout: float = 120.0,
            log_path: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process, wait until ``ready_url`` answers 200, stop it afterwards. Its output is kept in
    ``log_path`` when given."""
    # The server's output goes to a file, not a pipe: a chatty server would fill a pipe nobody reads and block.
    log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{cmd[0]} exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(ready_url, timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd} not ready after {timeout}s")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def our_server_cmd(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port), *extra]


@dataclass
class StreamResult:
    tokens: int  # events that carried a token
    ttft_s: float  # request sent -> first token event
    decode_s: float  # first -> last token event
    total_s: float
    text: str

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 and self.tokens > 1 else 0.0


def stream_generate(client: httpx.Client, prompt: str, max_tokens: int, ignore_eos: bool = False) -> StreamResult:
    """One streamed ``/generate`` request, timed at the client."""
    body = {"prompt": prompt, "max_length": max_tokens, "temperature": 0, "stream": True, "ignore_eos": ignore_eos}
    return _timed_stream(client, "/generate", body, lambda kind, data: data.get("text") if kind == "token" else None)


def iter_sse(chunks: Iterator[tuple[bytes, float]]) -> Iterator[tuple[float, str, str]]:
    """(arrival time, event, data) of each server-sent event, from (chunk, arrival time) pairs: an event
    arrives with the chunk that completes it."""
    buffer = b""
    for chunk, at in chunks:
        buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            event, data = "message", []
            for line in block.decode().split("\n"):
                if line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                elif line.startswith("event:"):
                    event = line[6:].strip()
            if data:
                yield at, event, "\n".join(data)


def _timed_stream(client: httpx.Client, path: str, body: dict[str, object], text_of) -> StreamResult:  # type: ignore[no-untyped-def]
    """Read the stream as raw chunks with their arrival times, and parse them only once it has ended: the
    client's own CPU time per token stays near zero (on a 2-core machine it would compete with the server it
    measures), and each event still gets the arrival time of the chunk that completed it."""
    start = time.perf_counter()
    chunks: list[tuple[bytes, float]] = []
    with client.stream("POST", path, json=body, headers={"accept": "text/event-stream"}) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            chunks.append((chunk, time.perf_counter()))
    end = time.perf_counter()
    times: list[float] = []
    parts: list[str] = []
    for at, event, data in iter_sse(iter(chunks)):
        if data == "[DONE]":
            break
        text = text_of(event, json.loads(data))
        if text is None:
            continue
        times.append(at)
        parts.append(text)
    first = times[0] if times else end
    last = times[-1] if times else end
    return StreamResult(tokens=len(times), ttft_s=first - start, decode_s=last - first, total_s=end - start,
                        text="".join(parts))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
