"""``llama-inference pull`` and ``serve REPO:QUANT`` against a loopback Hub: the real huggingface_hub client
(its cache, its resume), real HTTP, and the embedded SmolLM2 GGUF served as a repository's file."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from convert.errors import PipelineError
from convert.hub_download import PARTIAL_SUFFIX
from convert.pull import choose_file, quant_of
from tests import hub_fixture
from tests.conftest import REPO, free_port, start_server, stop_server
from tests.hub_fixture import Hub

FAKE = b"GGUF" + bytes(range(256)) * 400  # listed and downloaded, never loaded


def _repo_dir(root: Path, name: str, files: dict[str, bytes | Path]) -> Path:
    folder = root / name
    folder.mkdir()
    for filename, content in files.items():
        if isinstance(content, Path):
            (folder / filename).symlink_to(content)
        else:
            (folder / filename).write_bytes(content)
    return folder


FLAKY = "model.Q6_K.gguf"  # the first download of this file breaks off after CUT bytes
WRONG = "model.Q5_0.gguf"  # like FLAKY, then a Range request is answered from byte 0 (with a 206 saying so)
STALL = "stall.Q5_K_M.gguf"  # the first download of this file stops sending after CUT bytes (its client is killed)
CUT = 11 * 2**20  # past huggingface_hub's first 10 MiB chunk, so the part before the break is kept


@dataclass
class StallingHub(Hub):
    stalled: threading.Event = field(default_factory=threading.Event)  # set once STALL's first download stops


class _FlakyHub(hub_fixture._Handler):
    """The fixture's handler, but the connection drops in the middle of FLAKY's first download; it remembers
    the Range headers clients send (a resumed download shows there)."""

    ranges: list[tuple[str, str]]
    dropped: set[str]
    hub: StallingHub

    def do_GET(self) -> None:  # noqa: N802
        path = urlparse(self.path).path
        if self.command == "GET" and self.headers.get("Range"):
            self.ranges.append((path, self.headers["Range"]))
        if self.command == "GET" and path.endswith("/" + STALL) and not self.hub.stalled.is_set():
            self._send_first_bytes(path, STALL)
            self.hub.stalled.set()
            time.sleep(30)  # nothing more: the client is killed meanwhile
            self.close_connection = True
            return
        if self.command == "GET" and path.endswith("/" + WRONG) and self.headers.get("Range"):
            body = self.hub.repos[path.split("/resolve/")[0].strip("/")].files[WRONG]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.command == "GET" and path.endswith(("/" + FLAKY, "/" + WRONG)) and not self.headers.get("Range") \
                and path not in self.dropped:
            self.dropped.add(path)
            self._send_first_bytes(path, path.rsplit("/", 1)[1])
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        super().do_GET()

    def _send_first_bytes(self, path: str, name: str) -> None:
        """Announce the whole of file ``name`` but send only its first CUT bytes."""
        body = self.hub.repos[path.split("/resolve/")[0].strip("/")].files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.end_headers()
        self.wfile.write(body[:CUT])
        self.wfile.flush()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory,
        model_path: Path) -> Iterator[tuple[StallingHub, list[tuple[str, str]]]]:
    root = tmp_path_factory.mktemp("hub-repos")
    h = StallingHub()
    h.add_repo("org/smol-GGUF", _repo_dir(root, "smol", {
        model_path.name: model_path, "SmolLM2-135M-Instruct.Q8_0.gguf": FAKE, "README.md": b"# smol"}))
    h.add_repo("org/multi-GGUF", _repo_dir(root, "multi", {
        "model.Q4_K_M.gguf": FAKE + b"q4km", "model.Q8_0.gguf": FAKE + b"q8", "model.F16.gguf": FAKE + b"f16",
        FLAKY: os.urandom(12 * 2**20), WRONG: os.urandom(12 * 2**20)}))
    h.add_repo("org/ambiguous-GGUF", _repo_dir(root, "ambiguous", {
        "base.Q8_0.gguf": FAKE + b"base", "chat.Q8_0.gguf": FAKE + b"chat", "chat.F16.gguf": FAKE}))
    h.add_repo("org/gated-GGUF", _repo_dir(root, "gated", {"model.Q4_K_M.gguf": FAKE}), token="hf_granted")
    h.add_repo("org/stall-GGUF", _repo_dir(root, "stall", {STALL: os.urandom(12 * 2**20)}))
    ranges: list[tuple[str, str]] = []
    handler = type("Handler", (_FlakyHub,), {"hub": h, "ranges": ranges, "dropped": set()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    h.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield h, ranges
    server.shutdown()
    server.server_close()


def hub_env(url: str, home: Path, token: str | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def pull(url: str, home: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", "pull", *args], env=hub_env(url, home, token),
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llama-inference: error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    return errors[0]


def test_quant_names_are_read_from_file_names() -> None:
    assert quant_of("llama-2-7b.Q4_K_M.gguf") == "Q4_K_M"
    assert quant_of("Qwen2.5-7B-Instruct-q8_0-00001-of-00003.gguf") == "Q8_0"
    assert quant_of("Meta-Llama-3-8B-Instruct-IQ4_XS.gguf") == "IQ4_XS"
    assert quant_of("model-bf16.gguf") == "BF16"
    assert quant_of("Qwen2-7B.gguf") is None


def test_a_split_model_is_chosen_by_its_first_part() -> None:
    files = ["m-Q8_0-00002-of-00002.gguf", "m-Q8_0-00001-of-00002.gguf", "m-Q4_K_M.gguf", "mmproj-f16.gguf"]
    assert choose_file("o/r", files, quant="q8_0") == "m-Q8_0-00001-of-00002.gguf"
    assert choose_file("o/r", files) == "m-Q4_K_M.gguf"
    with pytest.raises(PipelineError, match="no Q5_K_M GGUF; quantizations there: Q4_K_M, Q8_0"):
        choose_file("o/r", files, quant="Q5_K_M")


def test_pull_picks_the_file_of_the_quantization(hub: tuple[Hub, list[tuple[str, str]]], tmp_path: Path) -> None:
    h, _ = hub
    proc = pull(h.url, tmp_path, "org/multi-GGUF", "--quant", "q8_0")
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path.name == "model.Q8_0.gguf" and path.read_bytes() == FAKE + b"q8"
    assert str(path).startswith(str(tmp_path / "hub" / "models--org--multi-GGUF"))  # huggingface_hub's cache
    # REPO:QUANT is the same thing; without a quantization the repository's Q4_K_M is taken.
    assert Path(pull(h.url, tmp_path, "org/multi-GGUF:Q8_0").stdout.strip()) == path
    default = Path(pull(h.url, tmp_path, "org/multi-GGUF").stdout.strip())
    assert default.name == "model.Q4_K_M.gguf" and default.read_bytes() == FAKE + b"q4km"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["org/ambiguous-GGUF"], "several GGUF files; choose one with --quant or --file: base.Q8_0.gguf (Q8_0), "
                                 "chat.F16.gguf (F16), chat.Q8_0.gguf (Q8_0)"),
        (["org/ambiguous-GGUF", "--quant", "Q8_0"], "several Q8_0 GGUF files; choose one with --file: "
                                                    "base.Q8_0.gguf, chat.Q8_0.gguf"),
        (["org/multi-GGUF", "--quant", "Q5_K_M"], "no Q5_K_M GGUF; quantizations there: F16, Q4_K_M, Q5_0, Q6_K, Q8_0"),
        (["org/multi-GGUF", "--file", "model.Q2_K.gguf"], "has no file 'model.Q2_K.gguf'"),
        (["org/gated-GGUF"], "org/gated-GGUF is a gated repository: set HF_TOKEN"),
        (["org/nope-GGUF"], "repository org/nope-GGUF not found"),
        (["not a repo"], "not a Hugging Face repository id"),
    ],
)
def test_pull_refuses_with_the_choices_listed(hub: tuple[Hub, list[tuple[str, str]]], tmp_path: Path,
                                              args: list[str], message: str) -> None:
    h, _ = hub
    proc = pull(h.url, tmp_path, *args)
    assert message in error_line(proc)
    assert not list((tmp_path / "hub").rglob("*.gguf"))  # nothing half-written in the cache


def test_pull_names_the_file_exactly_and_sends_the_token(hub: tuple[Hub, list[tuple[str, str]]],
                                                         tmp_path: Path) -> None:
    h, _ = hub
    proc = pull(h.url, tmp_path, "org/ambiguous-GGUF", "--file", "chat.Q8_0.gguf")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).read_bytes() == FAKE + b"chat"
    h.requests.clear()
    proc = pull(h.url, tmp_path, "org/gated-GGUF", token="hf_granted")
    assert proc.returncode == 0, proc.stderr
    assert {auth for _, _, auth in h.requests} == {"Bearer hf_granted"}


def test_pull_resumes_a_download_whose_connection_dropped(hub: tuple[Hub, list[tuple[str, str]]],
                                                          tmp_path: Path) -> None:
    h, ranges = hub
    proc = pull(h.url, tmp_path, "org/multi-GGUF", "--quant", "Q6_K")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).read_bytes() == h.repos["org/multi-GGUF"].files[FLAKY]
    # The second request asked only for the bytes after what was kept (whole chunks before the break).
    [resumed] = [r for path, r in ranges if path.endswith("/" + FLAKY)]
    assert resumed.startswith("bytes=") and 0 < int(resumed[6:].rstrip("-")) <= CUT


def test_a_resumed_download_answered_from_another_offset_starts_over(hub: tuple[Hub, list[tuple[str, str]]],
                                                                    tmp_path: Path) -> None:
    """A server that answers the Range with bytes from elsewhere (its 206 says where): appending them would
    corrupt the file, so the partial file is dropped and the download starts over."""
    h, ranges = hub
    proc = pull(h.url, tmp_path, "org/multi-GGUF", "--quant", "Q5_0")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).read_bytes() == h.repos["org/multi-GGUF"].files[WRONG]
    assert len([r for path, r in ranges if path.endswith("/" + WRONG)]) == 1
    # The cut-off download and the refused 206 are answered by the handler above and not logged; then one whole
    # download again, without a Range.
    assert sum(1 for method, path, _ in h.requests if method == "GET" and path.endswith("/" + WRONG)) == 1


def test_a_killed_pull_resumes_where_it_stopped(hub: tuple[StallingHub, list[tuple[str, str]]],
                                                tmp_path: Path) -> None:
    """huggingface_hub alone starts a file over in a new process; a pull killed mid-file (a pod restarted) goes on
    from the bytes it had."""
    h, ranges = hub
    first = subprocess.Popen([sys.executable, "-m", "server", "pull", "org/stall-GGUF"], env=hub_env(h.url, tmp_path),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        assert h.stalled.wait(60)
        deadline = time.monotonic() + 30
        while not [p for p in tmp_path.rglob("*" + PARTIAL_SUFFIX) if p.stat().st_size > 0]:
            assert time.monotonic() < deadline, "no partial file appeared"
            time.sleep(0.1)
    finally:
        first.kill()
        first.wait()
    done = pull(h.url, tmp_path, "org/stall-GGUF")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).read_bytes() == h.repos["org/stall-GGUF"].files[STALL]
    [resumed] = [r for path, r in ranges if path.endswith("/" + STALL)]
    assert resumed.startswith("bytes=") and 0 < int(resumed[6:].rstrip("-")) <= CUT
    # Besides the killed one (answered by the stall above, not logged), one GET: the resumed one. huggingface_hub
    # found the blob in its cache and did not fetch the file again.
    assert sum(1 for method, path, _ in h.requests if method == "GET" and path.endswith("/" + STALL)) == 1
    assert not list(tmp_path.rglob("*" + PARTIAL_SUFFIX))  # moved into the cache whole


def test_serve_pulls_repo_quant_on_first_start_and_answers(hub: tuple[Hub, list[tuple[str, str]]],
                                                           tmp_path: Path, model_path: Path) -> None:
    h, _ = hub
    server = start_server(tmp_path, "org/smol-GGUF:Q4_1", env=hub_env(h.url, tmp_path / "home"))
    try:
        models = httpx.get(server.url + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == [model_path.name.removesuffix(".gguf")]
        reply = httpx.post(server.url + "/v1/completions", json={
            "model": "any", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["text"]
    finally:
        assert stop_server(server) == 0
    # A later start finds the file in the Hub cache without the Hub.
    server = start_server(tmp_path, "-m", "org/smol-GGUF:Q4_1",
                          env=hub_env("http://127.0.0.1:9", tmp_path / "home"))
    try:
        assert httpx.get(server.url + "/ready").json()["model"] == model_path.name.removesuffix(".gguf")
    finally:
        stop_server(server)


def test_serve_reports_a_failed_pull_in_one_line(hub: tuple[Hub, list[tuple[str, str]]], tmp_path: Path) -> None:
    h, _ = hub
    proc = subprocess.run([sys.executable, "-m", "server", "serve", "org/gated-GGUF", "--port", str(free_port())],
                          env=hub_env(h.url, tmp_path), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "gated repository: set HF_TOKEN" in error_line(proc)
