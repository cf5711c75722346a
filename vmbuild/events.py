"""Progress as a stream of structured events (the ansible-runner model), not scraped text.

The library emits events; the CLI decides how to show them (human lines or JSON lines for
CI pipelines). Library code never prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    stage: str  # plan | base | packer | provision | artifact | validate | run | ...
    kind: str  # start | step | output | done | cached | warning | error
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Reporter = Callable[[Event], None]


def discard(_event: Event) -> None:
    """The reporter for callers that do not care about progress."""


class Stage:
    """Emit start/done events around a unit of work, with its duration."""

    def __init__(self, report: Reporter, stage: str, message: str) -> None:
        self.report = report
        self.stage = stage
        self.message = message
        self.started = 0.0

    def __enter__(self) -> Stage:
        self.started = time.monotonic()
        self.report(Event(self.stage, "start", self.message))
        return self

    def step(self, message: str, **data: Any) -> None:
        self.report(Event(self.stage, "step", message, data))

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            elapsed = time.monotonic() - self.started
            self.report(Event(self.stage, "done", f"{self.message}: done in {elapsed:.0f}s",
                              {"seconds": round(elapsed, 1)}))
