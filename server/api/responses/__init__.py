"""OpenAI's Responses API (``/v1/responses``), stateless: what Codex CLI and the openai SDK's ``responses`` speak,
on the same serving core as every other route."""
