"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``): what Claude Code and the anthropic
SDK speak, on the same serving core as every other route."""
