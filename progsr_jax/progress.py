"""Progress of long work: tqdm's bar on a terminal, plain lines everywhere else.

Where stderr is not a terminal (``nohup``, ``> train.log``, a scheduler's log
file) a redrawn bar is a stream of carriage returns on a few physical lines
that ``grep`` and ``less`` cannot use.  :func:`bar` then gives a
:class:`PlainProgress`, which prints whole lines::

    [12:03:41] decoding images 4096/162770 (3%), 512.0 img/s, 5:10 left

every ``every`` items when given (training: its log cadence), otherwise at
most every ``seconds``, and always at the end.  Every command and the data
pipeline take their progress from here.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class PlainProgress:
    """The line-printing stand-in for a tqdm bar (``update``, ``set_postfix``, ``close``)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it",
                 every: int | None = None, seconds: float = 30.0, file=None):
        self.total, self.n = int(total), int(initial)
        self.desc, self.unit = desc, unit
        self.every = max(1, int(every)) if every else None
        self.seconds = float(seconds)
        self.file = file or sys.stderr
        self.postfix: dict = {}
        self._t0 = self._last = time.time()
        self._n0 = self._printed = int(initial)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if self.every is not None:
            due = self.n % self.every == 0
        else:
            due = now - self._last >= self.seconds
        if due or self.n == self.total:
            self._line(now)

    def _line(self, now: float) -> None:
        rate = (self.n - self._n0) / max(now - self._t0, 1e-9)
        left = (self.total - self.n) / rate if rate > 0 else 0.0
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"[{time.strftime('%H:%M:%S')}] {self.desc} {self.n}/{self.total} "
              f"({100 * self.n / max(self.total, 1):.0f}%), {rate:.2f} {self.unit}/s, "
              f"{int(left) // 60}:{int(left) % 60:02d} left,{extra}".rstrip(","),
              file=self.file, flush=True)
        self._last, self._printed = now, self.n

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        """Prints the last count if work stopped between two lines (not at the end)."""
        if self.every is None and self.n != self._printed and self.n > self._n0:
            self._line(time.time())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bar(total: int, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
        every: int | None = None, file=None):
    """A progress bar over ``total`` items: tqdm on a terminal, :class:`PlainProgress` elsewhere.

    ``every``: plain lines every that many items (default: at most every 30 s).
    ``disable``: a bar that shows nothing.
    """
    file = file or sys.stderr
    if not disable and not _is_terminal(file):
        return PlainProgress(total, initial, desc, unit, every, file=file)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                mininterval=1.0, file=file, disable=disable)


def track(items: Iterable[T], total: int, desc: str, unit: str = "it",
          disable: bool = False) -> Iterator[T]:
    """``items`` with a :func:`bar` advanced after each one."""
    with bar(total, desc, unit, disable=disable) as b:
        for item in items:
            yield item
            b.update(1)


def _is_terminal(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False
