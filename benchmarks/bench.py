"""``llama-inference bench``: run the load generator at several concurrency levels and write the results
(JSON, a Markdown table, PNG plots) with the server's peak RSS and CPU."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import psutil
from tqdm import tqdm

from benchmarks.loadgen import LevelStats, run_level, stats_dict


class ResourceMonitor:
    """Samples a process tree's RSS and CPU time in a thread while a level runs."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._cpu0 = 0.0
        self._t0 = 0.0
        self.cpu_percent = 0.0

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.process, *self.process.children(recursive=True)]
        except psutil.Error:
            return []

    def _cpu(self) -> float:
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = 0
            for p in self._tree():
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ResourceMonitor:
        self._cpu0, self._t0 = self._cpu(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        elapsed = time.perf_counter() - self._t0
        self.cpu_percent = 100 * (self._cpu() - self._cpu0) / elapsed if elapsed > 0 else 0.0


DEFINITIONS = """\
- **aggregate tok/s**: tokens streamed by all requests of a level / the level's wall time (what the server
  delivers in total).
- **per-stream tok/s p50**: median over requests of (tokens - 1) / (last token's arrival - first token's
  arrival): the speed one reader sees once the answer has started.
- **TTFT**: request sent to first token received. **ITL**: gap between two tokens of one request. **E2E**:
  request sent to last token received. pNN: percentiles over the level's successful requests (ms).
- **server peak RSS MB**: the largest resident memory of the server's process tree sampled every 100 ms.
- **server CPU %**: CPU seconds the server's process tree used during the level / the level's wall time x 100
  (200% = two cores busy the whole time).
- **errors**: failed requests by HTTP status (0: no answer), with the first error message of each.
"""


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"  # value != value: NaN


def _pct(stats: dict[str, float], keys: tuple[str, ...], digits: int) -> str:
    return "/".join(_num(stats.get(k), digits) for k in keys)


def _errors(r: LevelStats) -> str:
    return ", ".join(f"{n} x {status}" for status, n in sorted(r.errors.items())) or "-"


def header(meta: dict[str, object]) -> str:
    """The parameters of a run, as the lines that head its report."""
    amount = f"{meta['requests']} requests" if meta.get("requests") else f"{meta.get('duration_s')} s"
    return (f"{meta.get('date', '')}: {meta['url']} ({meta['api']} API, model {meta.get('model') or '-'}); "
            f"prompts of about {meta['prompt_words']} words, {meta['max_tokens']} tokens generated per request "
            f"(greedy, end-of-text ignored where the API allows), {amount} per concurrency level; "
            f"client on {meta.get('client_cpus', '?')} CPUs")


def markdown(results: list[LevelStats], title: str, meta: dict[str, object] | None = None) -> str:
    lines = [f"### {title}", ""]
    if meta:
        lines += [header(meta), ""]
    lines += ["| clients | requests | ok | errors | aggregate tok/s | per-stream tok/s p50 | TTFT p50/p95/p99 ms | "
              "ITL p50/p95/p99 ms | E2E p50/p95 ms | server peak RSS MB | server CPU % |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = ("p50", "p95", "p99")
    for r in results:
        lines.append(
            f"| {r.concurrency} | {r.requests} | {r.ok} | {_errors(r)} | {_num(r.aggregate_tps, 1)} | "
            f"{_num(r.per_stream_tps_p50 if r.ok else None, 1)} | {_pct(r.ttft_ms, keys, 0)} | "
            f"{_pct(r.itl_ms, keys, 1)} | {_pct(r.e2e_ms, keys[:2], 0)} | {_num(r.server_peak_rss_mb, 1)} | "
            f"{_num(r.server_cpu_percent, 0)} |")
    messages = {status: msg for r in results for status, msg in r.error_messages.items()}
    if messages:
        lines += ["", *(f"error {status}: {msg}" for status, msg in sorted(messages.items()))]
    return "\n".join(lines) + "\n"


def plots(results: dict[str, list[LevelStats]], out: Path) -> list[Path]:
    """Throughput and TTFT by level, and end-to-end latency p50/p95 (the percentiles the table shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def nan_if_none(value: float | None) -> float:
        return float("nan") if value is None else value

    written = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, levels in results.items():
        xs = [r.concurrency for r in levels]
        ax1.plot(xs, [r.aggregate_tps for r in levels], marker="o", label=name)
        ax2.plot(xs, [nan_if_none(r.ttft_ms.get("p50")) for r in levels], marker="o", label=f"{name} p50")
        ax2.plot(xs, [nan_if_none(r.ttft_ms.get("p95")) for r in levels], marker="x", ls="--", label=f"{name} p95")
    ax1.set(xlabel="concurrent clients", ylabel="aggregate tokens/s", title="Throughput (all streams)")
    ax2.set(xlabel="concurrent clients", ylabel="ms", title="Time to first token")
    axes = [ax1, ax2]
    _finish(fig, axes, MaxNLocator)
    path = out / "throughput_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, levels in results.items():
        xs = [r.concurrency for r in levels]
        ax.plot(xs, [nan_if_none(r.e2e_ms.get("p50")) for r in levels], marker="o", label=f"{name} p50")
        ax.plot(xs, [nan_if_none(r.e2e_ms.get("p95")) for r in levels], marker="x", ls="--", label=f"{name} p95")
    ax.set(xlabel="concurrent clients", ylabel="ms", title="End-to-end latency")
    _finish(fig, [ax], MaxNLocator)
    path = out / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def _finish(fig: object, axes: list[object], locator: type) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(locator(integer=True))  # type: ignore[attr-defined]  # clients are whole
        ax.grid(alpha=0.3)  # type: ignore[attr-defined]
        ax.legend()  # type: ignore[attr-defined]
    fig.tight_layout()  # type: ignore[attr-defined]


def model_id(url: str, api_key: str | None = None) -> str:
    """The served model's id, from the server's /v1/models (the OpenAI API's way to ask)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise RuntimeError(f"cannot read the model id from {url}/v1/models ({exc}); give --model") from exc


def run_bench(url: str, *, api: str, levels: list[int], requests: int | None, duration_s: float | None,
              prompt_words: int, max_tokens: int, model: str | None, pid: int | None, name: str,
              progress: bool = True) -> list[LevelStats]:
    results = []
    total = requests * len(levels) if requests else None
    with tqdm(total=total, desc=f"bench {name}", unit="req", disable=not progress, file=sys.stderr) as bar:
        for level in levels:
            monitor = ResourceMonitor(pid) if pid else nullcontext()
            with monitor:
                stats = asyncio.run(run_level(url, api, level, requests=requests, duration_s=duration_s,
                                              prompt_words=prompt_words, max_tokens=max_tokens, model=model,
                                              on_done=lambda: bar.update(1)))
            if isinstance(monitor, ResourceMonitor):
                stats.server_peak_rss_mb = round(monitor.peak_rss / 1e6, 1)
                stats.server_cpu_percent = round(monitor.cpu_percent, 1)
            results.append(stats)
    return results


def write_results(out: Path, results: dict[str, list[LevelStats]], meta: dict[str, object]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "servers": {k: [stats_dict(s) for s in v] for k, v in results.items()}}, indent=2))
    (out / "results.md").write_text("\n".join(markdown(v, k, meta) for k, v in results.items()) + "\n"
                                    + DEFINITIONS)
    return [out / "results.json", out / "results.md", *plots(results, out)]
