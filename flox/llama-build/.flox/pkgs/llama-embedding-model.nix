# `flox build llama-embedding-model`: all-MiniLM-L6-v2 as an f16 GGUF, the embedding model that
# flox/llama-runtime-embeddings serves beside the chat model (EMBEDDING_MODEL_FILE = <name>.<QUANT>.gguf).
#
# One fixed-output derivation: `llama-inference pull` fetches a ready GGUF from the Hub (checked against the
# Hub's SHA-256 of the file) and it is installed as share/models/<name>.<QUANT>.gguf; the output is checked
# against `outputHash` besides, so a revision that moves fails the build instead of changing the model. Not
# converted here as nix/llama-model.nix converts LLaMA: our converter takes LLaMA-family checkpoints, not BERT.
#
# First build: leave `outputHash = lib.fakeHash`; Nix stops with "hash mismatch ... got: sha256-..."; put that
# value here and build again. Pin `revision` to a commit then: the path `llama-inference pull` prints names it
# (.../snapshots/<commit>/<file>).
{ callPackage
, lib
, stdenvNoCC
, cacert
, llama-inference ? callPackage ../../../../nix/llama-server.nix { }
, repoId ? "second-state/All-MiniLM-L6-v2-Embedding-GGUF"
, revision ? "main"
, upstreamFile ? "all-MiniLM-L6-v2-ggml-model-f16.gguf"
, hfEndpoint ? "https://huggingface.co"
, outputHash ? lib.fakeHash
}:
let
  name = "all-minilm-l6-v2";
  quant = "F16";
  file = "${name}.${quant}.gguf";
in
stdenvNoCC.mkDerivation {
  pname = "${name}-embedding-model";
  version = "${builtins.substring 0 12 revision}-${quant}";
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
    fetched=$(llama-inference pull ${lib.escapeShellArg repoId} --revision ${lib.escapeShellArg revision} \
      --file ${lib.escapeShellArg upstreamFile})
    mkdir -p "$out/share/models"
    cp --dereference "$fetched" "$out/share/models/${file}"
    chmod 444 "$out/share/models/${file}"
    runHook postBuild
  '';
  installPhase = "true";

  passthru.modelPath = "share/models/${file}";

  meta = {
    description = "${repoId}@${revision} (${upstreamFile}) as ${file}, an embedding model for llama-inference";
    platforms = lib.platforms.all;
  };
}
