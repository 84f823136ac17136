"""The frameworks people build on, pointed at this server: one turn of the ``openai-agents`` SDK with a function
tool (over the Responses API, its default, and over chat completions), and ``litellm`` speaking Ollama's chat and
Anthropic's Messages to it. A 135M model's words are not asserted: the tool call, its arguments and the answers'
shapes are."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LiveServer, start_server, stop_server

KEY = "sk-agent-clients-test-3b8e1f07"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("agents"), "--parallel", "2", "--n-threads", "1",
                        env={"API_KEY": KEY})
    yield live
    stop_server(live)


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_an_agent_calls_its_function_tool(server: LiveServer, api: str) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # its traces go to OpenAI's servers by default
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 degrees in {city}."

    async def one_turn() -> object:
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as client:
            model = (OpenAIResponsesModel(model="m", openai_client=client) if api == "responses" else
                     OpenAIChatCompletionsModel(model="m", openai_client=client))
            agent = Agent(name="weather", instructions="You answer questions about the weather with the get_weather "
                          "tool.", tools=[get_weather], model=model,
                          # The call is forced (a 135M model often answers in words), and its result is the answer.
                          model_settings=ModelSettings(tool_choice="required", max_tokens=64, temperature=0),
                          tool_use_behavior="stop_on_first_tool")
            return await Runner.run(agent, "What is the weather like in Paris today?", max_turns=2)

    result = asyncio.run(one_turn())
    assert len(calls) == 1 and isinstance(calls[0], str), calls  # called once, its argument parsed (the model's words)
    assert result.final_output == f"It is sunny and 21 degrees in {calls[0]}."  # type: ignore[attr-defined]


def test_litellm_speaks_ollama_chat_and_anthropic_to_the_server(server: LiveServer, tmp_path: Path) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # it would fetch its price list from GitHub
    import litellm

    ask = [{"role": "user", "content": "What is the capital of France?"}]
    ollama = litellm.completion(model="ollama_chat/smollm2", api_base=server.url, messages=ask, max_tokens=12,
                                temperature=0, api_key=KEY, headers={"Authorization": f"Bearer {KEY}"})
    assert ollama.choices[0].message.content  # type: ignore[union-attr]
    assert ollama.usage.prompt_tokens > 5 and 1 <= ollama.usage.completion_tokens <= 12  # type: ignore[attr-defined]
    anthropic = litellm.completion(model="anthropic/claude-sonnet-4-5", api_base=server.url, api_key=KEY,
                                   messages=ask, max_tokens=12, temperature=0)
    assert anthropic.choices[0].message.content  # type: ignore[union-attr]
    assert anthropic.usage.prompt_tokens > 5 and 1 <= anthropic.usage.completion_tokens <= 12  # type: ignore[attr-defined]
    # The same question through both dialects reaches the same prompt: the same chat template, the same tokens.
    assert ollama.usage.prompt_tokens == anthropic.usage.prompt_tokens, json.dumps(  # type: ignore[attr-defined]
        [ollama.usage.model_dump(), anthropic.usage.model_dump()])  # type: ignore[attr-defined]
