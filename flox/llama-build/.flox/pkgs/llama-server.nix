# `flox build llama-server`: the server package from this repository (its command is `llama-inference`).
{ callPackage }:
callPackage ../../../../nix/llama-server.nix { }
