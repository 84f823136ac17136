"""Structured output: JSON Schema and ``json_object`` requests turned into GBNF grammars for llama.cpp.

The conversion is llama-cpp-python's port of llama.cpp's ``json-schema-to-grammar``. It silently ignores the
keywords it does not implement, which would let output through that does not validate; so every schema is
walked first and a keyword the grammar cannot enforce is refused, by name.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp import llama_grammar

# Keywords the converter enforces.
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "format",
    "minLength", "maxLength",
})
# Keywords that only annotate: they constrain nothing, so they are accepted and ignored.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "readOnly", "writeOnly",
    "deprecated", "strict", "name",
})
TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})

# JSON strings may not hold raw control characters (json.loads and pydantic refuse them); the converter's own
# ``char`` rule lets them through, so it is replaced with this one.
CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'

# Any JSON object (``response_format: {"type": "json_object"}``), whitespace bounded so a small model cannot
# loop on newlines.
JSON_OBJECT_GRAMMAR = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"""


# llama.cpp parses a grammar recursively, one level per group: about 20000 nested groups overflow its stack and
# kill the process, so nesting is bounded (5000 measured safe), and so are the counts the converter turns into
# nested groups (``maxLength: N`` nests N deep).
MAX_GROUP_DEPTH = 2000
MAX_COUNT = 1000
# What a schema may ask of the converter, so that converting it is bounded (it runs in Python, holding the GIL):
# how deep it nests, how many alternatives one keyword lists, and how large a ``pattern`` may grow once its
# quantifiers are written out (the converter spells ``a{1000}`` as a thousand ``a``, and repeats a whole run of
# literal characters for a count after it), alone and summed over the schema's patterns. Nested counts are
# multiplied, an over-estimate (the converter makes sub-rules of groups) that refuses a few odd patterns a grammar
# could serve rather than let a large one through. Past these a schema is refused by name, in well under a
# millisecond.
MAX_SCHEMA_DEPTH = 64
MAX_ALTERNATIVES = 256
MAX_PATTERN_CHARS = 4096
MAX_PATTERN_ELEMENTS = 10_000
# The largest grammar llama.cpp is handed, raw (``/generate``'s ``grammar``) or converted from a schema.
MAX_GRAMMAR_BYTES = 256 * 2**10


class GrammarError(ValueError):
    """A GBNF grammar this server refuses before llama.cpp sees it."""


