"""Progress of a long decode on stderr: a tqdm bar on a terminal, else a plain line every ~10%
(no carriage returns, so logs and CI output stay readable)."""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Counts ``total`` steps.

    Args:
        total: steps expected.
        desc: what is counted, e.g. "prepare train (generic)".
        enabled: True shows progress, False never, None only when ``stream`` is a terminal.
        stream: where it goes (default: ``sys.stderr`` at construction).
    """

    def __init__(self, total: int, desc: str, enabled: bool | None = None, stream: TextIO | None = None):
        self.total, self.desc, self.done = max(int(total), 0), desc, 0
        self.stream = stream if stream is not None else sys.stderr
        try:
            tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            tty = False
        self.enabled = (tty if enabled is None else bool(enabled)) and self.total > 0
        self._bar = None
        self._next_tenth = 1
        if self.enabled and tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit="img", file=self.stream, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        tenth = self.done * 10 // self.total
        if tenth >= self._next_tenth:
            self._next_tenth = tenth + 1
            print(f"{self.desc}: {self.done}/{self.total} ({100 * self.done // self.total}%)",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
