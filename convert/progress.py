"""Progress that suits where the output goes: a live bar on a terminal, a few plain lines in a log file or CI."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

Advance = Callable[[int, str], None]


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


class Progress:
    """``mode``: "bar" (a live tqdm bar), "lines" (a line at each quarter), "off"; "auto" picks the bar on a
    TTY and lines elsewhere, so a log never fills with hundreds of redrawn frames."""

    def __init__(self, stream: TextIO | None = None, mode: str = "auto") -> None:
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode

    @classmethod
    def silent(cls) -> Progress:
        return cls(mode="off")

    @contextmanager
    def task(self, desc: str, total: int) -> Iterator[Advance]:
        """Yields ``advance(nbytes, label)``, to call as each piece of ``total`` bytes is done."""
        if self.mode == "bar":
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=self.stream) as bar:
                def advance_bar(n: int, label: str) -> None:
                    bar.set_postfix_str(label, refresh=False)
                    bar.update(n)
                yield advance_bar
            return
        if self.mode == "off":
            yield lambda n, label: None
            return
        start, done, next_quarter = time.perf_counter(), 0, 1

        def advance_lines(n: int, label: str) -> None:
            nonlocal done, next_quarter
            done += n
            while next_quarter <= 4 and done * 4 >= total * next_quarter:
                elapsed = time.perf_counter() - start
                print(f"{desc}: {25 * next_quarter}% ({_mb(done)} of {_mb(total)}, {elapsed:.1f} s)",
                      file=self.stream, flush=True)
                next_quarter += 1

        yield advance_lines
