#!/usr/bin/env bash
# Build (once) and install llama-cpp-python with the CPU recipe this project needs.
#
# Why: a plain `pip install llama-cpp-python` builds llama.cpp with -march=native. On CPUs with AMX and
# GCC 12, the RTL dead-store-elimination pass drops the tile-config stores before `ldtilecfg`, and the
# first decode crashes (SIGSEGV) inside ggml's AMX matmul. `-fno-dse` keeps those stores and the fast AMX
# path. `GGML_OPENMP=OFF` uses ggml's own thread pool: with OpenMP, calling llama.cpp from changing
# Python threads is about 3x slower.
#
# The patches in scripts/patches/ are applied to the sdist's vendored llama.cpp before it is built (each says why
# in its own comments; the Nix package applies the same files).
#
# The wheel is cached in a folder named after the version, the flags *and* the patches, outside pip's own cache,
# and installed from that file, so no cache can hand back a wheel built with other flags or without a patch.
set -euo pipefail

PYTHON="${PYTHON:-.venv/bin/python}"
# The version comes from pyproject.toml, the one place it is pinned.
VERSION="$("$PYTHON" -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(re.sub(r"^llama-cpp-python==", "", d) for d in deps if d.startswith("llama-cpp-python==")))')"
CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_OPENMP=OFF -DCMAKE_C_FLAGS=-fno-dse -DCMAKE_CXX_FLAGS=-fno-dse}"
CACHE_ROOT="${LLAMA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-inference/wheels}"

PATCHES_DIR="$(cd "$(dirname "$0")" && pwd)/patches"
patches_digest="$(cat "$PATCHES_DIR"/*.patch 2>/dev/null | sha256sum | cut -c1-16)"

key="$(printf '%s|%s|%s|%s|%s' "$VERSION" "$CMAKE_ARGS" "$("$PYTHON" -c 'import sys; print(sys.version)')" "$(uname -m)" "$patches_digest" | sha256sum | cut -c1-16)"
wheel_dir="$CACHE_ROOT/llama-cpp-python-$VERSION-$key"

if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo ">> building llama-cpp-python $VERSION with CMAKE_ARGS=\"$CMAKE_ARGS\" (a few minutes on 2 cores)"
    mkdir -p "$CACHE_ROOT"
    tmp="$(mktemp -d "$CACHE_ROOT/.tmp.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python --no-cache-dir \
        --dest "$tmp/sdist" "llama-cpp-python==$VERSION"
    tar -xzf "$tmp"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$tmp/sdist"
    src="$tmp/sdist/llama_cpp_python-$VERSION"
    for p in "$PATCHES_DIR"/*.patch; do
        [ -e "$p" ] || continue
        echo ">> applying $(basename "$p")"
        patch --quiet --forward --batch -p1 -d "$src" < "$p"
    done
    CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$PYTHON" -m pip wheel --no-deps --no-cache-dir --wheel-dir "$tmp" "$src"
    rm -rf "$tmp/sdist"
    printf '%s\n' "$CMAKE_ARGS" > "$tmp/CMAKE_ARGS"
    chmod 755 "$tmp"
    rm -rf "$wheel_dir"
    mv "$tmp" "$wheel_dir"   # atomic: a failed build leaves no half-written cache entry
    trap - EXIT
else
    echo ">> using cached llama-cpp-python $VERSION wheel built with CMAKE_ARGS=\"$CMAKE_ARGS\""
fi

# Install that very file: no index, link or cache lookup can substitute another build.
"$PYTHON" -m pip install --force-reinstall --no-deps --no-index "$wheel_dir"/llama_cpp_python-"$VERSION"-*.whl
