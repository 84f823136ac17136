"""Logging set-up: plain text for people, JSON lines for log collectors."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from server.engine.llama import native_log, route_native_logs

# What a message may not hold in a plain-text log: line breaks and other control characters (a client's text
# in a message would otherwise forge log lines), and lone surrogates (unencodable).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


class TextFormatter(logging.Formatter):
    """One line per record: the message's control characters escaped (a traceback still follows on its own
    lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = _escape(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ensure_ascii=False keeps text readable; a lone surrogate is written as its escape, never fails.
        return json.dumps(entry, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace").decode()


def configure_logging(level: str = "info", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # llama.cpp's own log lines (model loading details) only when debugging; its warnings always.
    route_native_logs()
    native_log.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
