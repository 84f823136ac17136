"""Speculative decoding on the real engine and model: the same greedy text with and without it, the same
distribution when sampling, and no trace of rejected drafts in the KV cache."""

from __future__ import annotations

import asyncio
import importlib.util
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.engine.speculative import DraftLength, NgramIndex
from tests.conftest import LiveServer, start_server, stop_server

PASSAGE = (
    "The committee met on Tuesday to review the budget for the new library, which will open in March. Members "
    "agreed that the reading room needs more chairs, better light and a quiet corner for children."
)
CODE = (
    "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n"
    "    return 2 * (width + height)\n"
)
# Tasks grounded in their input (where prompt lookup drafts well) and free-form ones (where it cannot).
PROMPTS = [
    f"Repeat the following text exactly.\nText: {PASSAGE}\nRepeated text:",
    f"{PASSAGE}\nRewrite the text above, replacing 'library' with 'museum':\n",
    f"{CODE}\n# The same two functions again, with type hints:\n",
    "Once upon a time",
    "List the planets of the solar system:",
    "What is the capital of France?",
]


# ---- the two small parts, on their own ----

def test_ngram_index_drafts_what_followed_the_newest_earlier_occurrence() -> None:
    index = NgramIndex(max_n=3)
    index.extend([1, 2, 3, 4, 5, 6, 1, 2, 3])
    assert index.draft(4) == [4, 5, 6, 1]
    index.extend([4, 9, 1, 2])
    # (9, 1, 2) never occurred before; (1, 2) last did at the start of [1, 2, 3, 4, 9].
    assert index.draft(3) == [3, 4, 9]
    assert NgramIndex(max_n=3).draft(4) == []


def test_draft_length_grows_with_accepted_runs_and_shrinks_after_a_miss() -> None:
    length = DraftLength(max_k=8)
    assert length.k(cost=0.5) == 4
    length.observe(4, 4)  # all accepted: longer
    assert length.k(cost=0.5) == 6
    length.observe(6, 6)
    assert length.k(cost=0.5) == 8
    length.observe(8, 2)  # a miss: one more than were accepted
    assert length.k(cost=0.5) == 3
    assert length.acceptance > 0.8
    assert (length.drafted, length.accepted) == (18, 12)


def test_draft_length_stops_drafting_when_drafts_cost_more_than_they_bring_and_probes() -> None:
    length = DraftLength(max_k=8)
    for _ in range(3):
        length.observe(2, 1)  # half the drafts accepted
    assert 0.4 < length.acceptance < 0.6
    assert length.k(cost=0.05) > 0, "cheap verification: worth drafting"
    ks = [length.k(cost=0.8) for _ in range(8)]
    assert ks == [0, 0, 0, 1, 0, 0, 0, 1], ks
    length.observe(1, 0)  # a failed probe: the next one comes later
    assert [length.k(cost=0.8) for _ in range(8)] == [0] * 7 + [1]


# ---- on the real server ----

