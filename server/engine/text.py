"""Turning sampled tokens into text: incremental UTF-8 decoding and stop strings."""

from __future__ import annotations

import codecs


class TextStream:
    """Feeds token bytes in, gives text deltas out.

    A multi-byte character split across tokens is held until it is complete, and text that could be the
    start of a stop string is held until it is known not to be one, so no delta ever has to be taken back.
    """

    def __init__(self, stop: list[str] | tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.text = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; returns the text that may be sent now (maybe empty)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        cut = self._first_stop()
        if cut is not None:
            delta, self._pending, self.stopped = self._pending[:cut], "", True
        else:
            keep = self._partial_stop_len()
            split = len(self._pending) - keep
            delta, self._pending = self._pending[:split], self._pending[split:]
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever was held back."""
        if self.stopped:
            return ""
        delta = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        self.text += delta
        return delta

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best
