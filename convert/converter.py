"""Hugging Face checkpoint -> GGUF, streamed: one tensor in memory at a time, written to a temporary file that
is renamed into place only when everything succeeded."""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from convert.architectures import ModelHooks, hooks_for
from convert.errors import PipelineError
from convert.pretok import choose_pre
from convert.progress import Progress
from convert.safetensors_io import Checkpoint, TensorRef
from convert.tokcheck import Reference, first_difference, llama_vocab, load_reference
from convert.vocab import VocabData, add_vocab, load_vocab

log = logging.getLogger(__name__)

OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}


@dataclass(frozen=True)
class ArrayRef:
    """A tensor computed from the config (LLaMA 3's rope_freqs), read like a checkpoint's :class:`TensorRef`."""

    name: str
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def chunks(self, rows: int, keep_f16: bool = False) -> Iterator[np.ndarray]:
        yield self.data


@dataclass(frozen=True)
class PlannedTensor:
    ref: TensorRef | ArrayRef
    name: str  # GGUF name
    qtype: gguf.GGMLQuantizationType


def read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise PipelineError(f"not a directory: {directory}")
    path = directory / "config.json"
    if not path.exists():
        raise PipelineError(f"{directory} has no config.json: not a Hugging Face checkpoint")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"config.json is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise PipelineError("config.json is not a JSON object")
    return config


def plan(hooks: ModelHooks, checkpoint: Checkpoint, outtype: str) -> list[PlannedTensor]:
    """Map every checkpoint tensor to its GGUF name and type, and check names and shapes before writing."""
    wanted = hooks.expected_shapes()
    qtype = OUTTYPES[outtype][0]
    planned: dict[str, PlannedTensor] = {}
    for ref in checkpoint:
        name = hooks.gguf_name(ref.name)
        if name is None:
            continue
        if name == "output.weight" and getattr(hooks, "tied", False):
            continue  # tied embeddings: llama.cpp reuses token_embd
        if name not in wanted:
            raise PipelineError(f"unexpected tensor {ref.name} (GGUF {name}) for this configuration")
        if ref.shape != wanted[name]:
            raise PipelineError(
                f"tensor {ref.name} has shape {list(ref.shape)}, expected {list(wanted[name])} from config.json"
            )
        planned[name] = PlannedTensor(ref, name, qtype if len(ref.shape) > 1 else gguf.GGMLQuantizationType.F32)
    missing = [n for n in wanted if n not in planned]
    if missing:
        raise PipelineError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    extra = [PlannedTensor(ArrayRef(name, data), name, gguf.GGMLQuantizationType.F32)
             for name, data in hooks.extra_tensors().items()]
    return extra + [planned[n] for n in wanted]  # GGUF order: embeddings, then layer by layer


CHUNK_BYTES = 32 * 2**20  # float32 working memory per block of rows


def _encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32, copy=False)
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16, copy=False)
    return gguf.quants.quantize(data, qtype)  # BF16, as bytes


def _write_streamed(writer: gguf.GGUFWriter, blocks: Iterator[np.ndarray]) -> None:
    """Write the next tensor's data block by block. It mirrors ``GGUFWriter.write_tensor_data``, which wants
    the whole tensor at once (gguf 0.19 has no streaming call), so that memory stays at one block."""
    fout = writer.fout[0]  # type: ignore[index]
    name = next(iter(writer.tensors[0]))
    info = writer.tensors[0].pop(name)
    writer.write_padding(fout, fout.tell())
    written = 0
    for block in blocks:
        block.tofile(fout)
        written += block.nbytes
    if written != info.nbytes:
        raise PipelineError(f"tensor {name}: wrote {written} bytes, expected {info.nbytes}")
    writer.write_padding(fout, info.nbytes)
    writer.state = WriterState.WEIGHTS


