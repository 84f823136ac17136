"""The model pipeline end to end with real models: convert, quantize, verify; and errors that leave nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from llama_cpp import Llama

from tests.conftest import PARAGRAPHS, REPO
from tests.hf_fixtures import checkpoint_from_gguf


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO)


@pytest.fixture(scope="module")
def smol_hf(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    return checkpoint_from_gguf(model_path, tmp_path_factory.mktemp("smol-hf"))


@pytest.fixture(scope="module")
def smol_f32(tmp_path_factory: pytest.TempPathFactory, smol_hf: Path) -> Path:
    out = tmp_path_factory.mktemp("smol-gguf") / "smol-f32.gguf"
    proc = run_cli("convert", str(smol_hf), "--outtype", "f32", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def load(path: Path, **kwargs: object) -> Llama:
    return Llama(str(path), n_ctx=512, n_threads=2, verbose=False, **kwargs)  # type: ignore[arg-type]


def greedy(llm: Llama, prompt: str, n: int) -> list[int]:
    tokens = llm.tokenize(prompt.encode())
    out: list[int] = []
    for token in llm.generate(tokens, temp=0.0, top_k=1):
        if llm.token_eos() == token or len(out) >= n:
            break
        out.append(token)
    return out


def test_converted_smollm2_tokenizes_like_the_original(smol_f32: Path, model_path: Path) -> None:
    original, converted = load(model_path, vocab_only=True), load(smol_f32, vocab_only=True)
    try:
        for text in PARAGRAPHS:
            for special in (False, True):
                assert converted.tokenize(text.encode(), special=special) == \
                    original.tokenize(text.encode(), special=special)
        assert converted.metadata["tokenizer.chat_template"] == original.metadata["tokenizer.chat_template"]
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre",
                    "llama.rope.freq_base", "llama.context_length", "llama.attention.head_count_kv"):
            assert converted.metadata[key] == original.metadata[key], key
    finally:
        original.close()
        converted.close()


def test_smollm2_saved_by_transformers_5_converts_to_what_llama_cpp_serves(smol_hf: Path, smol_f32: Path,
                                                                          model_path: Path, tmp_path: Path) -> None:
    """The issue's case: transformers 5 re-saves the checkpoint (RoPE theta inside rope_parameters, its own
    tokenizer.json and chat_template.jinja); the converter must still write llama.cpp's 'smollm' pre-tokenizer
    and theta 100000, and the result must generate as the checkpoint converted before."""
    transformers = pytest.importorskip("transformers", reason="transformers (the test extra) re-saves it")
    resaved = tmp_path / "resaved"
    transformers.AutoTokenizer.from_pretrained(smol_hf).save_pretrained(resaved)
    model = transformers.LlamaForCausalLM.from_pretrained(smol_hf)
    model.save_pretrained(resaved)
    del model
    config = json.loads((resaved / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 100000.0
    out = tmp_path / "resaved.gguf"
    proc = run_cli("convert", str(resaved), "--outtype", "f32", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    original, before, converted = load(model_path, vocab_only=True), load(smol_f32), load(out)
    try:
        for key in ("tokenizer.ggml.pre", "llama.rope.freq_base", "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
            assert converted.metadata[key] == original.metadata[key], key
        for text in PARAGRAPHS:
            assert converted.tokenize(text.encode(), special=True) == original.tokenize(text.encode(), special=True)
        assert greedy(converted, "Once upon a time", 16) == greedy(before, "Once upon a time", 16)
    finally:
        for llm in (original, before, converted):
            llm.close()


def test_requantized_to_q4_1_it_generates_the_original_greedy_text(smol_f32: Path, model_path: Path,
                                                                   tmp_path: Path) -> None:
    q41 = tmp_path / "smol-q4_1.gguf"
    proc = run_cli("quantize", str(smol_f32), str(q41), "--type", "Q4_1", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    original, converted = load(model_path), load(q41)
    try:
        for prompt in ("Once upon a time", "The three primary colors are", "def quicksort(items):"):
            want = greedy(original, prompt, 40)
            assert len(want) >= 32
            assert greedy(converted, prompt, 40) == want
    finally:
        original.close()
        converted.close()


def test_q8_0_quantization_loads_and_generates_coherent_text(smol_f32: Path, model_path: Path,
                                                            tmp_path: Path) -> None:
    q8 = tmp_path / "smol-q8_0.gguf"
    assert run_cli("quantize", str(smol_f32), str(q8), "--type", "Q8_0").returncode == 0
    assert q8.stat().st_size < smol_f32.stat().st_size / 3
    proc = run_cli("verify", str(q8), "--perplexity", str(REPO / "README.md"))
    assert proc.returncode == 0, proc.stderr
    report = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert 5 < float(report["perplexity"]) < 200  # English prose: a real language model, not noise
    assert report["architecture"] == "llama" and report["quantization"] == "Q8_0"
    assert report["tokenizer_round_trip"] == "True"
    assert len(report["sha256"]) == 64
    original, converted = load(model_path), load(q8)
    try:
        text = converted.detokenize(greedy(converted, "Once upon a time", 32)).decode()
        assert len(text.split()) >= 15 and sum(c.isalpha() for c in text) > len(text) / 2
        # Q8_0 of the same weights starts the same story.
        assert greedy(converted, "Once upon a time", 8) == greedy(original, "Once upon a time", 8)
    finally:
        original.close()
        converted.close()


# ---- A tiny random LLaMA with a SentencePiece tokenizer, checked against numpy ----

def hf_llama_forward(d: Path, tokens: list[int]) -> np.ndarray:
    """Hugging Face's LlamaForCausalLM forward pass in numpy (rotate-half RoPE, GQA), all positions' logits."""
    from convert.safetensors_io import Checkpoint

    w = {t.name: t.load().astype(np.float64) for t in Checkpoint(d)}
    cfg = json.loads((d / "config.json").read_text())
    n_head, n_kv, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    hd = cfg["hidden_size"] // n_head
    t = len(tokens)

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]

    def rope(x: np.ndarray) -> np.ndarray:
        rotated = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * cos + rotated * sin

    h = w["model.embed_tokens.weight"][tokens]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        q = rope((x @ w[p + "self_attn.q_proj.weight"].T).reshape(t, n_head, hd))
        k = rope((x @ w[p + "self_attn.k_proj.weight"].T).reshape(t, n_kv, hd))
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(t, n_kv, hd)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(t, n_head * hd)
        h = h + o @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        h = h + ((gate / (1 + np.exp(-gate))) * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.fixture(scope="module")
def tiny_gguf(tiny_spm: Path) -> Iterator[Path]:
    out = tiny_spm / "tiny-f32.gguf"
    proc = run_cli("convert", str(tiny_spm), "--outtype", "f32", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    yield out


def test_tiny_llama_logits_match_a_numpy_hf_forward_pass(tiny_gguf: Path, tiny_spm: Path) -> None:
    llm = Llama(str(tiny_gguf), n_ctx=64, n_threads=2, logits_all=True, flash_attn=False, type_k=0, type_v=0,
                verbose=False)  # type 0 = F32 KV cache, so llama.cpp keeps full precision
    try:
        tokens = llm.tokenize(b"The keeper of the light is 7 and the storm was 20.")
        llm.eval(tokens)
        got = np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()
    want = hf_llama_forward(tiny_spm, tokens)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_tiny_llama_tokenizes_like_sentencepiece(tiny_gguf: Path, tiny_spm: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_spm / "tokenizer.model"))
    llm = Llama(str(tiny_gguf), vocab_only=True, verbose=False)
    try:
        for text in ["The sea of the ship is 3.", "harbour light keeper tower", "Storm night 19 and 2024!",
                     "unseen wörds zzz"]:
            assert llm.tokenize(text.encode(), add_bos=True) == [1, *sp.encode(text)], text
    finally:
        llm.close()


# ---- Bad input: one line, non-zero exit, no output file ----


def _break(case: str, src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if case == "missing config":
        (dst / "config.json").unlink()
    elif case == "unsupported architecture":
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    elif case == "truncated safetensors":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) - 5000])
    elif case == "corrupt safetensors":
        (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif case == "wrong shape":
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    elif case == "missing tokenizer":
        (dst / "tokenizer.model").unlink()
    elif case.startswith(("index", "shard")):
        # The weights themselves moved out of the checkpoint, to where a hostile index or link sends the converter.
        from convert.safetensors_io import Checkpoint

        secret = dst.parent / "secret.safetensors"
        names = list(Checkpoint(src).tensors)
        (dst / "model.safetensors").rename(secret)
        shard = {"index entry leading out": "../secret.safetensors", "index entry absolute": str(secret),
                 "index entry through a linked directory": "shards/secret.safetensors"}.get(case)
        if case == "index entry through a linked directory":
            (dst / "shards").symlink_to(dst.parent, target_is_directory=True)
        if shard is not None:
            (dst / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": dict.fromkeys(names, shard)}))
        else:
            (dst / "model.safetensors").symlink_to(secret)
    return dst


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing config", "has no config.json"),
        ("unsupported architecture", "unsupported architecture ['GPTNeoXForCausalLM']"),
        ("truncated safetensors", "truncated"),
        ("corrupt safetensors", "corrupt safetensors header"),
        ("wrong shape", "expected [96, 64]"),
        ("missing tokenizer", "no tokenizer"),
        ("index entry leading out", "'../secret.safetensors' points outside the checkpoint directory"),
        ("index entry absolute", "is an absolute path"),
        ("index entry through a linked directory", "'shards/secret.safetensors' is a link to"),
        ("shard linked outside", "model.safetensors is a link to"),
    ],
)
def test_bad_checkpoints_fail_with_one_line_and_no_output(tiny_spm: Path, tmp_path: Path, case: str,
                                                          message: str) -> None:
    broken = _break(case, tiny_spm, tmp_path / "broken")
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    proc = run_cli("convert", str(broken), "--out", str(out), "--quiet")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llama-inference: error:") and message in lines[0], proc.stderr
    assert list(out.parent.iterdir()) == []  # no output, no temporary file


def test_output_in_a_missing_directory_is_refused(tiny_spm: Path, tmp_path: Path) -> None:
    proc = run_cli("convert", str(tiny_spm), "--out", str(tmp_path / "nope" / "model.gguf"))
    assert proc.returncode == 1 and "output directory does not exist" in proc.stderr
    proc = run_cli("quantize", str(tmp_path / "missing.gguf"), str(tmp_path / "q.gguf"))
    assert proc.returncode == 1 and "model file not found" in proc.stderr
    assert not (tmp_path / "q.gguf").exists()


def test_a_checkpoint_in_the_hub_cache_reads_its_links_into_the_blobs(tmp_path: Path) -> None:
    """huggingface_hub's snapshot folders are links to ../../blobs/: outside the folder, and allowed; an index
    entry that leads out of the cache is not."""
    from convert.errors import PipelineError
    from convert.safetensors_io import Checkpoint, write_safetensors

    repo = tmp_path / "hub" / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    weights = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float32)}
    for name, shard in (("a", "model-00001-of-00002.safetensors"), ("b", "model-00002-of-00002.safetensors")):
        write_safetensors(repo / "blobs" / name, {name: weights[name]})
        (snapshot / shard).symlink_to(Path("../../blobs") / name)
    index = snapshot / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    checkpoint = Checkpoint(snapshot)
    assert {t.name: t.load().tolist() for t in checkpoint} == {k: v.tolist() for k, v in weights.items()}
    write_safetensors(tmp_path / "outside.safetensors", {"a": weights["a"]})
    index.write_text(json.dumps({"weight_map": {"a": "../../../../outside.safetensors"}}))
    with pytest.raises(PipelineError, match=r"weight_map entry 'a': '../../../../outside.safetensors' points outside"):
        Checkpoint(snapshot)
    index.write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}))
    with pytest.raises(PipelineError, match="weight_map is not an object"):
        Checkpoint(snapshot)
