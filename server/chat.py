"""Chat prompts: the model's own chat template (GGUF ``tokenizer.chat_template``, Jinja), rendered and tokenized.

The rendered prompt is tokenized with special-token parsing, so the template's markers (``<|im_start|>``,
``[INST]``...) become control tokens. Text that users send is never parsed that way: if a message holds the
text of a control token, the prompt is tokenized piece by piece, with the messages as plain text.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Namespace, markup_join
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.engine.llama import LlamaModel


class ChatTemplateError(ValueError):
    """The template could not be rendered for these messages (the template says why)."""


class TemplateBudgetExceeded(ChatTemplateError):
    """The template passed its budget (operations, time, or the size of what it builds) while rendering."""


class _TemplateTimedOut(TemplateBudgetExceeded):
    """Raised in the rendering thread at its deadline (made without arguments there)."""

    def __init__(self, message: str = "the chat template took longer than its time budget allows") -> None:
        super().__init__(message)


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


# A template comes with the model (or CHAT_TEMPLATE), and runs on every chat request: sandboxed, it cannot reach
# the host, but unbounded it could loop for hours (nested ranges) or build a 100 GB string ('a' * 10**11) on a
# worker thread while /health stays 200. So each render has a budget: operations (calls, lookups, loop steps,
# filters), a wall-clock deadline, and a cap on any string or list it builds and on its output.
MAX_TEMPLATE_OPS = 2_000_000
MAX_TEMPLATE_SECONDS = 5.0
MAX_EXPONENT = 64


class _Budget:
    def __init__(self, max_chars: int, ops: int = MAX_TEMPLATE_OPS, seconds: float = MAX_TEMPLATE_SECONDS) -> None:
        self.max_chars, self.ops_left, self.deadline = max_chars, ops, time.monotonic() + seconds

    def tick(self, n: int = 1) -> None:
        self.ops_left -= n
        if self.ops_left < 0:
            raise TemplateBudgetExceeded("the chat template took more operations than its budget allows")
        if self.ops_left % 1024 < n and time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded("the chat template took longer than its time budget allows")

    def size(self, value: Any) -> Any:
        """``value``, when it is within the size cap."""
        if isinstance(value, str | list | tuple | bytes):
            self.length(len(value))
        return value

    def length(self, n: int) -> None:
        """Refuse to build a value of ``n`` items past the cap."""
        if n > self.max_chars:
            raise TemplateBudgetExceeded(f"the chat template built a value of {n} items; at most {self.max_chars} "
                                         "are allowed")

    def count(self, value: Any) -> None:
        """Refuse a number that would build something past the cap (a width, a repeat count)."""
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.max_chars:
            raise TemplateBudgetExceeded(f"the chat template asked for {value}; at most {self.max_chars}")


# The widths and precisions of printf-style conversions ("%8000000000s", "%.900000f"); a linear pattern.
_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d{0,30})(?:\.(\d{1,30}))?")


class _BudgetedCodeGenerator(CodeGenerator):
    """Jinja's code generator, but ``a ~ b`` joins through the environment, which checks the result's size
    before building it (``{% set s = s ~ s %}`` forty times would otherwise build 2**40 characters)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            markup = "context.eval_ctx.autoescape"
        else:
            markup = "True" if frame.eval_ctx.autoescape else "False"
        self.write("environment.join_budgeted((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(f"), {markup})")


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every hook it offers (binary operators, calls, lookups, filters, ``range``,
    ``namespace`` assignments, ``~``) charged to the budget of the render in progress on this thread."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BudgetedCodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._local = threading.local()
        self.globals["range"] = self._range
        self.globals["namespace"] = self._namespace
        self.filters = {name: self._budgeted(f) for name, f in self.filters.items()}

    def join_budgeted(self, values: tuple[Any, ...], markup: bool) -> str:
        """``a ~ b``: its length checked before it is built (escaped as Jinja does under autoescape)."""
        self.budget().length(sum(len(str(v)) for v in values))
        return markup_join(values) if markup else "".join(str(v) for v in values)

    def _namespace(self, *args: Any, **kwargs: Any) -> Namespace:
        return _BudgetedNamespace(self, *args, **kwargs)

    def budget(self) -> _Budget:
        budget: _Budget | None = getattr(self._local, "budget", None)
        if budget is None:
            raise TemplateBudgetExceeded("the chat template was rendered outside a budget")
        return budget

    def rendering(self, budget: _Budget) -> _Rendering:
        return _Rendering(self._local, budget)

    def _range(self, *args: int) -> Iterator[int]:
        budget = self.budget()
        for a in args:
            budget.count(a)
        for i in range(*args):
            budget.tick()
            yield i

    def _budgeted(self, f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            budget = self.budget()
            budget.tick()
            for a in (*args, *kwargs.values()):
                budget.count(a)
            return budget.size(f(*args, **kwargs))
        return wrapper

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = self.budget()
        budget.tick()
        if operator == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise TemplateBudgetExceeded(f"the chat template raised a number to the power {right}")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    budget.length(len(seq) * max(times, 0))  # checked before it is built
        if operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            budget.length(len(left) + len(right))
        if operator == "%" and isinstance(left, str):  # "%*s" % (10**9, "") or "%8000000000s": widths build
            for a in right if isinstance(right, tuple) else (right,):
                budget.count(a)
            for match in _FORMAT_WIDTH.finditer(left):
                for number in match.groups():
                    if number:
                        budget.count(int(number))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = __self.budget()
        budget.tick()
        for a in (*args, *kwargs.values()):
            budget.count(a)
            budget.size(a)  # a macro called with a doubled string, and so on down a recursion
        return budget.size(super().call(__context, __obj, *args, **kwargs))

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.budget().tick()
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.budget().tick()
        return super().getattr(obj, attribute)


class _BudgetedNamespace(Namespace):
    """``namespace()``, whose assignments (``{% set ns.s = ns.s ~ ns.s %}`` in a loop) are charged to the budget."""

    def __init__(self, env: _BudgetedEnvironment, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_env", env)  # beside Namespace's own __attrs, out of the template's reach

    def __setitem__(self, name: str, value: Any) -> None:
        budget = object.__getattribute__(self, "_env").budget()
        budget.tick()
        super().__setitem__(name, budget.size(value))


class _Rendering:
    """``with env.rendering(budget):`` the renders on this thread are charged to ``budget``, and stopped at its
    deadline even where no hook runs (a loop with an empty body): a timer raises :class:`_TemplateTimedOut` in
    this thread (``PyThreadState_SetAsyncExc``, delivered at its next bytecode), while the render is still on."""

    def __init__(self, local: threading.local, budget: _Budget) -> None:
        self._local, self._budget = local, budget
        self._lock = threading.Lock()
        self._active = False
        self._timer: threading.Timer | None = None

    def _stop(self, thread_id: int) -> None:
        with self._lock:
            if self._active:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                                           ctypes.py_object(_TemplateTimedOut))

    def __enter__(self) -> _Budget:
        self._local.budget = self._budget
        self._active = True
        self._timer = threading.Timer(max(0.0, self._budget.deadline - time.monotonic()), self._stop,
                                      args=(threading.get_ident(),))
        self._timer.daemon = True
        self._timer.start()
        return self._budget

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._active = False
        if self._timer is not None:
            self._timer.cancel()
        self._local.budget = None


class _CountedList(list):  # type: ignore[type-arg]
    """A list whose every step of a template's loop over it is charged to the budget."""

    def __init__(self, items: Sequence[Any], budget: _Budget) -> None:
        super().__init__(items)
        self._budget = budget

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            self._budget.tick()
            yield item


# What a template is tried on when it is loaded: a hostile or broken one is refused then, not on a user's request.
CANARY_CONVERSATIONS: tuple[list[dict[str, Any]], ...] = (
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}],
)
CANARY_MAX_CHARS = 64 * 2**10
DEFAULT_MAX_CHARS = 16 * 2**20  # callers pass what a slot's context could hold


