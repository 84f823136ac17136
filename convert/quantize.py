"""Quantization with llama.cpp's own quantizer (``llama_model_quantize``), into a temporary file renamed at the end."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import llama_cpp

from convert.errors import PipelineError
from server.model_files import ModelFileError, check_gguf

QUANT_TYPES = {
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
}


def quantize(src: Path, dst: Path, qtype: str = "Q4_K_M", threads: int = 0) -> Path:
    """Quantize GGUF ``src`` into ``dst``; nothing is left at ``dst`` if it fails."""
    if qtype.upper() not in QUANT_TYPES:
        raise PipelineError(f"unknown quantization type {qtype!r}; choose one of {', '.join(QUANT_TYPES)}")
    try:
        check_gguf(src)
    except ModelFileError as exc:
        raise PipelineError(str(exc)) from exc
    if not dst.parent.is_dir():
        raise PipelineError(f"output directory does not exist: {dst.parent}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype.upper()]
    params.nthread = threads
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        llama_cpp.llama_backend_init()
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise PipelineError(f"llama.cpp could not quantize {src} (code {rc}); see its log above")
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst
