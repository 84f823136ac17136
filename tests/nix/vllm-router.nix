# The router package of nix/vllm-router.nix, reached as `flox build vllm-router` reaches it (through
# flox/llama-build/.flox/pkgs/vllm-router.nix), with the stand-in for nixpkgs: its fetchurl copies the wheel from
# `wheelDir` (what `pip download` fetched) and Nix checks it against the expression's sha256; the wheel is then
# installed and the package's install check runs the command.
{ venv, wheelDir }:
(import ./stand-in.nix { inherit venv wheelDir; }).callPackage ../../flox/llama-build/.flox/pkgs/vllm-router.nix { }
