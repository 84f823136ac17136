"""Ollama's native API (``/api/*``): what Open WebUI, Zed, Continue, aider (through LiteLLM) and ``codex --oss``
speak to a local server, on the same serving core as every other route."""
