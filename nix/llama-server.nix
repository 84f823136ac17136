# The server, packaged from this repository with nixpkgs' Python packages (`nix-build nix -A llama-server`).
#
# Its command is `llama-inference` (with `serve`), so it never clashes with llama.cpp's own `llama-server`
# binary in the same environment.
#
# llama-cpp-python is built here from its own pinned source, the version pyproject.toml pins (0.3.36): the server
# calls API that older releases lack (`LLAMA_LOAD_MODE_MMAP`), so nixpkgs' llama-cpp-python, whatever its
# version at the pinned revision, is not used. The build is portable, not -march=native (a package runs on other
# machines than its builder): one CPU backend linked in (no GGML_BACKEND_DL plugins, which llama-cpp-python
# neither installs nor loads), for the instruction-set level `cpuLevel`:
#   "x86-64-v3" (default): AVX2, FMA, F16C, BMI2: every x86-64 server CPU since 2013 (Haswell, Zen).
#   "x86-64": the baseline, for older nodes (about half the prompt speed).
# On aarch64 NEON is always on and cpuLevel is ignored. OpenMP is off: ggml's own thread pool is faster when
# called from changing threads, as the server does. The install check serves a tiny GGUF and generates tokens,
# so a package that cannot serve never builds.
{ lib
, stdenv
, python3Packages
, cmake
, ninja
, cpuLevel ? "x86-64-v3"
}:

let
  x86Levels = {
    "x86-64" = [ "-DGGML_SSE42=OFF" "-DGGML_AVX=OFF" "-DGGML_AVX2=OFF" "-DGGML_FMA=OFF" "-DGGML_F16C=OFF"
      "-DGGML_BMI2=OFF" ];
    "x86-64-v3" = [ "-DGGML_SSE42=ON" "-DGGML_AVX=ON" "-DGGML_AVX2=ON" "-DGGML_FMA=ON" "-DGGML_F16C=ON"
      "-DGGML_BMI2=ON" ];
  };

  llama-cpp-python = python3Packages.buildPythonPackage rec {
    pname = "llama-cpp-python";
    version = "0.3.36";
    pyproject = true;

    # The sdist on PyPI (it carries the vendored llama.cpp); hash of llama_cpp_python-0.3.36.tar.gz, sha256
    # 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e as published.
    src = python3Packages.fetchPypi {
      pname = "llama_cpp_python";
      inherit version;
      hash = "sha256-gy2waZAH8b6Vp+Qe8S6IkmsCuoNkYeNqNjctsnYMGi4=";
    };

    # The same patches scripts/build-llama-cpp-wheel.sh applies (each says why): a bound on a grammar's parse
    # stacks and a linear left-recursion check, so no request's grammar can hold a thread for ever.
    patches = [ ../scripts/patches/llama-grammar-bounds.patch ];

    build-system = [ python3Packages.scikit-build-core ];
    nativeBuildInputs = [ cmake ninja ];
    # scikit-build-core runs CMake itself, with CMAKE_ARGS.
    dontUseCmakeConfigure = true;
    env.CMAKE_ARGS = lib.concatStringsSep " " ([
      "-DGGML_NATIVE=OFF"
      "-DGGML_BACKEND_DL=OFF"
      "-DGGML_OPENMP=OFF"
    ] ++ lib.optionals stdenv.hostPlatform.isx86_64 x86Levels.${cpuLevel});

    dependencies = with python3Packages; [ numpy typing-extensions diskcache jinja2 ];
    pythonImportsCheck = [ "llama_cpp" ];
  };
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
    httpx
    filelock
    numpy
    jinja2
    tokenizers
    tqdm
  ]) ++ [ llama-cpp-python ];

  # pyproject.toml pins exact versions for the pip install; for these, nixpkgs' tested versions at the pinned
  # revision are used instead. Not for llama-cpp-python: its pin must hold, and does (built above).
  pythonRelaxDeps = [
    "fastapi"
    "uvicorn"
    "uvloop"
    "httptools"
    "sse-starlette"
    "pydantic"
    "pydantic-settings"
    "prometheus-client"
    "gguf"
    "huggingface_hub"
    "httpx"
    "filelock"
    "jinja2"
    "tokenizers"
  ];
  # Not in nixpkgs: without it /docs and /redoc load Swagger UI and ReDoc from their CDN (server/docs.py).
  pythonRemoveDeps = [ "fastapi-offline" ];

  # The project's test-suite needs the embedded model wheel and runs in CI (`make test`); here the install
  # check serves a tiny model through the installed command instead (nix/install-check.py).
  doCheck = true;
  installCheckPhase = ''
    runHook preInstallCheck
    export HOME="$TMPDIR"
    export PYTHONPATH="$out/${python3Packages.python.sitePackages}''${PYTHONPATH:+:$PYTHONPATH}"
    ${python3Packages.python.interpreter} ${./install-check.py} "$out/bin/llama-inference"
    runHook postInstallCheck
  '';
  pythonImportsCheck = [ "server.app" "convert.converter" ];

  passthru = { inherit llama-cpp-python; };

  meta = {
    description = "CPU inference server for LLaMA-family GGUF models, on llama.cpp";
    license = lib.licenses.mit;
    mainProgram = "llama-inference";
  };
}
