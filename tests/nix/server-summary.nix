# Plain values read from nix/default.nix and the server package, for `nix-instantiate --eval --strict`.
{ venv }:
let
  top = import ../../nix/default.nix { pkgs = import ./stand-in.nix { inherit venv; }; };
  app = top.llama-server.args;
  llama = top.llama-server.llama-cpp-python;
in
{
  attributes = builtins.attrNames top;
  mainProgram = app.meta.mainProgram;
  relaxed = app.pythonRelaxDeps;
  removed = app.pythonRemoveDeps or [ ];
  # The stand-in's Python packages are their names; ours is the llama-cpp-python derivation.
  dependencyNames = map (d: if builtins.isString d then d else d.pname) app.dependencies;
  doCheck = app.doCheck;
  sourceFiles = app.src.files;
  dependsOnOurLlama = builtins.any (d: d == llama) app.dependencies;
  llama = {
    inherit (llama) version pname;
    cmakeArgs = llama.env.CMAKE_ARGS;
    patches = map (p: baseNameOf (toString p)) (llama.patches or [ ]);
    src = { inherit (llama.src) pname version hash; };
  };
}
