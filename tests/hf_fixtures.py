"""Hugging Face-format checkpoints for the converter's tests, made here (the Hub is not reachable).

``checkpoint_from_gguf`` turns the bundled SmolLM2 GGUF back into what its Hugging Face repository holds:
config.json, model.safetensors (weights dequantized with gguf's own quant code, q/k rows back in Hugging Face's
rotate-half order), tokenizer.json and tokenizer_config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from convert.architectures import interleaved_to_rotate_half
from convert.safetensors_io import write_safetensors

HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


def hf_name(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        return f"model.layers.{layer}.{HF_NAMES[kind]}.weight"
    return HF_NAMES[base] + ".weight"


def checkpoint_from_gguf(gguf_path: Path, out: Path, dtype: str = "F32") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(gguf_path)
    arch = field(reader, "general.architecture")
    n_head = field(reader, f"{arch}.attention.head_count")
    n_head_kv = field(reader, f"{arch}.attention.head_count_kv")
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name.endswith("attn_q.weight"):
            data = interleaved_to_rotate_half(data, n_head)
        elif t.name.endswith("attn_k.weight"):
            data = interleaved_to_rotate_half(data, n_head_kv)
        tensors[hf_name(t.name)] = data
    write_safetensors(out / "model.safetensors", tensors, dtype)

    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": field(reader, f"{arch}.embedding_length"),
        "intermediate_size": field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(reader, f"{arch}.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "max_position_embeddings": field(reader, f"{arch}.context_length"),
        "rms_norm_eps": field(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(reader, f"{arch}.rope.freq_base"),
        "vocab_size": len(tokens),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    special = [i for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i in special
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)}, "merges": merges},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tokenizer_config = {
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token")),
        "add_eos_token": False,
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "unk_token": tokens[field(reader, "tokenizer.ggml.unknown_token_id")],
        "pad_token": tokens[field(reader, "tokenizer.ggml.padding_token_id")],
        "chat_template": field(reader, "tokenizer.chat_template"),
        "model_max_length": config["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


# ---- Checkpoints made by transformers itself: a tiny random LlamaForCausalLM and a real tokenizer ----

CORPUS = [
    "The lighthouse stood on the edge of the cliff, its beam sweeping across the dark water every twelve seconds.",
    "Sailors had trusted it for 150 years; it's said they'd never lost a ship. We'll see, they've said, I'M SURE.",
    "Prices rose 3.75% in 2024; naïve forecasts missed it. Émile said: «c'est la vie» — 日本語のテキストも。 🎉",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { x[i] = 0x1F; }\n\n\n   indented   text\twith tabs\n",
    "中文句子，标点符号！한국어 문장입니다. Русский текст, Ελληνικά, العربية, हिन्दी. 👍🏽 👨‍👩‍👧 🇫🇷",
    "Once upon a time there was a keeper of the light, and the storm was 20 nights long: 1 12 123 1234 12345.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def bpe_tokenizer(out: Path, pre: str = "gpt-2", vocab_size: int = 700) -> Any:
    """A byte-level BPE trained with the ``tokenizers`` library on CORPUS, saved by transformers.

    ``pre``: "gpt-2" (GPT-2's expression inside ByteLevel), "gpt-2 as a split" (the same expression in a Split
    step), "llama-bpe" (LLaMA 3's Split, then ByteLevel) or "whitespace" (a split on whitespace only, which no
    llama.cpp pre-tokenizer reproduces)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre == "gpt-2 as a split":  # GPT-2's expression, written the way LLaMA 3's tokenizer.json writes its own
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre == "whitespace":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise ValueError(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    if pre == "llama-bpe":  # as LLaMA 3's tokenizer.json: BOS put before every text by the post-processor
        bos = "<|im_start|>"
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))]),
        ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def spm_tokenizer(out: Path, vocab_size: int = 400) -> Any:
    """A SentencePiece BPE model (LLaMA 2's kind: byte fallback, split digits) trained by ``sentencepiece``,
    loaded and saved by transformers' LlamaTokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    work = out / "_spm"
    work.mkdir()
    (work / "corpus.txt").write_text("\n".join(CORPUS * 2), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    (work / "corpus.txt").unlink()
    tok = LlamaTokenizer.from_pretrained(work)  # transformers converts it (sentencepiece + protobuf)
    tok.save_pretrained(out)  # transformers 5 writes tokenizer.json only: no tokenizer.model
    shutil.rmtree(work)
    return tok


def tiny_llama(out: Path, tokenizer: Any, *, tied: bool, rope: dict[str, Any] | None = None, seed: int = 0,
               **overrides: Any) -> Path:
    """A random 2-layer LlamaForCausalLM (hidden 64, 4 heads, 2 KV heads) saved by ``save_pretrained``
    (transformers 5: RoPE in ``rope_parameters``) next to ``tokenizer``'s files; ``overrides``: LlamaConfig's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_parameters": rope or {"rope_type": "default", "rope_theta": 100000.0},
        "tie_word_embeddings": tied, "initializer_range": 0.1,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **overrides,
    })
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


def to_transformers4_layout(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose config.json is laid out as transformers 4 wrote it: ``rope_theta`` and
    ``rope_scaling`` at the top level, ``torch_dtype`` instead of ``dtype``."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
