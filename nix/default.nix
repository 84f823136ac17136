# The Nix entry point: `nix-build nix -A llama-server` (the server, command `llama-inference`),
# `nix-build nix -A llama-model` (LLaMA 2 7B as Q4_K_M; see llama-model.nix for HF_TOKEN and the first-build hash),
# and `nix-build nix -A vllm-router` (vLLM's router, the pinned PyPI wheel: the router pod's, k8s/overlays/vllm-router).
#
# nixpkgs is pinned by revision and hash (nixos-25.11 as of 2026-05-10): every dependency, the compiler included,
# is the one this revision had, and a changed tarball fails the hash instead of building something else. Move
# the pin by changing both: the hash is the NAR hash of the unpacked tree, which
# `nix-prefetch-url --unpack <url>` prints (or `nix flake prefetch github:NixOS/nixpkgs/<rev>`).
# `pkgs` can be passed to build against another package set: `nix-build nix --arg pkgs 'import <nixpkgs> { }'`.
{ pkgs ? import
    (builtins.fetchTarball {
      url = "https://github.com/NixOS/nixpkgs/archive/8fd9daa3db09ced9700431c5b7ad0e8ba199b575.tar.gz";
      sha256 = "1i4bkzy1siavmxaskp49lgi9s02gam6crb0d0abbbjmsyl39jbsf";
    })
    { }
}:

let
  llama-server = pkgs.callPackage ./llama-server.nix { };
in
{
  inherit llama-server;
  llama-model = pkgs.callPackage ./llama-model.nix { llama-inference = llama-server; };
  vllm-router = pkgs.callPackage ./vllm-router.nix { };
}
