"""Progress over counted work that is not a training loop (the dev passes of a selection
method): a tqdm bar on a terminal, one log line per 10% when output is redirected, nothing
when disabled. Training steps have their own callback (:class:`search.callbacks.Progress`)."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

logger = logging.getLogger("spt")


class WorkProgress:
    """Counts ``total`` units of work (``unit``, ``units``: what one and several are), shows how far it got and the
    time spent; ``advance(text)`` after each unit, ``close()`` (or a ``with`` block) at the end."""

    def __init__(self, total: int, desc: str, unit: str = "pass", units: str = "passes", enabled: bool = True) -> None:
        self.total, self.desc, self.units, self.enabled = max(1, total), desc, units, enabled
        self.done, self.start = 0, time.perf_counter()
        self.next_line = self.total / 10
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True, leave=True) \
            if enabled and sys.stderr.isatty() else None

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def advance(self, text: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.done >= self.next_line or self.done == self.total:
            while self.next_line <= self.done:
                self.next_line += self.total / 10
            logger.info("%s %3.0f%% (%d/%d %s, %.0fs) %s", self.desc, 100 * self.done / self.total, self.done,
                        self.total, self.units, self.seconds, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> WorkProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
