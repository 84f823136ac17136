# The model package: a pinned Hugging Face revision, converted to GGUF and quantized by our own CLI.
#
#   stage 1 (weights): a fixed-output derivation. It may reach the network (and only it may), because its
#     output is checked against `outputHash`. It runs `llama-inference fetch` and nothing else, so its hash
#     depends only on the repository's files at `revision`, never on the converter's version.
#   stage 2 (the package): an ordinary derivation, without network, that runs `llama-inference convert` and
#     `quantize` on stage 1's output and installs share/models/<name>.<QUANT>.gguf and a JSON of its metadata.
#     The output refers to no other store path (the weights are named by their hash, not their path).
#
# First build of a new revision: leave `outputHash = lib.fakeHash`; the build fails with
# "hash mismatch ... got: sha256-..."; put that value here (or pass it as an argument) and build again.
#
# HF_TOKEN reaches stage 1 through `impureEnvVars`. On a multi-user Nix install the builder runs under the
# daemon, so the variable must be in the *daemon's* environment (e.g. a systemd drop-in:
# `Environment=HF_TOKEN=...` for nix-daemon.service), not only in your shell. Alternatively pre-fetch
# without Nix and add the folder to the store with the same hash:
#   llama-inference fetch meta-llama/Llama-2-7b-hf --revision <rev> --out ./llama-2-7b-hf && rm -rf ./llama-2-7b-hf/.cache
#   nix-store --add-fixed --recursive sha256 ./llama-2-7b-hf
{ lib
, stdenvNoCC
, cacert
, llama-inference                       # the package of ./llama-server.nix: provides `llama-inference`
, repoId ? "meta-llama/Llama-2-7b-hf"
, revision ? "01c7f73d771dfac7d292323805ebc428287df4f9"
, name ? "llama-2-7b"
, quant ? "Q4_K_M"
, outtype ? "f16"
, hfEndpoint ? "https://huggingface.co"
, outputHash ? lib.fakeHash
}:

let
  weights = stdenvNoCC.mkDerivation {
    name = "${name}-hf-${builtins.substring 0 12 revision}";
    nativeBuildInputs = [ llama-inference cacert ];

    # Fixed-output: network allowed, result checked against the hash.
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    inherit outputHash;
    impureEnvVars = (lib.fetchers.proxyImpureEnvVars or [ ]) ++ [ "HF_TOKEN" ];

    HF_ENDPOINT = hfEndpoint;
    HF_HUB_DISABLE_TELEMETRY = "1";
    SSL_CERT_FILE = "${cacert}/etc/ssl/certs/ca-bundle.crt";

    dontUnpack = true;
    dontConfigure = true;
    dontFixup = true;
    buildPhase = ''
      runHook preBuild
      export HOME="$TMPDIR" HF_HOME="$TMPDIR/hf-home"
      llama-inference fetch ${lib.escapeShellArg repoId} --revision ${lib.escapeShellArg revision} --out "$out"
      # huggingface_hub's bookkeeping holds timestamps: it would change the hash from one fetch to the next.
      rm -rf "$out/.cache"
      runHook postBuild
    '';
    installPhase = "true";
  };

  file = "${name}.${quant}.gguf";
in
stdenvNoCC.mkDerivation {
  pname = "${name}-model";
  version = "${builtins.substring 0 12 revision}-${quant}";
  nativeBuildInputs = [ llama-inference ];

  dontUnpack = true;
  dontConfigure = true;
  buildPhase = ''
    runHook preBuild
    export HOME="$TMPDIR"
    # The converter names the model (general.name) after its input folder: through a link named ${name}, the
    # GGUF says "${name}" instead of carrying the weights' store path, which would make them a runtime dependency.
    ln -s ${weights} "$TMPDIR/${name}"
    llama-inference convert "$TMPDIR/${name}" --outtype ${outtype} --out "$TMPDIR/model.${outtype}.gguf" --quiet
    mkdir -p "$out/share/models"
    llama-inference quantize "$TMPDIR/model.${outtype}.gguf" "$out/share/models/${file}" \
      --type ${quant} --threads "''${NIX_BUILD_CORES:-1}"
    rm "$TMPDIR/model.${outtype}.gguf"
    sha=$(sha256sum "$out/share/models/${file}" | cut -d' ' -f1)
    size=$(stat -c %s "$out/share/models/${file}")
    cat > "$out/share/models/${name}.${quant}.json" <<JSON
    {"name": "${name}", "repo_id": "${repoId}", "revision": "${revision}", "quantization": "${quant}",
     "file": "${file}", "size_bytes": $size, "sha256": "$sha", "weights_nar_hash": "${outputHash}"}
    JSON
    runHook postBuild
  '';
  installPhase = "true";
  # The package holds the GGUF and its metadata, nothing else: a store path of the raw weights (13.5 GB for
  # LLaMA 2 7B, gated) or of the converter in the output would make them runtime dependencies that every node
  # pulls and that `flox publish` uploads. Nix refuses to finish a build whose output refers to them.
  disallowedReferences = [ weights llama-inference ];

  passthru = {
    inherit weights;
    modelPath = "share/models/${file}";
  };

  meta = {
    description = "${repoId}@${revision} as a ${quant} GGUF for llama-inference";
    platforms = lib.platforms.all;
  };
}
