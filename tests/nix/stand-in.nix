# A small stand-in for the parts of nixpkgs that nix/*.nix use (nixpkgs cannot be fetched here).
#
# What it provides, and how far each part is real:
# - stdenvNoCC.mkDerivation: real plumbing. A `derivation` whose builder runs buildPhase and installPhase with
#   /bin/bash (builds run with the sandbox off), each nativeBuildInput's bin/ on PATH. Nix itself enforces
#   fixed-output hashes, impureEnvVars and disallowedReferences on it, exactly as with nixpkgs.
# - python3Packages.buildPythonApplication: installs nothing. Its output's bin/llama-inference runs this
#   checkout's virtual environment (`venv`); then it runs the package's own installCheckPhase (nix/install-check.py)
#   against that command, with the venv's Python as `python.interpreter`. So the install check really serves a
#   GGUF and generates, but through pip's build of llama-cpp-python, not the Nix one.
# - python3Packages.buildPythonPackage and fetchPypi: no build, no download. They return their arguments (version,
#   src, CMAKE_ARGS, ...) so tests can read what the expression asks nixpkgs for.
# - callPackage, lib.{fileset,optionals,concatStringsSep,escapeShellArg,fakeHash,...}: what those functions do,
#   for the arguments used here (fileset.toSource records its files instead of copying them).
# What it does not prove: that nixpkgs at the pinned revision has the Python packages named in
# nix/llama-server.nix at versions the server works with, that scikit-build-core builds llama-cpp-python from the
# sdist with those CMake flags, that `fetchPypi`'s hash matches the download (the hash is recorded from
# `pip download` + `nix hash file`), and the sandboxed build of a real `nix-build nix -A llama-server`.
{ venv }:
let
  fakeHash = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
  binPath = inputs: builtins.concatStringsSep ":" (map (i: "${i}/bin") inputs);
  mkDerivation = attrs:
    let
      name = attrs.name or "${attrs.pname}-${attrs.version}";
      env = removeAttrs attrs [ "nativeBuildInputs" "passthru" "meta" "name" "pname" "version" ];
      drv = derivation (env // {
        inherit name;
        system = builtins.currentSystem;
        builder = "/bin/bash";
        args = [ "-euo" "pipefail" "-c" ''
          export PATH="${binPath (attrs.nativeBuildInputs or [ ])}:/usr/bin:/bin"
          runHook() { :; }
          eval "$buildPhase"
          eval "$installPhase"
        '' ];
      });
    in
    drv // (attrs.passthru or { }) // { meta = attrs.meta or { }; };

  lib = {
    inherit fakeHash;
    escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";
    fetchers.proxyImpureEnvVars = [ "http_proxy" "https_proxy" "ftp_proxy" "all_proxy" "no_proxy" ];
    platforms.all = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
    concatStringsSep = builtins.concatStringsSep;
    optionals = cond: list: if cond then list else [ ];
    licenses.mit = "MIT";
    fileset = {
      unions = paths: paths;
      toSource = { root, fileset }: { root = toString root; files = map toString fileset; };
    };
  };

  python = {
    sitePackages = "lib/python3.11/site-packages";
    interpreter = "${venv}/bin/python";
  };

  # The arguments of a Python package, kept for inspection.
  buildPythonPackage = attrs: attrs // { name = "${attrs.pname}-${attrs.version}"; stand-in = true; };

  buildPythonApplication = attrs: mkDerivation {
    inherit (attrs) pname version;
    buildPhase = ''
      mkdir -p "$out/bin" "$out/${python.sitePackages}"
      printf '#!/bin/bash\nexec %s "$@"\n' ${venv}/bin/llama-inference > "$out/bin/llama-inference"
      chmod +x "$out/bin/llama-inference"
    '';
    installPhase = if attrs.doCheck or false then attrs.installCheckPhase else "true";
    passthru = (attrs.passthru or { }) // {
      args = removeAttrs attrs [ "passthru" "installCheckPhase" ];
      inherit (attrs) installCheckPhase;
    };
    meta = attrs.meta or { };
  };

  self = {
    inherit lib mkDerivation;
    stdenv = { inherit mkDerivation; hostPlatform.isx86_64 = builtins.currentSystem == "x86_64-linux"; };
    stdenvNoCC = { inherit mkDerivation; };
    cmake = "cmake-stand-in";
    ninja = "ninja-stand-in";
    # The host's CA bundle where nixpkgs' cacert puts it.
    cacert = mkDerivation {
      name = "cacert-stand-in";
      buildPhase = ''
        mkdir -p "$out/etc/ssl/certs"
        cp /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/ca-bundle.crt"
      '';
      installPhase = "true";
    };
    python3Packages = builtins.listToAttrs (map (n: { name = n; value = n; }) [
      "fastapi" "uvicorn" "uvloop" "httptools" "sse-starlette" "pydantic" "pydantic-settings" "prometheus-client"
      "gguf" "huggingface-hub" "numpy" "jinja2" "tqdm" "typing-extensions" "diskcache" "setuptools"
      "scikit-build-core" "tokenizers" "httpx" "filelock"
    ]) // {
      inherit python buildPythonPackage buildPythonApplication;
      fetchPypi = args: args // { fetchPypi = true; };
    };
    callPackage = fn: overrides:
      let f = if builtins.isFunction fn then fn else import fn;
      in f (builtins.intersectAttrs (builtins.functionArgs f) self // overrides);
  };
in
self