def _blocks(t: PlannedTensor, hooks: ModelHooks) -> Iterator[np.ndarray]:
    row_bytes = 4 * (int(np.prod(t.ref.shape[1:])) if len(t.ref.shape) > 1 else 1)
    multiple = hooks.row_multiple(t.name)
    rows = max(multiple, CHUNK_BYTES // row_bytes // multiple * multiple)
    keep_f16 = t.qtype == gguf.GGMLQuantizationType.F16
    for block in t.ref.chunks(rows, keep_f16=keep_f16):
        yield _encode(hooks.transform(t.name, block), t.qtype)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    item = {gguf.GGMLQuantizationType.F32: 4}.get(qtype, 2)
    return int(np.prod(shape)) * item


def _add_metadata(
    writer: gguf.GGUFWriter, hooks: ModelHooks, hf_dir: Path, vocab: VocabData, outtype: str, write_pre: bool = True
) -> None:
    writer.add_name(hooks.config.get("_name_or_path") or hf_dir.name)
    writer.add_file_type(OUTTYPES[outtype][1])
    hooks.add_hparams(writer)
    add_vocab(writer, hf_dir, vocab, hooks.config["vocab_size"], write_pre=write_pre)


class _VocabOnlyGGUF:
    """The output's metadata and vocabulary without weights, for llama.cpp to load in a moment.

    The pre-tokenizer's name is the file's last key, so trying another name rewrites only the tail (a GGUF
    string is a little-endian u64 length and its bytes, and with no tensors the file ends there): the
    vocabulary is written once however many candidates are tried."""

    def __init__(self, hooks: ModelHooks, hf_dir: Path, vocab: VocabData, workdir: Path) -> None:
        fd, name = tempfile.mkstemp(prefix=".vocab.", suffix=".gguf.part", dir=workdir)
        os.close(fd)
        self.path = Path(name)
        self.markers_in_text = vocab.model == "gpt2"  # see tokcheck.probe_texts
        pre = vocab.pre or "gpt-2"
        try:
            writer = gguf.GGUFWriter(self.path, hooks.arch_name)
            _add_metadata(writer, hooks, hf_dir, vocab, "f32", write_pre=False)
            writer.add_tokenizer_pre(pre)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            writer.close()
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self._pre_at = self.path.stat().st_size - 8 - len(pre.encode())

    def set_pre(self, name: str) -> None:
        data = name.encode()
        with self.path.open("r+b") as fh:
            fh.seek(self._pre_at)
            fh.write(struct.pack("<Q", len(data)) + data)
            fh.truncate()

    def mismatch(self, reference: Reference, compare: bool = True) -> str | None:
        """Where llama.cpp first tokenizes unlike ``reference`` (``compare`` False: only that it loads)."""
        if not compare:
            with llama_vocab(self.path):
                return None
        return first_difference(self.path, reference, markers_in_text=self.markers_in_text)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def _check_vocab(hooks: ModelHooks, hf_dir: Path, vocab: VocabData, reference: Reference, workdir: Path,
                 verify: bool) -> None:
    """Decide the BPE pre-tokenizer by behaviour when not given; refuse a vocabulary llama.cpp cannot load or,
    with ``verify``, tokenizes unlike the checkpoint - before the weights are written, not after."""
    probe = _VocabOnlyGGUF(hooks, hf_dir, vocab, workdir)
    try:
        if vocab.pre is None:
            def mismatch_with(name: str) -> str | None:
                probe.set_pre(name)
                return probe.mismatch(reference)

            vocab.pre = choose_pre(vocab.pre_guess, mismatch_with)
        else:
            _refuse_mismatch(probe.mismatch(reference, compare=verify), vocab)
    finally:
        probe.close()


def convert(
    hf_dir: Path, out: Path, *, outtype: str = "f16", vocab_pre: str | None = None, verify: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Convert ``hf_dir`` to the GGUF file ``out``. On any failure nothing is left at ``out``.

    With ``verify``, llama.cpp loads the written file's vocabulary and must tokenize a probe text exactly as the
    checkpoint's tokenizer does; otherwise the file is removed and the first difference reported."""
    if outtype not in OUTTYPES:
        raise PipelineError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    out = out.expanduser()
    if not out.parent.is_dir():
        raise PipelineError(f"output directory does not exist: {out.parent}")
    config = read_config(hf_dir)
    hooks = hooks_for(config)
    checkpoint = Checkpoint(hf_dir)
    tensors = plan(hooks, checkpoint, outtype)
    vocab = load_vocab(hf_dir, vocab_pre)
    reference = load_reference(hf_dir)
    vocab.adds = reference.adds()
    _check_vocab(hooks, hf_dir, vocab, reference, out.parent, verify)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, hooks.arch_name)
        _add_metadata(writer, hooks, hf_dir, vocab, outtype)
        for t in tensors:
            if t.qtype == gguf.GGMLQuantizationType.BF16:
                byte_shape = (*t.ref.shape[:-1], t.ref.shape[-1] * 2)
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), _nbytes(t.ref.shape, t.qtype),
                                       raw_dtype=t.qtype)
            else:
                dtype = np.dtype(np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
                writer.add_tensor_info(t.name, t.ref.shape, dtype, _nbytes(t.ref.shape, t.qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = progress or Progress.silent()
        with bar.task("convert", sum(t.ref.nbytes for t in tensors)) as advance:
            for t in tensors:
                _write_streamed(writer, _blocks(t, hooks))
                advance(t.ref.nbytes, t.name)
        writer.close()
        if verify:
            _refuse_mismatch(first_difference(tmp, reference, markers_in_text=vocab.model == "gpt2"), vocab)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; the output gets a new file's usual mode
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d tensors, %s, pre-tokenizer %s)", out, len(tensors), outtype, vocab.pre)
    return out


def _refuse_mismatch(difference: str | None, vocab: VocabData) -> None:
    if difference is None:
        return
    pre = f" (pre-tokenizer {vocab.pre})" if vocab.model == "gpt2" else ""
    raise PipelineError(f"verify: llama.cpp would tokenize unlike the checkpoint{pre}: {difference}; "
                        "no file written (--no-verify writes it anyway)")
