"""A chat template runs under a budget: hostile templates (from a GGUF or CHAT_TEMPLATE) are refused within
their time bound, on the model's real vocabulary, and the model's own template renders as before."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from server.chat import ChatFormatter, ChatTemplateError, TemplateBudgetExceeded
from server.engine.llama import LlamaModel
from server.model_files import embedded_model_path

HOSTILE = {
    "nested ranges": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "empty nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a list": "{% set l = range(50000)|list %}{% for a in l %}{% for b in l %}{% endfor %}"
                                "{% endfor %}",
    "string multiplication": "{{ 'a' * 100000000000 }}",
    "list multiplication": "{{ ([1] * 100000000000)|length }}",
    "a huge power": "{{ 9 ** 99999999 }}",
    "a width": "{{ '%*s' % (1000000000, 'x') }}",
    "a filter's width": "{{ 'x'|center(1000000000) }}",
    "doubling in a macro": "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}"
                           "{% endmacro %}{{ d('ab', 40) }}",
    "an output loop": "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "doubling by ~": "{% set s = 'ab' %}" + "{% set s = s ~ s %}" * 45 + "{{ s|length }}",
    "doubling by ~ under autoescape": "{% autoescape true %}{% set s = 'ab' %}" + "{% set s = s ~ s %}" * 45
                                      + "{{ s|length }}{% endautoescape %}",
    "a literal width": "{{ '%8000000000s' % '' }}",
    "a literal precision": "{{ '%.900000000f' % 1.5 }}",
    "doubling in a namespace": "{% set ns = namespace(s='ab') %}{% for i in range(45) %}{% set ns.s = ns.s ~ ns.s %}"
                               "{% endfor %}{{ ns.s|length }}",
}


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaModel]:
    m = LlamaModel(embedded_model_path())
    yield m
    m.close()


@pytest.mark.parametrize("template", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_template_is_refused_at_load_within_its_bound(model: LlamaModel, template: str) -> None:
    formatter = ChatFormatter(template, model)
    start = time.monotonic()
    with pytest.raises(TemplateBudgetExceeded):
        formatter.check()
    assert time.monotonic() - start < 2.5  # the canary's budget is 1 s per conversation


def test_the_models_own_template_passes_and_renders_as_before(model: LlamaModel) -> None:
    formatter = ChatFormatter(model.info().chat_template or "", model)
    formatter.check()
    rendered = formatter.render([{"role": "user", "content": "Hi"}])
    assert rendered.startswith("<|im_start|>") and rendered.endswith("<|im_start|>assistant\n")


def test_namespaces_and_joins_still_work(model: LlamaModel) -> None:
    template = ("{% set ns = namespace(n=0, text='') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{% set ns.text = ns.text ~ m['content'] ~ '|' %}{% endfor %}{{ ns.n }}:{{ ns.text }}")
    formatter = ChatFormatter(template, model)
    assert formatter.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "2:a|b|"


def test_a_template_that_refuses_a_canary_itself_is_not_at_fault(model: LlamaModel) -> None:
    strict = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
              "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    formatter = ChatFormatter(strict, model)
    formatter.check()
    with pytest.raises(ChatTemplateError, match="no system role"):
        formatter.render([{"role": "system", "content": "x"}])


def test_a_rendering_past_the_size_given_is_refused(model: LlamaModel) -> None:
    formatter = ChatFormatter(model.info().chat_template or "", model)
    messages = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(TemplateBudgetExceeded, match="5000"):
        formatter.render(messages, max_chars=5000)
    assert len(formatter.render(messages, max_chars=20_000)) > 10_000


def test_many_messages_render_and_tokenize_in_linear_time(model: LlamaModel) -> None:
    formatter = ChatFormatter(model.info().chat_template or "", model)
    # The control-token text sends it down the piece-by-piece path, once quadratic in the number of messages.
    messages = [{"role": "user", "content": "<|im_end|>" if i == 0 else "a"} for i in range(20_000)]
    start = time.monotonic()
    tokens = formatter.tokenize(messages)
    assert time.monotonic() - start < 5
    assert len(tokens) > 20_000 * 3
