"""Install check of the Nix package: the installed `llama-inference` loads a GGUF and generates tokens.

Run by nix/llama-server.nix after installation (argument: the installed command). It writes a tiny LLaMA GGUF
with random weights through gguf-py (the library llama.cpp's own converter uses), starts
``llama-inference serve`` on it on loopback, asks ``POST /generate`` for tokens and checks they came back. A
package that cannot serve (a llama-cpp-python without the API the server calls, CPU backends built as plugins
that nothing loads, a missing dependency) fails here, at build time, instead of in a pod.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import gguf
import numpy as np

N_EMBD, N_HEAD, N_FF, N_LAYER, N_CTX = 64, 4, 128, 2, 256


def write_tiny_llama(path: Path) -> None:
    """A 2-layer LLaMA whose vocabulary is SentencePiece's byte fallback: any text tokenizes."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL]
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def name(tensor: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
        return gguf.TENSOR_NAMES[tensor].format(bid=layer) + ".weight"

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("install-check")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    n_vocab = len(tokens)
    writer.add_tensor(name(gguf.MODEL_TENSOR.TOKEN_EMBD), weight(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        writer.add_tensor(name(gguf.MODEL_TENSOR.ATTN_NORM, i), np.ones(N_EMBD, dtype=np.float32))
        for t in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K, gguf.MODEL_TENSOR.ATTN_V,
                  gguf.MODEL_TENSOR.ATTN_OUT):
            writer.add_tensor(name(t, i), weight(N_EMBD, N_EMBD))
        writer.add_tensor(name(gguf.MODEL_TENSOR.FFN_NORM, i), np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(name(gguf.MODEL_TENSOR.FFN_GATE, i), weight(N_FF, N_EMBD))
        writer.add_tensor(name(gguf.MODEL_TENSOR.FFN_UP, i), weight(N_FF, N_EMBD))
        writer.add_tensor(name(gguf.MODEL_TENSOR.FFN_DOWN, i), weight(N_EMBD, N_FF))
    writer.add_tensor(name(gguf.MODEL_TENSOR.OUTPUT_NORM), np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor(name(gguf.MODEL_TENSOR.OUTPUT), weight(n_vocab, N_EMBD))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(url: str, body: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def check(command: str) -> str | None:
    """Serve a tiny model with ``command`` and generate; None when it works, else what went wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny.gguf"
        write_tiny_llama(model)
        port = free_port()
        env = {**os.environ, "MODEL_PATH": str(model), "HOST": "127.0.0.1", "PORT": str(port),
               "CTX_SIZE": str(N_CTX), "PARALLEL": "1", "N_THREADS": "1", "HOME": tmp}
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            server = subprocess.Popen([command, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    if request(url + "/ready")[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            else:
                return f"the server never became ready:\n{log.read_text(errors='replace')}"
            status, answer = request(url + "/generate", {"prompt": "Hello", "max_length": 8, "temperature": 0})
            usage = answer.get("usage")
            if status != 200 or not isinstance(usage, dict) or not usage.get("completion_tokens"):
                return f"/generate answered {status}: {answer}\n{log.read_text(errors='replace')}"
            return None
        finally:
            server.terminate()
            server.wait(30)


def main() -> int:
    problem = check(sys.argv[1])
    if problem is not None:
        print(f"install check failed: {problem}", file=sys.stderr)
        return 1
    print("install check: llama-inference served a GGUF and generated tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
