# The model derivation of nix/llama-model.nix, with the stand-in for nixpkgs and the stand-in build of
# nix/llama-server.nix as its `llama-inference` (so building the model also runs the server's install check).
{ venv, repoId, revision, hfEndpoint, outputHash, name ? "tiny", quant ? "Q8_0" }:
let
  pkgs = import ./stand-in.nix { inherit venv; };
in
pkgs.callPackage ../../nix/llama-model.nix {
  llama-inference = pkgs.callPackage ../../nix/llama-server.nix { };
  inherit repoId revision hfEndpoint outputHash name quant;
  outtype = "f32";
}
