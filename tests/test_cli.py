"""The command line as a user meets it: help, version, one-line errors, model names; malformed JSON bodies."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server import __version__
from server.cli import build_parser
from tests.conftest import REPO, LiveServer, free_port, start_server, stop_server

MODEL = "SmolLM2-135M-Instruct.Q4_1"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, **(env or {})})


def test_version() -> None:
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith(f"llama-inference {__version__} (llama-cpp-python 0.")


def test_every_subcommand_help_lists_defaults_and_an_example() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"serve", "pull", "fetch", "convert", "quantize", "verify", "bench", "plan"} <= set(sub.choices)
    for name, command in sub.choices.items():
        text = command.format_help()
        assert "default" in text.lower(), name
        assert "example:\n  llama-inference " + name in text, name
    serve = cli("serve", "--help").stdout
    assert "--ctx-size CTX_SIZE" in serve and "Default: 8192. [env: CTX_SIZE]" in " ".join(serve.split())
    assert "-m MODEL_PATH, --model-path MODEL_PATH" in serve


def test_one_name_per_setting() -> None:
    """No setting has two long flags (e.g. --threads beside --n-threads)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("serve", "plan"):
        for action in sub.choices[name]._actions:
            longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
            assert len(longs) <= 1, (name, action.option_strings)
    plan = sub.choices["plan"].format_help()
    assert "--kv-type" not in plan and "--cores" not in plan and "--cache-type" in plan and "--n-threads" in plan


def test_a_busy_port_is_one_line_and_fails_before_loading() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = cli("serve", "--port", str(port), timeout=30)
        elapsed = time.monotonic() - start
    assert proc.returncode == 1 and elapsed < 2.0, (elapsed, proc.stderr)
    # One line and nothing else: the model was never loaded (loading logs llama.cpp's system info).
    assert proc.stderr.splitlines() == [
        f"llama-inference: error: port {port} on 127.0.0.1 is already in use; stop the other server or choose "
        "another --port"]


def test_invalid_settings_are_one_line_naming_flag_and_variable() -> None:
    proc = cli("serve", "--port", str(free_port()), env={"CACHE_TYPE": "q4"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["llama-inference: error: invalid --cache-type (CACHE_TYPE): Input should be "
                                        "'auto', 'f16', 'q8_0' or 'f32'"]
    proc = cli("serve", "--port", str(free_port()), "--cache-ram-mib", "-5")
    assert proc.stderr.splitlines() == ["llama-inference: error: invalid --cache-ram-mib (CACHE_RAM_MIB): should be "
                                        "auto or a whole number of MiB from 0 (off) to 1048576, not '-5'"]
    proc = cli("serve", "--ctx-size", "64", "--parallel", "8")
    assert proc.stderr.splitlines() == ["llama-inference: error: invalid settings: ctx_size 64 leaves 8 tokens per "
                                        "slot for 8 slots; raise ctx_size or lower parallel"]
    proc = cli("serve", "model.gguf", "-m", "other.gguf")
    assert proc.returncode == 2 and "the model is given twice" in proc.stderr


def test_a_missing_model_file_is_one_line(tmp_path: Path) -> None:
    proc = cli("serve", str(tmp_path / "nope.gguf"), "--port", str(free_port()))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"llama-inference: error: model file not found: {tmp_path / 'nope.gguf'}"]


def test_any_model_name_is_accepted_and_the_answer_names_the_real_one(live_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="gpt-3.5-turbo", max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Say hi."}])
    assert reply.model == MODEL and reply.choices[0].message.content
    # No model at all (curl users, vLLM's and llama-server's clients): the served one.
    unnamed = httpx.post(live_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert unnamed.status_code == 200 and unnamed.json()["model"] == MODEL


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("strict"), "--parallel", "1", "--ctx-size", "1024",
                          "--served-model-name", "smol,tiny-chat", "--strict-model-name")
    yield server
    stop_server(server)


def test_served_model_names_and_strict_mode(strict_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=strict_server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["smol"]
    for alias in ("smol", "tiny-chat"):
        reply = client.completions.create(model=alias, prompt="The capital of France is", max_tokens=3,
                                          temperature=0)
        assert reply.model == "smol" and "Paris" in reply.choices[0].text
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="gpt-3.5-turbo", prompt="hi", max_tokens=2)
    assert not_found.value.code == "model_not_found" and "serves 'smol'" in not_found.value.message
    unnamed = httpx.post(strict_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert unnamed.status_code == 200 and unnamed.json()["model"] == "smol"


def test_malformed_json_names_line_and_column(http: httpx.Client) -> None:
    body = '{"model": "x",\n "messages": [}'
    for path in ("/v1/chat/completions", "/generate"):
        resp = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["param"] is None and error["code"] == "invalid_json"
        assert error["message"] == "the request body is not valid JSON: Expecting value at line 2, column 15"


def test_the_api_docs_sdk_example_answers_briefly(live_server: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    page = (REPO / "docs" / "api.md").read_text()  # the OpenAI SDK example, moved there from the README
    example = next(block for block in page.split("```python\n")[1:] if "OpenAI(" in block).split("```")[0]
    exec(example.replace("http://localhost:8000", live_server.url), {})  # noqa: S102 - our own docs' code
    assert capsys.readouterr().out.strip() == "The capital of France is Paris."


def test_a_refused_request_logs_its_id_and_error_code(live_server: LiveServer, http: httpx.Client) -> None:
    assert http.post("/generate", json={"prompt": "hi", "max_length": -5}).status_code == 400
    assert http.post("/v1/completions", json={"model": "m", "prompt": "word " * 3000}).status_code == 400
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [ln for ln in live_server.log().splitlines() if "status=400" in ln]
        if len(lines) >= 2:
            break
        time.sleep(0.1)
    assert any("path=/generate" in ln and " id=req-" in ln and "error=invalid_value" in ln for ln in lines), lines
    assert any("path=/v1/completions" in ln and "error=context_length_exceeded" in ln for ln in lines), lines
