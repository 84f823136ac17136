# `flox build llama-model`: LLaMA 2 7B at a pinned revision, converted and quantized to Q4_K_M.
# HF_TOKEN must be set (see nix/llama-model.nix for the daemon caveat); on the first build, replace
# `outputHash` with the hash Nix prints.
{ callPackage, lib }:
let
  llama-inference = callPackage ../../../../nix/llama-server.nix { };
in
callPackage ../../../../nix/llama-model.nix {
  inherit llama-inference;
  repoId = "meta-llama/Llama-2-7b-hf";
  revision = "01c7f73d771dfac7d292323805ebc428287df4f9";
  name = "llama-2-7b";
  quant = "Q4_K_M";
  outputHash = lib.fakeHash;
}