@pytest.fixture(scope="module")
def spec_server(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[LiveServer]:
    """N-gram speculation off by default (requests turn it on), and the embedded model as its own draft model
    for the requests of a second server below."""
    server = start_server(tmp_path_factory.mktemp("spec"), "--parallel", "4", "--speculative", "off")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def draft_server(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("draft"), "--parallel", "4", "--draft-max", "4",
                          "--draft-model-path", str(model_path))
    yield server
    stop_server(server)


async def _generate_all(url: str, bodies: list[dict[str, object]]) -> list[dict[str, object]]:
    async with httpx.AsyncClient(base_url=url, timeout=300.0) as client:
        async def one(body: dict[str, object]) -> dict[str, object]:
            response = await client.post("/generate", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def _greedy(prompt: str, speculative: bool, max_length: int = 40) -> dict[str, object]:
    return {"prompt": prompt, "max_length": max_length, "temperature": 0, "speculative": speculative,
            "cache_prompt": False}


def _check_same_greedy(url: str, together: bool, prompts: list[str]) -> tuple[int, int]:
    """Greedy text with speculation equals the text without, prompt by prompt; returns (drafted, accepted)."""
    plain, spec = [], []
    if together:  # 4 concurrent requests at a time, speculating and not in separate rounds
        for i in range(0, len(prompts), 4):
            plain += asyncio.run(_generate_all(url, [_greedy(p, False) for p in prompts[i:i + 4]]))
            spec += asyncio.run(_generate_all(url, [_greedy(p, True) for p in prompts[i:i + 4]]))
    else:
        for p in prompts:
            plain += asyncio.run(_generate_all(url, [_greedy(p, False)]))
            spec += asyncio.run(_generate_all(url, [_greedy(p, True)]))
    for prompt, a, b in zip(prompts, plain, spec, strict=True):
        assert b["text"] == a["text"], f"speculation changed the greedy text of {prompt!r}"
        assert b["usage"]["completion_tokens"] == a["usage"]["completion_tokens"]  # type: ignore[index]
        assert a["timings"]["draft_tokens"] == 0  # type: ignore[index]
    drafted = sum(r["timings"]["draft_tokens"] for r in spec)  # type: ignore[index,misc]
    accepted = sum(r["timings"]["draft_accepted"] for r in spec)  # type: ignore[index,misc]
    return drafted, accepted


@pytest.mark.parametrize("together", [False, True], ids=["alone", "4-concurrent"])
def test_ngram_speculation_keeps_greedy_text(spec_server: LiveServer, together: bool) -> None:
    drafted, accepted = _check_same_greedy(spec_server.url, together, PROMPTS)
    assert drafted > 0 and accepted > 0, "prompt lookup never drafted on tasks that copy their input"


@pytest.mark.parametrize("together", [False, True], ids=["alone", "4-concurrent"])
def test_draft_model_speculation_keeps_greedy_text(draft_server: LiveServer, together: bool) -> None:
    # The model as its own draft costs a decode per drafted token: four prompts keep this test short.
    drafted, accepted = _check_same_greedy(draft_server.url, together, [PROMPTS[i] for i in (0, 2, 3, 5)])
    # The model drafting for itself: nearly every greedy draft is what the model then samples.
    assert drafted > 0 and accepted >= 0.8 * drafted, (drafted, accepted)


def test_speculation_metrics_count_drafted_and_accepted(spec_server: LiveServer) -> None:
    before = httpx.get(spec_server.url + "/metrics").text
    asyncio.run(_generate_all(spec_server.url, [_greedy(PROMPTS[0], True)]))
    after = httpx.get(spec_server.url + "/metrics").text

    def value(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    assert value(after, "llama_draft_tokens_total") > value(before, "llama_draft_tokens_total")
    assert value(after, "llama_draft_accepted_tokens_total") > value(before, "llama_draft_accepted_tokens_total")


def _chi_square_same(a: Counter[str], b: Counter[str]) -> tuple[float, int]:
    """Pearson's chi-square statistic of a 2 x k homogeneity table (categories seen fewer than 5 times in both
    samples together are pooled), and its degrees of freedom."""
    cats = [c for c in a.keys() | b.keys() if a[c] + b[c] >= 5]
    rare_a = sum(v for c, v in a.items() if c not in cats)
    rare_b = sum(v for c, v in b.items() if c not in cats)
    rows = [[a[c] for c in cats] + [rare_a], [b[c] for c in cats] + [rare_b]]
    if rare_a + rare_b == 0:
        rows = [r[:-1] for r in rows]
    n = sum(map(sum, rows))
    stat = 0.0
    for j in range(len(rows[0])):
        col = rows[0][j] + rows[1][j]
        for row in rows:
            expected = sum(row) * col / n
            stat += (row[j] - expected) ** 2 / expected
    return stat, len(rows[0]) - 1


def _chi_square_critical(dof: int, z: float = 3.09) -> float:
    """The chi-square quantile at the normal quantile ``z`` (3.09: p = 0.001), Wilson-Hilferty approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_sampling_with_speculation_keeps_the_distribution(spec_server: LiveServer) -> None:
    """Many short seeded samples of a grounded prompt, with and without speculation: the continuations follow
    the same distribution (chi-square test of homogeneity), and drafts were really verified and accepted."""
    n = 96
    prompt = PROMPTS[0]

    def bodies(speculative: bool) -> list[dict[str, object]]:
        return [{"prompt": prompt, "max_length": 4, "temperature": 0.9, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                 "seed": 1000 + i, "speculative": speculative} for i in range(n)]

    def run(speculative: bool) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for i in range(0, n, 8):
            out += asyncio.run(_generate_all(spec_server.url, bodies(speculative)[i:i + 8]))
        return out

    plain, spec = run(False), run(True)
    assert sum(r["timings"]["draft_accepted"] for r in spec) > 0  # type: ignore[index,misc]
    a = Counter(str(r["text"]) for r in plain)
    b = Counter(str(r["text"]) for r in spec)
    assert len(a) > 3, "the samples should vary, or the test proves nothing"
    stat, dof = _chi_square_same(a, b)
    assert stat < _chi_square_critical(max(dof, 1)), (stat, dof, a.most_common(8), b.most_common(8))


def test_rejected_drafts_leave_no_trace_in_the_cache(tmp_path: Path) -> None:
    """One slot: a speculating request whose drafts are partly rejected, then a request continuing its text
    (reusing the slot's cells), must give what the same two requests give without speculation."""
    server = start_server(tmp_path, "--parallel", "1")
    try:
        url = server.url
        prompt = PROMPTS[1]

        def pair(speculative: bool) -> tuple[dict[str, object], dict[str, object]]:
            first = httpx.post(url + "/generate", json={
                "prompt": prompt, "max_length": 40, "temperature": 0, "speculative": speculative}, timeout=120).json()
            follow = prompt + str(first["text"]) + "\nIn short:"
            second = httpx.post(url + "/generate", json={
                "prompt": follow, "max_length": 24, "temperature": 0, "speculative": False}, timeout=120).json()
            return first, second

        # A different prompt first, so each pair starts from the same cache state (nothing to reuse).
        reset = {"prompt": "Unrelated: the weather is", "max_length": 2, "temperature": 0}
        httpx.post(url + "/generate", json=reset, timeout=60)
        plain_first, plain_second = pair(False)
        # Whether a request drafts at all follows the engine's measured cost of a drafted token, which sits near
        # the prior's acceptance on this model and CPU: a run may not draft, so up to three tries.
        for _ in range(3):
            httpx.post(url + "/generate", json=reset, timeout=60)
            spec_first, spec_second = pair(True)
            timings = spec_first["timings"]
            if timings["draft_tokens"] > timings["draft_accepted"]:  # type: ignore[index]
                break
        assert timings["draft_tokens"] > timings["draft_accepted"], "no draft was rejected: nothing tested"  # type: ignore[index]
        assert spec_first["text"] == plain_first["text"]
        assert spec_second["usage"]["cached_tokens"] > 0  # type: ignore[index]
        assert spec_second["usage"]["cached_tokens"] == plain_second["usage"]["cached_tokens"]  # type: ignore[index]
        assert spec_second["text"] == plain_second["text"]
    finally:
        stop_server(server)


def _write_byte_vocab_llama(path: Path) -> None:
    """A tiny LLaMA GGUF with a byte-fallback vocabulary of 260 tokens (the Nix install check's writer)."""
    spec = importlib.util.spec_from_file_location("install_check", Path(__file__).parents[1] / "nix/install-check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_tiny_llama(path)


def test_draft_model_with_another_vocabulary_is_refused_at_start(tmp_path: Path) -> None:
    other = tmp_path / "byte-vocab.gguf"
    _write_byte_vocab_llama(other)
    server = start_server(tmp_path, "--draft-model-path", str(other), wait_ready=False)
    try:
        code = server.process.wait(60)
    finally:
        stop_server(server)
    assert code != 0
    assert "vocabulary" in server.log()
