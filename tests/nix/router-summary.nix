# Plain values read from the router package (nix/vllm-router.nix, through nix/default.nix and through the Flox
# build's flox/llama-build/.flox/pkgs/vllm-router.nix), for `nix-instantiate --eval --strict`.
{ venv }:
let
  pkgs = import ./stand-in.nix { inherit venv; };
  top = import ../../nix/default.nix { inherit pkgs; };
  flox = pkgs.callPackage ../../flox/llama-build/.flox/pkgs/vllm-router.nix { };
  app = top.vllm-router.args;
in
{
  inherit (app) pname version format doCheck pythonImportsCheck;
  mainProgram = app.meta.mainProgram;
  platforms = app.meta.platforms;
  # The wheel for this system (what `src` fetches), and every system's.
  src = { inherit (app.src) url sha256; };
  wheels = top.vllm-router.wheels;
  dependencyNames = app.dependencies;
  floxBuildIsTheSame = flox.args.src.url == app.src.url && flox.args.version == app.version;
}
