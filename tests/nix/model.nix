# The model derivation of nix/llama-model.nix, with the stand-in for nixpkgs.
{ venv, repoId, revision, hfEndpoint, outputHash, name ? "tiny", quant ? "Q8_0" }:
let
  pkgs = import ./stand-in.nix { inherit venv; };
in
import ../../nix/llama-model.nix {
  inherit (pkgs) lib stdenvNoCC cacert llama-inference;
  inherit repoId revision hfEndpoint outputHash name quant;
  outtype = "f32";
}
