"""Progress over counted work: a tqdm bar on a terminal, one log line per 10% when output is
redirected (no bar frames), nothing when disabled. Training steps
(:class:`search.callbacks.Progress`) and the dev passes of a selection method both show it."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

logger = logging.getLogger("spt")


class WorkProgress:
    """Counts ``total`` units of work (``unit``, ``units``: what one and several are) from
    ``initial`` (a resumed job), shows how far it got and the seconds ``clock`` gives (default:
    since this display began); ``advance(text)`` after each unit, ``close()`` (or a ``with``
    block) at the end. ``text`` may be a function: it is called only when the text is shown
    (it may read values from a device)."""

    def __init__(self, total: int, desc: str, unit: str = "pass", units: str = "passes", enabled: bool = True,
                 initial: int = 0, clock: Callable[[], float] | None = None) -> None:
        self.total, self.desc, self.units, self.enabled = max(1, total), desc, units, enabled
        self.done, self.start = initial, time.perf_counter()
        self.clock = clock or (lambda: time.perf_counter() - self.start)
        self.next_line = (initial * 10 // self.total + 1) * self.total / 10
        self.bar = tqdm(total=self.total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True) \
            if enabled and sys.stderr.isatty() else None

    @property
    def seconds(self) -> float:
        return self.clock()

    def advance(self, text: str | Callable[[], str] = "", shown: bool = True) -> None:
        """One more unit done; ``shown``: whether a bar refreshes its text at this unit."""
        self.done += 1
        if not self.enabled:
            return
        words = text if callable(text) else (lambda: text)
        if self.bar is not None:
            if shown:
                self.bar.set_postfix_str(words(), refresh=False)
            self.bar.update(1)
        elif self.done >= self.next_line or self.done == self.total:
            while self.next_line <= self.done:
                self.next_line += self.total / 10
            logger.info("%s %3.0f%% (%d/%d %s, %.0fs) %s", self.desc, 100 * self.done / self.total, self.done,
                        self.total, self.units, self.seconds, words())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> WorkProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
