"""Incremental detokenization: split UTF-8 characters and stop strings across tokens."""

from __future__ import annotations

from server.engine.text import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.push(p) for p in pieces]


def test_multibyte_character_split_across_tokens_is_held_until_complete() -> None:
    stream = TextStream()
    euro = "€".encode()
    assert feed(stream, [b"a", euro[:1], euro[1:2], euro[2:], b"b"]) == ["a", "", "", "€", "b"]
    assert stream.flush() == "" and stream.text == "a€b"


def test_stop_string_across_tokens_is_never_sent() -> None:
    stream = TextStream(stop=["END"])
    deltas = feed(stream, [b"one E", b"N", b"D two"])
    assert "".join(deltas) == "one " and stream.stopped and stream.text == "one "


def test_false_start_of_a_stop_string_is_released() -> None:
    stream = TextStream(stop=["END"])
    assert feed(stream, [b"the E", b"ND"[:1], b"x"]) == ["the ", "", "ENx"]
    assert not stream.stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    stream = TextStream(stop=["world", "lo w"])
    assert stream.push(b"hello world") == "hel" and stream.stopped


def test_flush_releases_a_held_tail_and_a_broken_character() -> None:
    stream = TextStream(stop=["STOP"])
    assert stream.push(b"go ST") == "go "
    assert stream.flush() == "ST"
    broken = TextStream()
    assert broken.push(b"x\xe2\x82") == "x"
    assert broken.flush() == "\ufffd"


def test_fast_token_event_encoding_equals_sse_starlettes() -> None:
    from sse_starlette import ServerSentEvent

    from server.protocol import TokenChunk
    from server.routes.native import token_event

    for text in ["hi", " a\nb\r", 'é"\\', "<|im_end|>", "\u2028x", "\x00", "🎉"]:
        expected = ServerSentEvent(data=TokenChunk(text=text).model_dump_json(), event="token").encode()
        assert token_event(text) == expected