def check_depth(grammar: str) -> None:
    """Refuse a grammar larger than :data:`MAX_GRAMMAR_BYTES`, or whose groups nest deeper than
    :data:`MAX_GROUP_DEPTH` (literals, character classes and comments skipped)."""
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar has {len(grammar)} characters; at most {MAX_GRAMMAR_BYTES} are allowed")
    depth = deepest = 0
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif c == "#":
            while i < n and grammar[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    if deepest > MAX_GROUP_DEPTH:
        raise GrammarError(f"the grammar nests groups {deepest} deep; at most {MAX_GROUP_DEPTH} are allowed")


class SchemaError(ValueError):
    """A JSON Schema this server cannot turn into a grammar; ``keyword`` names the reason."""

    def __init__(self, message: str, keyword: str | None = None) -> None:
        super().__init__(message)
        self.keyword = keyword


class _PatternSize:
    """An upper bound on the grammar elements the converter writes for a regular expression, found in one pass
    over it: a literal or class is one, a sequence or an alternation the sum of its parts, a counted repeat its
    part times the count. Raises :class:`SchemaError` as soon as a count or the total passes its limit."""

    def __init__(self, pattern: str, path: str) -> None:
        self.text, self.path, self.pos = pattern, path, 0

    def refuse(self, why: str) -> SchemaError:
        return SchemaError(f"'pattern' at {self.path} {why}", keyword="pattern")

    def check(self, size: int) -> int:
        if size > MAX_PATTERN_ELEMENTS:
            raise self.refuse(f"expands to more than {MAX_PATTERN_ELEMENTS} grammar elements once its repeats are "
                              "written out")
        return size

    def alternatives(self, depth: int) -> int:
        if depth > MAX_SCHEMA_DEPTH:
            raise self.refuse(f"nests groups more than {MAX_SCHEMA_DEPTH} deep")
        total = sequence = run = 0
        while self.pos < len(self.text) and self.text[self.pos] != ")":
            if self.text[self.pos] == "|":
                total, sequence, run = total + sequence, 0, 0
                self.pos += 1
                continue
            literal = self.text[self.pos] not in "([."
            size = self.atom(depth)
            # The converter joins a run of literal characters into one literal and repeats the whole run for a
            # count after it ('\\.' * 2000 + '{1000}' became 4 MB): a count multiplies the run, not one atom.
            run = run + size if literal else 0
            before = self.pos
            repeated = self.repeated(run if literal else size)
            if self.pos == before:  # no count: the atom alone
                repeated = size
            sequence = self.check(sequence + repeated)
        return self.check(total + sequence)

    def atom(self, depth: int) -> int:
        text, c = self.text, self.text[self.pos]
        self.pos += 1
        if c == "(":
            if text.startswith("?", self.pos):  # (?:...), (?P<name>...): the group's own syntax
                while self.pos < len(text) and text[self.pos] not in ":>)":
                    self.pos += 1
                self.pos += text.startswith((":", ">"), self.pos)
            size = self.alternatives(depth + 1)
            self.pos += 1  # ")" (an unclosed group is the converter's to report)
            return size
        if c == "[":
            self.pos += text.startswith("^", self.pos)
            self.pos += text.startswith("]", self.pos)
            while self.pos < len(text) and text[self.pos] != "]":
                self.pos += 2 if text[self.pos] == "\\" else 1
            self.pos += 1
            return 1
        if c == "\\":
            self.pos += 1
            return 1
        return 0 if c in "^$" else 1

    def repeated(self, size: int) -> int:
        text = self.text
        if self.pos >= len(text):
            return size
        c = text[self.pos]
        if c in "*+?":
            self.pos += 1
            count = 2
        elif c == "{" and (close := text.find("}", self.pos)) > 0 and _is_count(text[self.pos + 1:close]):
            numbers = [int(n) for n in text[self.pos + 1:close].split(",") if n.strip()]
            if max(numbers) > MAX_COUNT:
                raise self.refuse(f"repeats {max(numbers)} times; at most {MAX_COUNT} are allowed")
            self.pos = close + 1
            count = max(numbers) + 1
        else:
            return size
        self.pos += text.startswith("?", self.pos)  # lazy: the same elements
        return self.check(size * count)


def _is_count(inside: str) -> bool:
    """``m``, ``m,`` or ``m,n`` (what makes ``{...}`` a quantifier rather than literal braces)."""
    low, _, high = inside.partition(",")
    low, high = low.strip(), high.strip()
    return _digits(low) and (not high or _digits(high))


def _digits(text: str) -> bool:
    return text.isascii() and text.isdecimal()  # '²' is a digit to str.isdigit, and int() refuses it


def check_pattern(pattern: object, path: str) -> int:
    """Refuse a ``pattern`` whose grammar would be too large to build, before the converter builds it."""
    if not isinstance(pattern, str):
        raise SchemaError(f"'pattern' at {path} must be a string", keyword="pattern")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SchemaError(f"'pattern' at {path} has {len(pattern)} characters; at most {MAX_PATTERN_CHARS} are "
                          "allowed", keyword="pattern")
    size = _PatternSize(pattern, path)
    total = 0
    while size.pos < len(pattern):  # a stray ")" is the converter's to report: step over it
        total = size.check(total + size.alternatives(0))
        size.pos += 1
    return total


def _check(schema: Any, path: str, depth: int = 0, patterns: list[int] | None = None) -> None:
    """Refuse what the converter cannot enforce or would make too large; ``patterns`` sums the patterns'
    expansions over the whole schema (twenty patterns each under the limit still build megabytes)."""
    patterns = [0] if patterns is None else patterns
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(f"the schema nests more than {MAX_SCHEMA_DEPTH} levels deep (at {path})", keyword="depth")
    if isinstance(schema, bool):
        if schema:
            return
        raise SchemaError(f"the schema at {path} is false: nothing can match it", keyword="false")
    if not isinstance(schema, dict):
        raise SchemaError(f"the schema at {path} must be an object, not {type(schema).__name__}")
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            raise SchemaError(
                f"JSON Schema keyword '{key}' (at {path}) is not supported for structured output: the grammar "
                f"cannot enforce it", keyword=key)
        if key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise SchemaError(f"'{key}' at {path} must be an object", keyword=key)
            if len(value) > MAX_ALTERNATIVES:
                raise SchemaError(f"'{key}' at {path} has {len(value)} entries; at most {MAX_ALTERNATIVES} are "
                                  "allowed", keyword=key)
            for name, sub in value.items():
                _check(sub, f"{path}/{key}/{name}", depth + 1, patterns)
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise SchemaError(f"'{key}' at {path} must be a non-empty array", keyword=key)
            if len(value) > MAX_ALTERNATIVES:
                raise SchemaError(f"'{key}' at {path} has {len(value)} entries; at most {MAX_ALTERNATIVES} are "
                                  "allowed", keyword=key)
            for i, sub in enumerate(value):
                _check(sub, f"{path}/{key}/{i}", depth + 1, patterns)
        elif key == "items":
            for i, sub in enumerate(value if isinstance(value, list) else [value]):
                _check(sub, f"{path}/items" + (f"/{i}" if isinstance(value, list) else ""), depth + 1, patterns)
        elif key == "additionalProperties" and not isinstance(value, bool):
            _check(value, f"{path}/additionalProperties", depth + 1, patterns)
        elif key == "pattern":
            patterns[0] += check_pattern(value, path)
            if patterns[0] > MAX_PATTERN_ELEMENTS:
                raise SchemaError(f"the schema's patterns expand to more than {MAX_PATTERN_ELEMENTS} grammar "
                                  f"elements together (at {path})", keyword="pattern")
        elif key == "type":
            types = value if isinstance(value, list) else [value]
            unknown = [t for t in types if t not in TYPES]
            if unknown:
                raise SchemaError(f"unknown type {unknown[0]!r} at {path}", keyword="type")
        elif key == "format" and value not in FORMATS:
            raise SchemaError(
                f"format '{value}' (at {path}) is not supported for structured output; supported: "
                f"{', '.join(sorted(FORMATS))}", keyword="format")
        elif key == "required" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise SchemaError(f"'required' at {path} must be an array of property names", keyword=key)
        elif key in ("enum", "prefixItems") and not isinstance(value, list):
            raise SchemaError(f"'{key}' at {path} must be an array", keyword=key)
        elif key == "enum" and len(value) > MAX_ALTERNATIVES:
            raise SchemaError(f"'enum' at {path} has {len(value)} values; at most {MAX_ALTERNATIVES} are allowed",
                              keyword=key)
        elif key == "$ref" and not (isinstance(value, str) and value.startswith("#/")):
            raise SchemaError(f"only local references ('#/...') are supported, not {value!r} (at {path})",
                              keyword="$ref")
        elif key in ("minItems", "maxItems", "minLength", "maxLength") and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT):
            raise SchemaError(f"'{key}' at {path} must be an integer from 0 to {MAX_COUNT}", keyword=key)
    for low, high in (("minItems", "maxItems"), ("minLength", "maxLength")):
        if low in schema and high in schema and schema[low] > schema[high]:
            raise SchemaError(f"'{low}' is above '{high}' at {path}: nothing can match", keyword=low)
    for key in ("enum", "type"):
        if schema.get(key) == []:
            raise SchemaError(f"'{key}' at {path} is empty: nothing can match", keyword=key)
    if "oneOf" in schema and "anyOf" in schema:
        raise SchemaError(f"'oneOf' and 'anyOf' together (at {path}) are not supported", keyword="oneOf")


def schema_to_grammar(schema: Any) -> str:
    """The GBNF grammar of a JSON Schema; :class:`SchemaError` names what cannot be enforced."""
    _check(schema, "#")
    if schema is True or schema == {}:
        return JSON_VALUE_GRAMMAR
    try:
        grammar = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter reports bad input with assertions and whatever it trips on
        raise SchemaError(f"the schema cannot be turned into a grammar: {exc}") from exc
    grammar = re.sub(r"(?m)^char ::= .*$", lambda _: CHAR_RULE, grammar)
    try:
        check_depth(grammar)
    except GrammarError as exc:
        raise SchemaError(f"the schema nests too deep for a grammar: {exc}") from exc
    return grammar


JSON_VALUE_GRAMMAR = JSON_OBJECT_GRAMMAR.replace("root   ::= object", "root   ::= value")
