# The server package of nix/llama-server.nix, reached the way a Nix user does (nix/default.nix), with the
# stand-in for nixpkgs. Building it runs the package's install check.
{ venv }:
(import ../../nix/default.nix { pkgs = import ./stand-in.nix { inherit venv; }; }).llama-server
