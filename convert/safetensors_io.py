"""Reading safetensors checkpoints tensor by tensor, each memory-mapped only while it is converted.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets), and
the tensors' bytes. Parsing it here keeps BF16 (which numpy lacks) and lets every offset be checked against the
file's size before anything is read, so a truncated or corrupt file fails with a clear message.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert.errors import PipelineError

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorRef:
    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int

    def chunks(self, rows: int, keep_f16: bool = False) -> Iterator[np.ndarray]:
        """The tensor in blocks of ``rows`` rows (the last may be shorter), each read through its own memory
        map that is closed before the next: memory stays at one block, whatever the tensor's size."""
        if len(self.shape) < 2:
            yield self.load(keep_f16)
            return
        row_items = int(np.prod(self.shape[1:]))
        itemsize = np.dtype(DTYPES[self.dtype]).itemsize
        for first in range(0, self.shape[0], rows):
            n = min(rows, self.shape[0] - first)
            part = TensorRef(self.name, self.dtype, (n, *self.shape[1:]), self.path,
                             self.offset + first * row_items * itemsize, n * row_items * itemsize)
            yield part.load(keep_f16)

    def load(self, keep_f16: bool = False) -> np.ndarray:
        """The tensor as float32 (BF16 widened), or as float16 if it is stored so and ``keep_f16`` (which
        halves the memory of an F16 -> F16 conversion). Read through a private memory map, closed after."""
        kind = DTYPES[self.dtype]
        count = int(np.prod(self.shape)) if self.shape else 1
        mapped = np.memmap(self.path, dtype=kind, mode="r", offset=self.offset, shape=(count,))
        try:
            if self.dtype == "BF16":
                out = (mapped.astype(np.uint32) << 16).view(np.float32)
            elif self.dtype == "F16" and keep_f16:
                out = np.array(mapped)
            else:
                out = np.array(mapped, dtype=np.float32)
        finally:
            mapped._mmap.close()  # type: ignore[attr-defined]  # drop the pages now, not at garbage collection
            del mapped
        return out.reshape(self.shape)


def _read_header(path: Path) -> dict[str, object]:
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise PipelineError(f"{path.name}: truncated safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER or 8 + length > size:
            raise PipelineError(f"{path.name}: corrupt safetensors header (length {length}, file {size} bytes)")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{path.name}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise PipelineError(f"{path.name}: corrupt safetensors header")
    header["__data_start__"] = 8 + length
    header["__size__"] = size
    return header


def _refs(path: Path) -> list[TensorRef]:
    header = _read_header(path)
    start, size = int(header.pop("__data_start__")), int(header.pop("__size__"))  # type: ignore[call-overload]
    header.pop("__metadata__", None)
    refs = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            dtype = entry.get("dtype") if isinstance(entry, dict) else entry
            raise PipelineError(f"{path.name}: tensor {name} has an unsupported dtype {dtype!r}")
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        itemsize = np.dtype(DTYPES[entry["dtype"]]).itemsize
        if end - begin != int(np.prod(shape)) * itemsize or begin < 0 or end < begin:
            raise PipelineError(f"{path.name}: tensor {name}: offsets do not match its shape {list(shape)}")
        if start + end > size:
            raise PipelineError(f"{path.name}: truncated: tensor {name} ends past the end of the file")
        refs.append(TensorRef(name, entry["dtype"], shape, path, start + begin, end - begin))
    return refs


def _index_files(directory: Path, index: Path) -> Iterator[Path]:
    """The shard files an index names, each checked to lie inside the checkpoint: the names come from whoever
    published the checkpoint, and a path out of it would read (and convert) any file the user can read."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PipelineError(f"{index.name}: not a safetensors index (no readable weight_map): {exc}") from exc
    if not isinstance(weight_map, dict):
        raise PipelineError(f"{index.name}: weight_map is not an object")
    for tensor, name in weight_map.items():
        entry = f"{index.name}: weight_map entry {tensor!r}: {name!r}"
        if not isinstance(name, str) or not name or "\0" in name:
            raise PipelineError(f"{entry} is not a file name")
        if Path(name).is_absolute():
            raise PipelineError(f"{entry} is an absolute path; shards must lie in the checkpoint directory")
        path = directory / name
        _check_inside(directory, path, entry)
        yield path


def _check_inside(directory: Path, path: Path, entry: str) -> None:
    """Refuse ``path`` unless it (and whatever its links lead to) stays inside ``directory``. A checkpoint in
    huggingface_hub's cache (``.../snapshots/<commit>/``) is made of links into that cache's blobs, which are
    allowed."""
    root = directory.resolve()
    target = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        allowed.append(root.parent.parent.parent)  # the Hub cache holding models--owner--name/
    if not any(target.is_relative_to(a) for a in allowed):
        spelled = Path(os.path.normpath(root / path.relative_to(directory)))
        how = "points" if not spelled.is_relative_to(root) else f"is a link to {target},"
        raise PipelineError(f"{entry} {how} outside the checkpoint directory {root}")
    if target.exists() and not target.is_file():
        raise PipelineError(f"{entry} is not a regular file")


class Checkpoint:
    """The tensors of a Hugging Face checkpoint: ``model.safetensors`` or the shards its index names."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(_index_files(directory, index)))
        else:
            files = sorted(directory.glob("*.safetensors"))
            for f in files:
                _check_inside(directory, f, f.name)
        if not files:
            raise PipelineError(f"no .safetensors files in {directory} (pytorch .bin checkpoints are not read)")
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise PipelineError(f"checkpoint shards missing: {', '.join(missing)}")
        self.tensors: dict[str, TensorRef] = {}
        for f in files:
            for ref in _refs(f):
                self.tensors[ref.name] = ref

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Write float tensors in safetensors format (``dtype`` F32, F16 or BF16) - for fixtures and benchmarks."""
    header: dict[str, object] = {}
    offset = 0
    for name, array in tensors.items():
        nbytes = array.size * (4 if dtype == "F32" else 2)
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for array in tensors.values():
            fh.write(_encode(np.asarray(array, dtype=np.float32), dtype).tobytes())


def _encode(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return array
    if dtype == "F16":
        return array.astype(np.float16)
    bits = array.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # BF16, round to nearest even


def write_f16_safetensors_streamed(
    path: Path, shapes: dict[str, tuple[int, ...]], fill: Callable[[tuple[int, ...]], Iterator[np.ndarray]]
) -> None:
    """Write an F16 checkpoint whose tensors ``fill`` yields piece by piece, so that no tensor - let alone the
    checkpoint - is ever whole in memory (for multi-GB synthetic checkpoints in benchmarks)."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            for piece in fill(shape):
                fh.write(piece.astype(np.float16, copy=False).tobytes())
