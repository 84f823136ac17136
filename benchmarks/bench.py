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


def markdown(results: list[LevelStats], title: str) -> str:
    lines = [f"### {title}", "",
             "| clients | requests | ok | errors | aggregate tok/s | per-stream tok/s p50 | TTFT p50/p95/p99 ms | "
             "ITL p50/p95/p99 ms | E2E p50/p95 ms | server peak RSS MB | server CPU % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, i, e = r.ttft_ms, r.itl_ms, r.e2e_ms
        lines.append(
            f"| {r.concurrency} | {r.requests} | {r.ok} | {r.errors or '-'} | {r.aggregate_tps:.1f} | "
            f"{r.per_stream_tps_p50:.1f} | {t['p50']:.0f}/{t['p95']:.0f}/{t['p99']:.0f} | "
            f"{i['p50']:.1f}/{i['p95']:.1f}/{i['p99']:.1f} | {e['p50']:.0f}/{e['p95']:.0f} | "
            f"{r.server_peak_rss_mb if r.server_peak_rss_mb is not None else '-'} | "
            f"{r.server_cpu_percent if r.server_cpu_percent is not None else '-'} |")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, list[LevelStats]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, levels in results.items():
        xs = [r.concurrency for r in levels]
        ax1.plot(xs, [r.aggregate_tps for r in levels], marker="o", label=name)
        ax2.plot(xs, [r.ttft_ms["p95"] for r in levels], marker="o", label=name)
    ax1.set(xlabel="concurrent clients", ylabel="aggregate tokens/s", title="Throughput")
    ax2.set(xlabel="concurrent clients", ylabel="ms", title="Time to first token, p95")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "throughput_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, levels in results.items():
        ax.plot([r.concurrency for r in levels], [r.e2e_ms["p50"] for r in levels], marker="o", label=f"{name} p50")
        ax.plot([r.concurrency for r in levels], [r.e2e_ms["p99"] for r in levels], marker="x", ls="--",
                label=f"{name} p99")
    ax.set(xlabel="concurrent clients", ylabel="end-to-end latency, ms", title="Latency distribution")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


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
    (out / "results.md").write_text("\n".join(markdown(v, k) for k, v in results.items()))
    return [out / "results.json", out / "results.md", *plots(results, out)]
