# Plain values read from the model derivation, for `nix-instantiate --eval --strict`.
{ ... }@args:
let
  model = import ./model.nix args;
  w = model.weights.drvAttrs;
in
{
  weightsFixedOutput = w ? outputHash && w.outputHashMode == "recursive" && w.outputHashAlgo == "sha256";
  weightsHash = w.outputHash;
  weightsImpureEnvVars = w.impureEnvVars;
  weightsFetches = w.buildPhase;
  buildPhase = model.drvAttrs.buildPhase;
  buildIsFixedOutput = model.drvAttrs ? outputHash;
  weightsPath = model.weights.outPath;
  modelPath = model.modelPath;
}
