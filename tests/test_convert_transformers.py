"""The converter on checkpoints that transformers itself saved, in both config layouts it has written.

The ground truth is the checkpoint: transformers' tokenizer defines the token ids, transformers' forward pass
defines the greedy continuation. Each checkpoint is converted, loaded by llama.cpp, and must tokenize a
multilingual text exactly as transformers does and continue a prompt with the same 16 greedy tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the test extra) makes the reference checkpoints")
transformers = pytest.importorskip("transformers", reason="transformers (the test extra) makes the checkpoints")

from llama_cpp import Llama  # noqa: E402

from convert.converter import convert  # noqa: E402
from convert.rope import read_rope  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.hf_fixtures import (  # noqa: E402
    CHAT_TEMPLATE,
    bpe_tokenizer,
    spm_tokenizer,
    tiny_llama,
    to_transformers4_layout,
)

TEXTS = [
    "The keeper of the light said: it's 2024, and the storm lasted 12345 nights!",
    "Prix: 3,75 € — naïve café; 日本語のテキストも。中文句子！한국어 문장. Русский текст. 🎉👍🏽",
    "def f(x):\n    return x ** 2  # square\n\n\n\tindented\t\ttabs   and   spaces  \n",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
    "</s> <s> unusual words: zebra quixotic fjord",
]
PROMPT = "Once upon a time, the keeper of the lighthouse said 42 things in 日本語."


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints by name: {bpe,spm} x {v5 (rope_parameters), v4 (top-level rope_theta)}, plus LLaMA 3 and YaRN
    RoPE scaling, and an explicit head_dim."""
    base = tmp_path_factory.mktemp("hf-made")
    bpe = bpe_tokenizer(base / "bpe-v5")
    tiny_llama(base / "bpe-v5", bpe, tied=True)
    spm = spm_tokenizer(base / "spm-v5")
    tiny_llama(base / "spm-v5", spm, tied=False)
    out = {"bpe-v5": base / "bpe-v5", "spm-v5": base / "spm-v5",
           "bpe-v4": to_transformers4_layout(base / "bpe-v5", base / "bpe-v4"),
           "spm-v4": to_transformers4_layout(base / "spm-v5", base / "spm-v4")}
    # RoPE scaling whose effect shows within the prompt: original contexts of 32 and 64 positions
    for name, rope in [
        ("bpe-llama3", {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        ("bpe-yarn", {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                      "original_max_position_embeddings": 64}),
    ]:
        shutil.copytree(base / "bpe-v5", base / name, ignore=shutil.ignore_patterns("*.safetensors", "config*"))
        out[name] = tiny_llama(base / name, bpe, tied=True, rope=rope)
    # head_dim wider than hidden / heads, another epsilon, untied: converted to F16
    shutil.copytree(base / "bpe-v5", base / "bpe-headdim-f16",
                    ignore=shutil.ignore_patterns("*.safetensors", "config*"))
    out["bpe-headdim-f16"] = tiny_llama(base / "bpe-headdim-f16", bpe, tied=False, seed=1, head_dim=32,
                                        rms_norm_eps=1e-6)
    return out


@pytest.fixture(scope="module")
def converted(made: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out_dir = tmp_path_factory.mktemp("hf-made-gguf")
    return {name: convert(d, out_dir / f"{name}.gguf", outtype="f16" if name.endswith("f16") else "f32")
            for name, d in made.items()}


def hf_greedy(d: Path, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation (a full forward pass per step: no cache to get wrong)."""
    model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


def gguf_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    llm = Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, type_k=0, type_v=0, flash_attn=False,
                verbose=False)  # F32 KV cache: llama.cpp at full precision
    try:
        llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            llm.eval([token])
        return out
    finally:
        llm.close()


@pytest.mark.parametrize("name", ["bpe-v5", "bpe-v4", "spm-v5", "spm-v4"])
def test_tokenizes_as_the_checkpoints_tokenizer(made: dict[str, Path], converted: dict[str, Path],
                                                name: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(made[name])
    llm = Llama(str(converted[name]), vocab_only=True, verbose=False)
    texts = TEXTS
    if name.startswith("spm"):
        # llama.cpp's SentencePiece puts a space before text that follows a special token and transformers 5
        # does not (no GGUF key changes that): markers are checked alone, and text without them.
        texts = [t for t in TEXTS if "<" not in t] + ["<s></s><unk>"]
    try:
        for text in texts:
            want = tok(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == want, text
        assert llm.metadata["tokenizer.ggml.pre"] == ("gpt-2" if name.startswith("bpe") else "default")
        if name.startswith("bpe"):  # transformers 5 saved it as chat_template.jinja
            assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
        assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
    finally:
        llm.close()


@pytest.mark.parametrize("name", ["bpe-v5", "bpe-v4", "spm-v5", "spm-v4", "bpe-llama3", "bpe-yarn",
                                  "bpe-headdim-f16"])
def test_generates_the_same_greedy_tokens_as_transformers(made: dict[str, Path], converted: dict[str, Path],
                                                          name: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(made[name])
    ids = tok(PROMPT)["input_ids"]
    assert len(ids) > 10
    want = hf_greedy(made[name], ids, 16)
    assert len(set(want)) > 2  # a continuation that says something about the weights, not one token repeated
    assert gguf_greedy(converted[name], ids, 16) == want


def test_both_layouts_give_the_same_hyperparameters(converted: dict[str, Path]) -> None:
    for kind in ("bpe", "spm"):
        new, old = (Llama(str(converted[f"{kind}-{v}"]), vocab_only=True, verbose=False) for v in ("v5", "v4"))
        try:
            assert new.metadata["llama.rope.freq_base"] == old.metadata["llama.rope.freq_base"] == "100000.000000"
            assert {**new.metadata, "general.name": ""} == {**old.metadata, "general.name": ""}
        finally:
            new.close()
            old.close()


@pytest.mark.parametrize(("pre", "name"), [("llama-bpe", "llama-bpe"), ("gpt-2 as a split", "gpt-2")])
def test_the_pre_tokenizer_is_chosen_by_behaviour(made: dict[str, Path], tmp_path: Path, pre: str,
                                                  name: str) -> None:
    d = tmp_path / "ckpt"
    tok = bpe_tokenizer(d, pre=pre, vocab_size=600)
    assert len(tok) <= json.loads((made["bpe-v5"] / "config.json").read_text())["vocab_size"]
    for file in ("model.safetensors", "config.json"):
        shutil.copy(made["bpe-v5"] / file, d)
    llm = Llama(str(convert(d, tmp_path / "m.gguf", outtype="f32")), vocab_only=True, verbose=False)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == name
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
        assert (tok("a")["input_ids"][0] == tok.bos_token_id) == (pre == "llama-bpe")  # that one adds BOS
    finally:
        llm.close()


# ---- config layouts, table-driven ----

@pytest.mark.parametrize(
    ("config", "want"),
    [
        ({"rope_theta": 500000.0}, ("default", 500000.0, 1.0)),
        ({}, ("default", 10000.0, 1.0)),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}, ("default", 100000.0, 1.0)),
        ({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}, ("linear", 10000.0, 4.0)),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}}, ("linear", 20000.0, 2.0)),
        ({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, ("llama3", 500000.0, 8.0)),
        ({"max_position_embeddings": 32768, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6,
          "factor": 4.0, "beta_fast": 32.0}}, ("yarn", 1e6, 4.0)),
    ],
)
def test_rope_is_read_from_either_layout(config: dict[str, Any], want: tuple[str, float, float]) -> None:
    rope = read_rope(config)
    assert (rope.kind, rope.theta, rope.factor) == want


def test_yarn_takes_the_original_context_from_max_position_embeddings() -> None:
    rope = read_rope({"max_position_embeddings": 32768,
                      "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "beta_fast": 32.0}})
    assert rope.original_context == 32768 and rope.yarn == {"beta_fast": 32.0}


def test_llama3_frequency_factors_match_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=16, rope_parameters=params,
                                      max_position_embeddings=131072)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    factors = read_rope({"rope_parameters": params}).freq_factors(128)
    assert factors is not None
    np.testing.assert_allclose(base / factors, inv_freq.numpy(), rtol=1e-5)


# ---- refusals: one line, non-zero exit, nothing left ----

def _refused(proc: subprocess.CompletedProcess[str], out_dir: Path, message: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("llama-inference: error:"), proc.stderr
    assert message in lines[0], lines[0]
    assert list(out_dir.iterdir()) == []


def test_an_unknown_rope_type_is_refused_by_name(made: dict[str, Path], tmp_path: Path) -> None:
    d = shutil.copytree(made["bpe-v5"], tmp_path / "ckpt")
    config = json.loads((d / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (d / "config.json").write_text(json.dumps(config))
    (tmp_path / "out").mkdir()
    proc = run_cli("convert", str(d), "--out", str(tmp_path / "out" / "m.gguf"))
    _refused(proc, tmp_path / "out", "rope type 'dynamic' is not supported")


def test_an_unknown_pre_tokenizer_is_refused_naming_vocab_pre(made: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    tok = bpe_tokenizer(d, pre="whitespace", vocab_size=600)  # the model's embeddings have room for it
    assert len(tok) <= json.loads((made["bpe-v5"] / "config.json").read_text())["vocab_size"]
    for name in ("model.safetensors", "config.json"):
        shutil.copy(made["bpe-v5"] / name, d)
    (tmp_path / "out").mkdir()
    proc = run_cli("convert", str(d), "--out", str(tmp_path / "out" / "m.gguf"))
    _refused(proc, tmp_path / "out", "pass --vocab-pre NAME")


def test_a_tokenizer_mismatch_found_by_verify_leaves_no_file(made: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m.gguf"
    proc = run_cli("convert", str(made["bpe-v5"]), "--out", str(out), "--vocab-pre", "llama-bpe")
    _refused(proc, tmp_path / "out", "first differ at token")
    proc = run_cli("convert", str(made["bpe-v5"]), "--out", str(out), "--vocab-pre", "llama-bpe", "--no-verify",
                   "--quiet")
    assert proc.returncode == 0 and out.exists(), proc.stderr


def test_a_normalizer_llama_cpp_does_not_apply_is_found_by_verify(made: dict[str, Path], tmp_path: Path) -> None:
    d = shutil.copytree(made["bpe-v5"], tmp_path / "ckpt")
    tokenizer = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps({**tokenizer, "normalizer": {"type": "NFC"}}))
    (tmp_path / "out").mkdir()
    proc = run_cli("convert", str(d), "--out", str(tmp_path / "out" / "m.gguf"), "--vocab-pre", "gpt-2")
    _refused(proc, tmp_path / "out", "at 'e\u0301 nai\u0308ve)")  # the decomposed accent, which NFC composes


@pytest.mark.parametrize("verify", [[], ["--no-verify"]])
def test_a_pre_tokenizer_name_llama_cpp_does_not_know_is_refused(made: dict[str, Path], tmp_path: Path,
                                                                 verify: list[str]) -> None:
    (tmp_path / "out").mkdir()
    proc = run_cli("convert", str(made["bpe-v5"]), "--out", str(tmp_path / "out" / "m.gguf"), "--vocab-pre", "gpt2",
                   *verify)  # the name the converter wrote; llama.cpp's is gpt-2
    _refused(proc, tmp_path / "out", "unknown pre-tokenizer type: 'gpt2'")


def test_progress_in_a_log_is_a_few_lines(made: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    proc = run_cli("convert", str(made["spm-v5"]), "--out", str(out))  # stderr is a pipe, not a terminal
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["convert: 25%", "convert: 50%", "convert: 75%",
                                                       "convert: 100%"], proc.stderr
    assert "\r" not in proc.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file's usual mode, not the temporary's 0600


def test_bos_and_eos_come_from_generation_config_when_nothing_else_names_them(made: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    d = shutil.copytree(made["bpe-v5"], tmp_path / "ckpt")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({k: v for k, v in config.items() if not k.endswith("_token_id")}))
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tok_config.items()
                                                         if k not in ("bos_token", "eos_token")}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    llm = Llama(str(convert(d, tmp_path / "m.gguf", outtype="f32")), vocab_only=True, verbose=False)
    try:
        assert (llm.token_bos(), llm.token_eos()) == (1, 2)  # LLaMA 3 lists several EOS ids: the first is EOS
    finally:
        llm.close()


def test_progress_on_a_terminal_is_a_live_bar() -> None:
    import io

    from convert.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term, log = Terminal(), io.StringIO()
    for stream in (term, log):
        with Progress(stream).task("convert", 1000) as advance:
            for _ in range(100):
                advance(10, "blk.0.attn_q.weight")
    assert "\r" in term.getvalue() and "100%" in term.getvalue()
    assert log.getvalue().count("\n") == 4 and "\r" not in log.getvalue()
