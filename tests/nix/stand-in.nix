# A small stand-in for the parts of nixpkgs that nix/*.nix use (nixpkgs cannot be fetched here).
# mkDerivation is real plumbing: it makes a derivation whose builder runs the phases with /bin/bash (builds run
# with the sandbox off), with each input's bin/ on PATH. `llama-inference` is this checkout's virtual
# environment, standing in for the package of nix/llama-server.nix.
{ venv }:
let
  fakeHash = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
  binPath = inputs: builtins.concatStringsSep ":" (map (i: "${i}/bin") inputs);
  mkDerivation = attrs:
    let
      name = attrs.name or "${attrs.pname}-${attrs.version}";
      env = removeAttrs attrs [ "nativeBuildInputs" "passthru" "meta" "name" "pname" "version" ];
      drv = derivation (env // {
        inherit name;
        system = builtins.currentSystem;
        builder = "/bin/bash";
        args = [ "-euo" "pipefail" "-c" ''
          export PATH="${binPath (attrs.nativeBuildInputs or [ ])}:/usr/bin:/bin"
          runHook() { :; }
          eval "$buildPhase"
          eval "$installPhase"
        '' ];
      });
    in
    drv // (attrs.passthru or { }) // { meta = attrs.meta or { }; };
in
{
  lib = {
    inherit fakeHash;
    escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";
    fetchers.proxyImpureEnvVars = [ "http_proxy" "https_proxy" "ftp_proxy" "all_proxy" "no_proxy" ];
    platforms.all = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
    concatStringsSep = builtins.concatStringsSep;
    licenses.mit = "MIT";
  };
  stdenvNoCC = { inherit mkDerivation; };
  # The host's CA bundle where nixpkgs' cacert puts it.
  cacert = mkDerivation {
    name = "cacert-stand-in";
    buildPhase = ''
      mkdir -p "$out/etc/ssl/certs"
      cp /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/ca-bundle.crt"
    '';
    installPhase = "true";
  };
  llama-inference = venv;
}
