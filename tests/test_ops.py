"""Liveness, readiness, docs, metrics; start-up failures; the serve command and its settings."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.cli import build_parser, settings_from_args
from server.model_files import ModelFileError, resolve_model_path
from tests.conftest import REPO, start_server, stop_server


def test_health_and_ready_report_the_engine(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok", "engine": "ready"}
    ready = http.get("/ready").json()
    assert ready["status"] == "ready" and ready["model"] == "SmolLM2-135M-Instruct.Q4_1" and ready["slots"] == 4


def test_info_reports_the_model(http: httpx.Client, model_path: Path) -> None:
    info = http.get("/info").json()
    # The file's name and size as `verify` and `ls -l` show them; never the directory it lives in.
    assert info["file"] == model_path.name and info["size_bytes"] == model_path.stat().st_size
    assert str(model_path.parent) not in http.get("/info").text
    assert 0 < info["tensor_bytes"] < info["size_bytes"]
    assert info["architecture"] == "llama"
    assert 130_000_000 < info["n_params"] < 140_000_000
    assert info["n_ctx_train"] == 8192 and info["slot_ctx"] == 2048
    assert "<|im_start|>" in info["chat_template"]


def test_docs_redoc_and_openapi(http: httpx.Client) -> None:
    assert "swagger-ui" in http.get("/docs").text
    assert "redoc" in http.get("/redoc").text.lower()
    spec = http.get("/openapi.json").json()
    assert {"/generate", "/health", "/ready", "/metrics"} <= set(spec["paths"])
    schema = spec["components"]["schemas"]["GenerateRequest"]
    assert {"prompt", "max_length", "temperature"} <= set(schema["properties"])


def test_metrics_count_requests_and_tokens(http: httpx.Client) -> None:
    def counter(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    before = http.get("/metrics").text
    http.post("/generate", json={"prompt": "Count:", "max_length": 7, "temperature": 0})
    after = http.get("/metrics").text
    assert counter(after, "llama_generated_tokens_total") - counter(before, "llama_generated_tokens_total") >= 1
    assert counter(after, "llama_prompt_tokens_total") > counter(before, "llama_prompt_tokens_total")
    assert "llama_slots_total 4.0" in after
    assert "llama_time_to_first_token_seconds_bucket" in after


def _series(text: str, name: str) -> dict[str, float]:
    """Every sample of one metric family: {'name{labels}': value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")}


def test_metrics_have_no_created_series_and_name_the_model(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    assert "_created" not in text
    [info] = _series(text, "llama_model_info").items()
    assert info == ('llama_model_info{cache_type="f16",ctx_size="8192",model="SmolLM2-135M-Instruct.Q4_1",'
                    'quantization="Q4_1",slots="4",version="0.1.0"}', 1.0)
    assert _series(text, "process_resident_memory_bytes")["process_resident_memory_bytes"] > 100e6
    assert "process_cpu_seconds_total" in text


def test_metrics_count_statuses_and_finish_reasons_apart(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    assert http.post("/generate", json={"prompt": "Count:", "max_length": 3, "ignore_eos": True}).status_code == 200
    assert http.post("/generate", json={"prompt": "Count:", "max_length": -1}).status_code == 400
    assert http.post("/v1/completions", json={"model": "m", "prompt": "word " * 3000}).status_code == 400
    after = http.get("/metrics").text

    def delta(name: str, labels: str) -> float:
        key = f"{name}{{{labels}}}"
        return _series(after, name).get(key, 0.0) - _series(before, name).get(key, 0.0)

    http_requests = "llama_http_requests_total"
    assert delta(http_requests, 'code="",route="/generate",status="200"') == 1
    assert delta(http_requests, 'code="invalid_value",route="/generate",status="400"') == 1
    assert delta(http_requests, 'code="context_length_exceeded",route="/v1/completions",status="400"') == 1
    assert delta("llama_requests_finished_total", 'finish_reason="length"') == 1
    # Finish reasons and refusals are separate families; neither carries HTTP statuses.
    assert not [k for k in _series(after, "llama_requests_finished_total") if "rejected" in k or "status" in k]
    assert "llama_requests_total" not in after


def test_grafana_dashboard_reads_series_the_server_exports(http: httpx.Client) -> None:
    """Every metric and every `by (label)` of k8s/grafana-dashboard.json exists in a real /metrics."""
    import json
    import re

    http.post("/generate", json={"prompt": "Hi", "max_length": 2})
    http.post("/generate", json={"prompt": "Hi", "max_length": -1})
    text = http.get("/metrics").text
    dashboard = json.loads((REPO / "k8s" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    for expr in exprs:
        for name in re.findall(r"\b((?:llama|process)_[a-z_]+)\b", expr):
            assert re.search(rf"^{name}[{{ ]", text, re.M), f"{name} is not exported ({expr})"
            for labels in re.findall(r"by \(([a-z_, ]+)\)", expr):
                for label in (x.strip() for x in labels.split(",")):
                    assert label == "le" or re.search(rf"^{name}{{[^}}]*\b{label}=", text, re.M), (name, label)


def test_ready_is_503_with_a_body_and_serve_exits_nonzero_when_the_model_cannot_load(tmp_path: Path) -> None:
    broken = tmp_path / "truncated.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)  # the magic, then nothing usable
    server = start_server(tmp_path, "--model-path", str(broken), wait_ready=False)
    try:
        code = server.process.wait(60)
    finally:
        stop_server(server)
    assert code == 1
    log = server.log()
    assert "llama-inference: error: " in log and "could not load" in log


def test_ready_stays_503_in_process_when_the_model_fails(
    tmp_path: Path, make_client: Callable[..., TestClient]
) -> None:
    broken = tmp_path / "truncated.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 16)
    client = make_client(model_path=broken)
    resp = client.get("/ready")
    assert resp.status_code == 503
    assert "failed to load" in resp.json()["error"]["message"]
    assert client.get("/health").status_code == 503
    assert client.post("/generate", json={"prompt": "hi"}).status_code == 503


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-path", "/nonexistent/model.gguf"], "model file not found: /nonexistent/model.gguf"),
        (["--model-path", str(REPO / "pyproject.toml")], "not a GGUF file"),
        (["--port", "0"], "invalid --port (PORT): Input should be greater than or equal to 1"),
        (["--parallel", "64", "--ctx-size", "512"], "tokens per slot"),
    ],
)
def test_serve_refuses_bad_start_up_with_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "server", "serve", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_settings_come_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9001")
    monkeypatch.setenv("N_THREADS", "3")
    args = build_parser().parse_args(["serve", "--parallel", "2", "--no-flash-attn"])
    settings = settings_from_args(args)
    assert (settings.port, settings.n_threads, settings.parallel, settings.flash_attn) == (9001, 3, 2, False)
    assert settings.host == "127.0.0.1"


def test_default_model_is_the_embedded_smollm2() -> None:
    path = resolve_model_path(None)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    with pytest.raises(ModelFileError, match="not found"):
        resolve_model_path(Path("/no/such.gguf"))


def _unknown_architecture_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "nosucharch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown architecture", "could not load"),
        ("context the model cannot take", "but the model was trained for 8192"),
    ],
)
def test_start_up_failures_exit_nonzero_with_one_clear_line(tmp_path: Path, case: str, message: str) -> None:
    if case == "unknown architecture":
        args = ["--model-path", str(_unknown_architecture_gguf(tmp_path / "odd.gguf"))]
    else:
        args = ["--ctx-size", "40000", "--parallel", "1"]
    server = start_server(tmp_path, *args, wait_ready=False)
    try:
        code = server.process.wait(60)
    finally:
        stop_server(server)
    assert code == 1
    errors = [line for line in server.log().splitlines() if line.startswith("llama-inference: error:")]
    assert len(errors) == 1 and message in errors[0], server.log()[-2000:]
