"""Seconds spent per named step of a scoring, kept with every result."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


class StepTiming(Protocol):
    """Anything with ``step(name)`` as a context manager (:class:`StepTimer`)."""

    def step(self, name: str) -> contextlib.AbstractContextManager[None]: ...


@dataclass
class StepTimer:
    """Seconds spent in each named step, in order; a step run twice adds up."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


class NoTiming:
    """Steps that are not timed."""

    def step(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()
