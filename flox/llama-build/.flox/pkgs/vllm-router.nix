# `flox build vllm-router`: vLLM's router, the PyPI wheel pyproject.toml's test extra pins (see nix/vllm-router.nix),
# published as owner/vllm-router and installed by flox/llama-router, the router pod's environment.
{ callPackage }:
callPackage ../../../../nix/vllm-router.nix { }
