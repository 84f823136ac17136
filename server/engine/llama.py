"""Thin, typed wrappers over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Only the engine thread calls into a context; the vocabulary is read-only after load, so tokenizing and
detokenizing may happen on any thread (token pieces come from a table built at load, no shared buffer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

log = logging.getLogger(__name__)


class LlamaError(RuntimeError):
    """llama.cpp refused to load a model, create a context or decode a batch."""


def system_info() -> str:
    """What this llama.cpp build uses: SIMD extensions, AMX, threads backend..."""
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


# ggml_log_level: NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5 (continues the previous line).
# llama-cpp-python's own forwarder maps an older numbering (INFO as WARNING), so it is replaced.
_GGML_TO_LOGGING = {0: logging.INFO, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
native_log = logging.getLogger("llama_cpp.native")
# What llama.cpp logs as errors when a decode is aborted on purpose (a cancelled prefill): GGML_STATUS_ABORTED
# is 1, llama_decode's "aborted" is 2. Logged at DEBUG instead.
_ABORT_LINE_ENDS = ("failed with error 1", "compute status: 1", "failed to decode, ret = 2")


class _NativeLogForwarder:
    """Sends llama.cpp's log lines to Python logging (``llama_cpp.native``); its model-loading chatter at DEBUG."""

    def __init__(self) -> None:
        self._level = logging.DEBUG
        self._line = ""
        self.callback = llama_cpp.llama_log_callback(self._on_log)  # kept referenced while installed

    def _on_log(self, level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if level != 5:
            self._level = _GGML_TO_LOGGING.get(level, logging.INFO)
        self._line += text.decode("utf-8", "replace")
        if self._line.endswith("\n"):
            line, self._line = self._line.rstrip(), ""
            level = logging.DEBUG if line.endswith(_ABORT_LINE_ENDS) else self._level
            if line and native_log.isEnabledFor(level):
                native_log.log(level, "%s", line)


_forwarder = _NativeLogForwarder()


def route_native_logs() -> None:
    """Send llama.cpp's logs through Python logging instead of straight to stderr."""
    llama_cpp.llama_log_set(_forwarder.callback, ctypes.c_void_p(0))


@dataclass(frozen=True)
class ModelInfo:
    """What the API reports about the loaded model."""

    path: str
    description: str
    architecture: str
    n_params: int
    size_bytes: int
    n_ctx_train: int
    n_vocab: int
    n_layer: int
    kv_width: int  # K (or V) values per token per layer
    chat_template: str | None


class LlamaModel:
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, path: Path, *, use_mmap: bool = True) -> None:
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        # Memory-map the file, or read it into memory: when llama.cpp repacks the weights into its own
        # layout, a mapped file would stay resident beside the repacked copy.
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        self._ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._ptr:
            raise LlamaError(
                f"llama.cpp could not load {path}: truncated or corrupt file, or an architecture this build "
                "does not know (see the llama.cpp log lines above)"
            )
        self.path = path
        self.vocab = llama_cpp.llama_model_get_vocab(self._ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._ptr)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))  # the tokenizer puts BOS first
        # Fill-in-the-middle tokens (-1: none): prefix, suffix, middle, and the repository and file separators.
        self.fim = {"pre": llama_cpp.llama_vocab_fim_pre(self.vocab), "suf": llama_cpp.llama_vocab_fim_suf(self.vocab),
                    "mid": llama_cpp.llama_vocab_fim_mid(self.vocab), "rep": llama_cpp.llama_vocab_fim_rep(self.vocab),
                    "sep": llama_cpp.llama_vocab_fim_sep(self.vocab)}
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        # Built once: the engine thread and the event loop (chat formatting) both read them, lock-free.
        self._pieces: tuple[bytes, ...] = tuple(self._piece(t, special=False) for t in range(self.n_vocab))
        self._eog = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        self.n_swa = int(llama_cpp.llama_model_n_swa(self._ptr))  # sliding-window attention: cells fall out
        # Recurrent state (Mamba, RWKV) or hybrid: a sequence cannot be cut back to a shorter prefix.
        self.recurrent = bool(llama_cpp.llama_model_is_recurrent(self._ptr)
                              or llama_cpp.llama_model_is_hybrid(self._ptr))

    @property
    def ptr(self) -> llama_cpp.llama_model_p:
        return self._ptr

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self._ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # the value was cut: ask again with room for all of it
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self._ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def metadata(self) -> dict[str, str]:
        """The GGUF's metadata as llama.cpp keeps it: every scalar key, as text (arrays, the vocabulary among
        them, are not kept)."""
        out: dict[str, str] = {}
        buf = ctypes.create_string_buffer(256)
        for i in range(llama_cpp.llama_model_meta_count(self._ptr)):
            if llama_cpp.llama_model_meta_key_by_index(self._ptr, i, buf, len(buf)) < 0:
                continue
            key = buf.value.decode("utf-8", "replace")
            value = self.meta(key)
            if value is not None:
                out[key] = value
        return out

    def missing_fim_tokens(self) -> list[str]:
        """The GGUF keys of the fill-in-the-middle tokens (prefix, suffix, middle) this vocabulary lacks."""
        return [f"tokenizer.ggml.fim_{part}_token_id" for part in ("pre", "suf", "mid") if self.fim[part] < 0]

    def info(self) -> ModelInfo:
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._ptr, desc, len(desc))
        template = llama_cpp.llama_model_chat_template(self._ptr, None)
        return ModelInfo(
            path=str(self.path),
            description=desc.value.decode("utf-8", "replace"),
            architecture=self.meta("general.architecture") or "unknown",
            n_params=int(llama_cpp.llama_model_n_params(self._ptr)),
            size_bytes=int(llama_cpp.llama_model_size(self._ptr)),
            n_ctx_train=self.n_ctx_train,
            n_vocab=self.n_vocab,
            n_layer=int(llama_cpp.llama_model_n_layer(self._ptr)),
            kv_width=int(llama_cpp.llama_model_n_head_kv(self._ptr))
            * (int(llama_cpp.llama_model_n_embd(self._ptr)) // max(1, int(llama_cpp.llama_model_n_head(self._ptr)))),
            chat_template=template.decode("utf-8", "replace") if template else None,
        )

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Tokens of ``text``. Special-token text such as ``</s>`` stays plain text unless ``parse_special``."""
        data = text.encode("utf-8", "surrogatepass")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # pragma: no cover - a token never takes less than one byte, so n_max suffices
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def _piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (a piece of a UTF-8 character, for byte-fallback tokens); safe from any thread."""
        return self._piece(token, special=True) if special else self._pieces[token]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_to_piece(t) for t in tokens).decode("utf-8", "replace")

    def control_token_texts(self) -> list[str]:
        """The text of every control token (``<|im_end|>``, ``</s>``...), to keep user text from forging them."""
        texts = []
        for token in range(self.n_vocab):
            if llama_cpp.llama_vocab_get_attr(self.vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
                text = self.token_to_piece(token, special=True).decode("utf-8", "replace")
                if text:
                    texts.append(text)
        return texts

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def close(self) -> None:
        if self._ptr:
            llama_cpp.llama_model_free(self._ptr)
            self._ptr = None


CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "f32": llama_cpp.GGML_TYPE_F32}


