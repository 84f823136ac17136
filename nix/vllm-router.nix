# vllm-router, the vLLM project's router (`nix-build nix -A vllm-router`; `flox build vllm-router`), for the router
# pod of k8s/overlays/vllm-router, which runs it from the Flox environment flox/llama-router.
#
# Upstream publishes it on PyPI only, as wheels: a Python launcher (`vllm-router` -> vllm_router.launch_router)
# around a Rust extension, vllm_router_rs.abi3.so (the router itself), with the libraries it links bundled beside
# it (OpenSSL 1.1.1k, PCRE2; auditwheel's vllm_router.libs/). The sdist would need a Rust toolchain and the
# crate's whole dependency tree, vendored and hashed; the wheel is the artefact that pyproject.toml's test extra
# pins (vllm-router==0.1.17) and that tests/test_fleet.py measures in front of our server. So the wheel is
# installed as it is: fetched from files.pythonhosted.org by URL and sha256, the sha256 PyPI lists for that file
# (`pip download --no-deps vllm-router==0.1.17` and `sha256sum`; tests/test_nix.py downloads it again and
# compares), and autoPatchelfHook points the extension at nixpkgs' libstdc++, libgcc_s and zlib (the bundled
# libraries stay, found through the package's own output). Moving the pin: change `version` and both wheels
# here, and the pin in pyproject.toml, together.
{ lib
, stdenv
, python3Packages
, fetchurl
, autoPatchelfHook
, zlib
}:

let
  version = "0.1.17";
  # One manylinux_2_28 wheel per system (abi3: any CPython >= 3.8 loads it).
  wheels = {
    x86_64-linux = {
      url = "https://files.pythonhosted.org/packages/26/99/48e47ba5847cbb3c3fabc65973a8de7c00ad429f29c3aace954b56771431/vllm_router-0.1.17-cp38-abi3-manylinux_2_28_x86_64.whl";
      sha256 = "85c96bea4d573a49b5a8ae4c72ee3dfe733aba26b6f1ff1256e6142f1f42694d";
    };
    aarch64-linux = {
      url = "https://files.pythonhosted.org/packages/62/fc/1d4c8aaace174fa056a1b5a3bc445f6ec735b0ff1d9ad30620b809d49e7e/vllm_router-0.1.17-cp38-abi3-manylinux_2_28_aarch64.whl";
      sha256 = "1ec4d5ce14c19431cc84e36238507dff89020ab024d99f042f091f5e9f2c895a";
    };
  };
  system = stdenv.hostPlatform.system;
  wheel = wheels.${system} or (throw "vllm-router ${version}: PyPI has no wheel for ${system}");
in
python3Packages.buildPythonApplication {
  pname = "vllm-router";
  inherit version;
  format = "wheel";

  src = fetchurl { inherit (wheel) url sha256; };

  nativeBuildInputs = [ autoPatchelfHook ];
  # What vllm_router_rs.abi3.so and its bundled libcrypto need besides glibc.
  buildInputs = [ stdenv.cc.cc.lib zlib ];

  # The wheel's Requires-Dist (METADATA): the launcher imports its Python load balancer (mini_lb) at start, so
  # every one is needed even though the Rust router serves. No version pins but requests>=2.25, which nixpkgs
  # meets; tests/test_nix.py compares this list with the pinned wheel's metadata.
  dependencies = with python3Packages; [
    setproctitle
    aiohttp
    orjson
    uvicorn
    fastapi
    requests
  ];

  # The installed command starts: its parser knows the flags the router's Deployment passes.
  doCheck = true;
  installCheckPhase = ''
    runHook preInstallCheck
    export HOME="$TMPDIR"
    $out/bin/vllm-router --help > "$TMPDIR/help"
    grep -q -- --service-discovery-namespace "$TMPDIR/help"
    grep -q -- sticky_least_loaded "$TMPDIR/help"
    runHook postInstallCheck
  '';
  pythonImportsCheck = [ "vllm_router" "vllm_router.router" "vllm_router_rs" ];

  passthru = { inherit wheels; };

  meta = {
    description = "vLLM's router (PyPI wheel ${version}): a Rust load balancer with cache-aware and session policies";
    homepage = "https://github.com/vllm-project/router";
    license = lib.licenses.asl20;
    sourceProvenance = [ lib.sourceTypes.binaryNativeCode ];
    platforms = builtins.attrNames wheels;
    mainProgram = "vllm-router";
  };
}
