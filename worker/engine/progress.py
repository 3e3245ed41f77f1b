"""How the engine reports progress to its caller and learns that it should stop.

Every long engine call takes ``progress: ProgressCallback | None`` and
``should_cancel: CancelCheck | None``. Events are throttled by the engine (see
:class:`Throttle`), except stage starts and ends, checkpoints and previews, which always go out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from worker.engine.errors import Cancelled


@dataclass
class Progress:
    """One progress event.

    ``stage`` is one of ``preparing``, ``priors``, ``training``, ``sampling``, ``scoring``.
    ``step``/``total`` count work units of that stage (prior images, optimizer steps, images).
    """

    stage: str
    step: int
    total: int
    loss: float | None = None
    elapsed: float = 0.0
    eta_seconds: float | None = None
    message: str = ""
    previews: list[Path] = field(default_factory=list)
    checkpoint: Path | None = None  # set when a complete checkpoint was just written
    reused: int | None = None  # priors stage: how many bank images were already there

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.step / self.total)


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


class Throttle:
    """Forwards events to ``callback`` at most every ``interval`` seconds.

    Events flagged ``force`` (stage boundaries, checkpoints, previews, the last step) always go
    out, so a caller never misses a state change while the chatter stays cheap.
    """

    def __init__(self, callback: ProgressCallback | None, interval: float = 0.5) -> None:
        self.callback = callback
        self.interval = interval
        self._last = 0.0

    def __call__(self, event: Progress, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if force or event.step >= event.total or now - self._last >= self.interval:
            self._last = now
            self.callback(event)


def check_cancel(should_cancel: CancelCheck | None) -> None:
    """Raise :class:`Cancelled` when the caller asked to stop."""
    if should_cancel is not None and should_cancel():
        raise Cancelled("cancelled by the caller")


def eta(started: float, done: int, total: int) -> tuple[float, float | None]:
    """Elapsed seconds since ``started`` and the seconds left at the current rate."""
    elapsed = time.monotonic() - started
    if done <= 0:
        return elapsed, None
    return elapsed, elapsed / done * max(0, total - done)
