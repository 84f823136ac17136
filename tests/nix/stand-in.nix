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
# - python3Packages.buildPythonApplication with `format = "wheel"` (nix/vllm-router.nix): really installs the wheel
#   (`src`) with the venv's pip into the output's site-packages, writes each of the wheel's commands as bin/<name>
#   running the venv's Python on that site-packages first, imports `pythonImportsCheck` from it, then runs the
#   package's installCheckPhase. The venv supplies the wheel's dependencies, not nixpkgs.
# - fetchurl: with `wheelDir`, a real fixed-output derivation that copies the file named as the URL's last part
#   from that directory (where the test put what `pip download` fetched), so Nix itself checks it against the
#   expression's sha256; without it, its arguments (url, sha256), for reading.
# - python3Packages.buildPythonPackage and fetchPypi: no build, no download. They return their arguments (version,
#   src, CMAKE_ARGS, ...) so tests can read what the expression asks nixpkgs for.
# - callPackage, lib.{fileset,optionals,concatStringsSep,escapeShellArg,fakeHash,...}: what those functions do,
#   for the arguments used here (fileset.toSource records its files instead of copying them).
# What it does not prove: that nixpkgs at the pinned revision has the Python packages named in
# nix/llama-server.nix at versions the server works with, that scikit-build-core builds llama-cpp-python from the
# sdist with those CMake flags, that `fetchPypi`'s hash matches the download (the hash is recorded from
# `pip download` + `nix hash file`), and the sandboxed build of a real `nix-build nix -A llama-server`; for
# vllm-router, that autoPatchelfHook finds every library of the wheel's extension in nixpkgs (the host's glibc and
# libstdc++ load it here), and that nixpkgs' versions of its dependencies suit it.
{ venv, wheelDir ? null }:
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
    licenses.asl20 = "Apache-2.0";
    sourceTypes.binaryNativeCode = "binaryNativeCode";
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

  # A wheel installed as it is (format = "wheel"), its commands run by the venv's Python.
  installWheel = attrs: mkDerivation {
    inherit (attrs) pname version;
    buildPhase = ''
      export HOME="$TMPDIR"
      site="$out/${python.sitePackages}"
      mkdir -p "$out/bin" "$site"
      # The store path's hash prefix off, as nixpkgs' wheelUnpackHook does: pip reads the wheel's tags from its name.
      wheel="$TMPDIR/${attrs.src.name}"
      cp ${attrs.src} "$wheel"
      ${venv}/bin/python -m pip install --quiet --no-deps --no-index --no-compile --disable-pip-version-check \
        --target "$site" "$wheel"
      for script in "$site"/bin/*; do
        printf '#!/bin/bash\nexport PYTHONPATH=%s''${PYTHONPATH:+:$PYTHONPATH}\nexec %s %s "$@"\n' \
          "$site" ${python.interpreter} "$script" > "$out/bin/$(basename "$script")"
        chmod +x "$out/bin/$(basename "$script")"
      done
      for module in ${builtins.concatStringsSep " " (attrs.pythonImportsCheck or [ ])}; do
        PYTHONPATH="$site" ${python.interpreter} -c "import $module"
      done
    '';
    installPhase = if attrs.doCheck or false then attrs.installCheckPhase else "true";
    passthru = (attrs.passthru or { }) // { args = removeAttrs attrs [ "passthru" "installCheckPhase" ]; };
    meta = attrs.meta or { };
  };

  fetchurl = { url, sha256 }:
    let name = baseNameOf url;
    in
    if wheelDir == null then { inherit name url sha256; fetchurl = true; } else
    derivation {
      inherit name;
      system = builtins.currentSystem;
      builder = "/bin/bash";
      PATH = "/usr/bin:/bin";
      args = [ "-c" "cp ${wheelDir}/${name} $out" ];
      outputHashMode = "flat";
      outputHashAlgo = "sha256";
      outputHash = sha256;
    } // { inherit url sha256; };

  buildPythonApplication = attrs: if attrs.format or "" == "wheel" then installWheel attrs else mkDerivation {
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
    inherit lib mkDerivation fetchurl;
    stdenv = {
      inherit mkDerivation;
      hostPlatform = { isx86_64 = builtins.currentSystem == "x86_64-linux"; system = builtins.currentSystem; };
      cc.cc.lib = "libstdcxx-stand-in";
    };
    stdenvNoCC = { inherit mkDerivation; };
    cmake = "cmake-stand-in";
    ninja = "ninja-stand-in";
    autoPatchelfHook = "autoPatchelfHook-stand-in";
    zlib = "zlib-stand-in";
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
      "setproctitle" "aiohttp" "orjson" "requests"
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