def load_template(setting: str | None, model: LlamaModel) -> str | None:
    """The template to use: the setting (a file path or the template text), else the model's own."""
    if setting:
        path = Path(setting)
        if len(setting) < 4096 and path.is_file():
            return path.read_text()
        return setting
    return model.info().chat_template


class ChatFormatter:
    def __init__(self, template: str, model: LlamaModel) -> None:
        env = _BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self._env = env
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(template)
            variables = jinja2.meta.find_undeclared_variables(env.parse(template))
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        # Templates written for tool calling read a ``tools`` variable; others get server/tools.py's format.
        self.accepts_tools = "tools" in variables
        self._model = model
        self.bos_text = model.token_to_piece(model.bos, special=True).decode("utf-8", "replace")
        self.eos_text = model.token_to_piece(model.eos, special=True).decode("utf-8", "replace")
        self._control_texts = model.control_token_texts()

    def check(self) -> None:
        """Render the canary conversations under a small budget: :class:`TemplateBudgetExceeded` for a template
        that loops or grows without bound. A template that refuses a canary itself (``raise_exception``: some
        reject a system message) is not at fault."""
        for messages in CANARY_CONVERSATIONS:
            try:
                self.render(messages, max_chars=CANARY_MAX_CHARS, ops=MAX_TEMPLATE_OPS // 10, seconds=1.0)
            except TemplateBudgetExceeded:
                raise
            except ChatTemplateError:
                continue

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, *, max_chars: int = DEFAULT_MAX_CHARS,
               ops: int = MAX_TEMPLATE_OPS,
               seconds: float = MAX_TEMPLATE_SECONDS) -> str:
        """The rendered prompt, at most ``max_chars`` long, within the template's budget."""
        budget = _Budget(max_chars, ops, seconds)
        extra = {"tools": _CountedList(tools, budget)} if tools else {}
        out: list[str] = []
        length = 0
        try:
            with self._env.rendering(budget):
                for piece in self._template.generate(
                    messages=_CountedList(messages, budget),
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_text,
                    eos_token=self.eos_text,
                    **extra,
                ):
                    budget.tick()
                    length += len(piece)
                    if length > max_chars:
                        raise TemplateBudgetExceeded(f"the rendered chat prompt passed {max_chars} characters")
                    out.append(piece)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, RecursionError, MemoryError) as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        return "".join(out)

    def tokenize(self, messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None = None, *,
                 max_chars: int = DEFAULT_MAX_CHARS) -> list[int]:
        """Tokens of the rendered prompt, with the template's markers as control tokens. A rendering longer than
        ``max_chars`` (more than a slot's context could hold) is refused before it is tokenized."""
        # Tool definitions and calls are rendered by the template itself, so they cannot be kept plain text
        # piece by piece like contents: control-token text in them is refused instead.
        others = json.dumps([[{k: v for k, v in m.items() if k != "content"} for m in messages], tools or []],
                            ensure_ascii=False)
        forged = next((text for text in self._control_texts if text in others), None)
        if forged is not None:
            raise ChatTemplateError(f"a tool definition or call holds the text of the control token {forged!r}")
        contents = [m.get("content") or "" for m in messages]
        if not any(text in content for content in contents for text in self._control_texts):
            rendered = self.render(messages, tools=tools, max_chars=max_chars)
            return self._drop_double_bos(self._model.tokenize(rendered, parse_special=True))
        return self._tokenize_pieces(messages, tools, max_chars)

    def _tokenize_pieces(self, messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None,
                         max_chars: int) -> list[int]:
        # Render with a unique marker in place of each message, then tokenize the template's text with
        # special-token parsing and each message as plain text. One pass: each marker is looked for from where
        # the previous one ended (slicing off the rest each time was quadratic in the number of messages).
        markers = [f"\x00msg-{uuid.uuid4().hex}-{i}\x00" for i in range(len(messages))]
        rendered = self.render([{**m, "content": marker} for m, marker in zip(messages, markers, strict=True)],
                               tools=tools, max_chars=max_chars + sum(len(m) for m in markers))
        tokens: list[int] = []
        pos = 0
        for message, marker in zip(messages, markers, strict=True):
            found = rendered.find(marker, pos)
            if found < 0:  # the template dropped or changed this message: fall back to plain text for it
                continue
            if found > pos:
                tokens += self._model.tokenize(rendered[pos:found], add_special=not tokens, parse_special=True)
            if message.get("content"):
                tokens += self._model.tokenize(message["content"], add_special=False, parse_special=False)
            pos = found + len(marker)
        if pos < len(rendered):
            tokens += self._model.tokenize(rendered[pos:], add_special=not tokens, parse_special=True)
        return self._drop_double_bos(tokens)

    def _drop_double_bos(self, tokens: list[int]) -> list[int]:
        # Templates that write the BOS text themselves, on a vocabulary that adds BOS too, would give two.
        if len(tokens) >= 2 and tokens[0] == tokens[1] == self._model.bos:
            return tokens[1:]
        return tokens