class LlamaContext:
    """A llama.cpp context: the KV cache of ``n_seq_max`` sequences, one stream each, or one cache they share
    (``kv_unified``)."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int,
        n_batch: int,
        n_seq_max: int,
        n_threads: int,
        n_threads_batch: int,
        flash_attn: bool = True,
        cache_type: str = "f16",
        kv_unified: bool = False,
        embeddings: bool = False,
        pooling: int = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED,
    ) -> None:
        params = llama_cpp.llama_context_default_params()
        # An embedding context: llama.cpp pools each sequence's outputs (``pooling``; unspecified: the GGUF's).
        params.embeddings = embeddings
        params.pooling_type = pooling
        params.type_k = params.type_v = CACHE_TYPES[cache_type]
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        # One KV stream per slot (n_ctx / n_seq_max cells each): a sequence attends only over its own cells, but
        # llama.cpp splits a step into micro-batches of equal length per sequence. Unified: one cache, one
        # micro-batch a step, and sequences share cells (a copied prefix is not duplicated).
        params.kv_unified = kv_unified
        self.kv_unified = kv_unified
        params.no_perf = True
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self._ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self._ptr:
            raise LlamaError(f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?)")
        self.model = model
        self.n_ctx = llama_cpp.llama_n_ctx(self._ptr)
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self._ptr)  # cells of one sequence, after llama.cpp's rounding
        self.n_batch = n_batch
        self.memory = llama_cpp.llama_get_memory(self._ptr)  # NULL for encoders (BERT): they keep no cells
        self.pooling = int(llama_cpp.llama_pooling_type(self._ptr))
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(model.ptr))  # a pooled vector's width
        self._abort = _AbortFlag()
        llama_cpp.llama_set_abort_callback(self._ptr, self._abort.callback, self._abort.data)

    @property
    def ptr(self) -> llama_cpp.llama_context_p:
        return self._ptr

    def decode(self, batch: Batch) -> bool:
        """Run one batch; False if :meth:`abort` stopped it (its cells are then not kept: see llama_decode)."""
        rc = llama_cpp.llama_decode(self._ptr, batch.struct())
        if rc == 2:
            return False
        if rc != 0:
            raise LlamaError(f"llama_decode failed with code {rc}")
        return True

    def abort(self) -> None:
        """Stop the decode now running (from any thread) at its next graph node."""
        self._abort.set()

    def clear_abort(self) -> None:
        self._abort.clear()

    def seq_rm(self, seq_id: int, p0: int = 0, p1: int = -1) -> bool:
        """Drop the KV cells of ``seq_id`` at positions [p0, p1) (p1 = -1: to the end). False when the memory
        cannot remove part of a sequence (recurrent state); removing all of it always works."""
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def seq_copy(self, src: int, dst: int, n: int) -> None:
        """Make ``dst`` hold the first ``n`` cells of ``src`` (and nothing of its own). With one KV stream per
        sequence llama.cpp copies the whole stream's buffers at the start of the next decode (only whole copies
        are supported: the cells past ``n`` come too, for the caller to cut); in a unified cache ``dst`` just
        shares ``src``'s cells, at no cost."""
        llama_cpp.llama_memory_seq_rm(self.memory, dst, 0, -1)
        if self.kv_unified:
            llama_cpp.llama_memory_seq_cp(self.memory, src, dst, 0, n)
        else:
            llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def seq_state_size(self, seq_id: int) -> int:
        """Bytes :meth:`seq_state` takes for ``seq_id`` (0: llama.cpp cannot serialize it)."""
        return int(llama_cpp.llama_state_seq_get_size(self.ptr, seq_id))

    def seq_state(self, seq_id: int) -> ctypes.Array[ctypes.c_uint8]:
        """The KV cells of ``seq_id``, serialized by llama.cpp (to be put back by :meth:`set_seq_state`)."""
        size = self.seq_state_size(seq_id)
        if size == 0:
            raise LlamaError(f"llama.cpp cannot serialize sequence {seq_id}")
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ptr, buf, size, seq_id)
        if written != size:
            raise LlamaError(f"llama_state_seq_get_data wrote {written} of {size} bytes for sequence {seq_id}")
        return buf

    def set_seq_state(self, seq_id: int, data: ctypes.Array[ctypes.c_uint8]) -> bool:
        """Make ``seq_id`` hold exactly the cells ``data`` describes; False (and nothing held) when llama.cpp
        finds no room for them or refuses the data."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, 0, -1)
        if llama_cpp.llama_state_seq_set_data(self.ptr, data, len(data), seq_id) == 0:
            llama_cpp.llama_memory_seq_rm(self.memory, seq_id, 0, -1)
            return False
        return True

    def seq_pos_min(self, seq_id: int) -> int:
        """The smallest position ``seq_id`` still holds (-1: none); above 0 when a sliding window dropped cells."""
        return int(llama_cpp.llama_memory_seq_pos_min(self.memory, seq_id))

    def clear(self) -> None:
        if self.memory:
            llama_cpp.llama_memory_clear(self.memory, True)

    def seq_embedding(self, seq_id: int) -> np.ndarray:
        """The pooled embedding of ``seq_id`` from the last decode of an embedding context (a copy)."""
        ptr = llama_cpp.llama_get_embeddings_seq(self._ptr, seq_id)
        if not ptr:
            raise LlamaError(f"llama.cpp holds no pooled embedding for sequence {seq_id}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float32, copy=True)

    def close(self) -> None:
        if self._ptr:
            llama_cpp.llama_free(self._ptr)
            self._ptr = None


class _AbortFlag:
    """The abort callback of a context, without Python in it.

    ggml calls the callback after every graph node on the compute thread; a Python callback would take the GIL
    there each time (and wait for it while the event loop runs). libc's ``strlen`` over a two-byte buffer is a
    native ``bool(void *)``: 0 while the buffer is empty, 1 once :meth:`set` writes a byte.
    """

    def __init__(self) -> None:
        self._buf = ctypes.create_string_buffer(2)
        self.data = ctypes.cast(self._buf, ctypes.c_void_p)
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self.callback = llama_cpp.ggml_abort_callback(ctypes.cast(libc.strlen, ctypes.c_void_p).value)

    def set(self) -> None:
        self._buf[0] = b"x"

    def clear(self) -> None:
        self._buf[0] = b"\0"


class Batch:
    """A ``llama_batch`` whose arrays are numpy buffers owned by Python (so filling it costs no ctypes calls).

    Each token belongs to exactly one sequence.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_id = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        # seq_id is an array of pointers, one per token, each to that token's (single) sequence id.
        self._seq_ptrs = (ctypes.POINTER(llama_cpp.llama_seq_id) * capacity)(
            *[ctypes.cast(self.seq_id.ctypes.data + 4 * i, ctypes.POINTER(llama_cpp.llama_seq_id))
              for i in range(capacity)]
        )
        self.n_tokens = 0
        self._struct = llama_cpp.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_ptrs,
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def clear(self) -> None:
        self.n_tokens = 0

    @property
    def free(self) -> int:
        return self.capacity - self.n_tokens

    def add(self, tokens: list[int] | np.ndarray, start_pos: int, seq_id: int, want_last_logits: bool, *,
            all_logits: bool = False) -> int:
        """Append ``tokens`` of one sequence at positions ``start_pos...``; returns the batch index of the last.
        Logits are kept for the last token, or for every one with ``all_logits`` (drafts to verify)."""
        n = len(tokens)
        i = self.n_tokens
        if n == 0 or i + n > self.capacity:
            raise ValueError(f"cannot add {n} tokens to a batch with {self.free} free")
        self.token[i:i + n] = tokens
        self.pos[i:i + n] = np.arange(start_pos, start_pos + n, dtype=np.int32)
        self.seq_id[i:i + n] = seq_id
        self.logits[i:i + n] = 1 if all_logits else 0
        if want_last_logits:
            self.logits[i + n - 1] = 1
        self.n_tokens = i + n
        return i + n - 1

    def add_one(self, token: int, pos: int, seq_id: int) -> int:
        """Append one token that wants logits (a decoding step); returns its batch index."""
        i = self.n_tokens
        if i >= self.capacity:
            raise ValueError("batch is full")
        self.token[i] = token
        self.pos[i] = pos
        self.seq_id[i] = seq_id
        self.logits[i] = 1
        self.n_tokens = i + 1
        return i

    def struct(self) -> llama_cpp.llama_batch:
        """The C struct, pointing at this object's buffers (valid while it lives)."""
        self._struct.n_tokens = self.n_tokens
        return self._struct
