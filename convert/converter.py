"""Hugging Face checkpoint -> GGUF, streamed: one tensor in memory at a time, written to a temporary file that
is renamed into place only when everything succeeded."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.gguf_writer import WriterState
from tqdm import tqdm

from convert.architectures import ModelHooks, hooks_for
from convert.errors import PipelineError
from convert.safetensors_io import Checkpoint, TensorRef
from convert.vocab import add_vocab, load_vocab

log = logging.getLogger(__name__)

OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}


@dataclass(frozen=True)
class PlannedTensor:
    ref: TensorRef
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
    return [planned[n] for n in wanted]  # GGUF order: embeddings, then layer by layer


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


def convert(
    hf_dir: Path, out: Path, *, outtype: str = "f16", vocab_pre: str | None = None, progress: bool = True,
) -> Path:
    """Convert ``hf_dir`` to the GGUF file ``out``. On any failure nothing is left at ``out``."""
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

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, hooks.arch_name)
        writer.add_name(config.get("_name_or_path") or hf_dir.name)
        writer.add_file_type(OUTTYPES[outtype][1])
        hooks.add_hparams(writer)
        add_vocab(writer, hf_dir, vocab, hooks.config["vocab_size"])
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
        total = sum(t.ref.nbytes for t in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
            for t in tensors:
                bar.set_postfix_str(t.name)
                _write_streamed(writer, _blocks(t, hooks))
                bar.update(t.ref.nbytes)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d tensors, %s)", out, len(tensors), outtype)
    return out
