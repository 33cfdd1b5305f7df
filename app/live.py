"""Live worklist updates: a cheap "has anything changed?" signature, watched once per process.

The worklist changes when a study arrives or gets instances, when it is queued, picked up,
scored, rejected or failed, or when a rescore is asked for. Every one of those writes a new
row (study, instance, job, result: their highest ids) or moves a job in or out of the active
states (pending, enqueued, running: their count and id sum per state). Both are answered by
primary-key and ``ix_jobs_state`` index lookups, so the signature costs the same at 100 or
100,000 studies, and no column has to be added to keep a "last changed" time.

One :class:`WorklistWatcher` per API process polls the signature once a second while at least
one browser listens, and wakes every listener when it changes: many open worklists cost one
query a second, none cost nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Hashable

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.db.models import Instance, Job, JobState, Result, Study

log = logging.getLogger(__name__)

ACTIVE_JOB_STATES = (JobState.pending.value, JobState.enqueued.value, JobState.running.value)


def worklist_signature(session: Session) -> Hashable:
    """A value that differs whenever the worklist (or a study on it) may have changed."""
    highest = session.execute(select(
        select(func.max(Study.id)).scalar_subquery(),
        select(func.max(Instance.id)).scalar_subquery(),
        select(func.max(Job.id)).scalar_subquery(),
        select(func.max(Result.id)).scalar_subquery(),
    )).one()
    active = session.execute(
        select(Job.state, func.count(), func.sum(Job.id))
        .where(Job.state.in_(ACTIVE_JOB_STATES))
        .group_by(Job.state)
        .order_by(Job.state)
    ).all()
    return tuple(highest), tuple(tuple(row) for row in active)


class WorklistWatcher:
    """Polls :func:`worklist_signature` while anyone listens; :meth:`changes` yields on change."""

    def __init__(self, session_factory: sessionmaker[Session], interval: float = 1.0) -> None:
        self.session_factory = session_factory
        self.interval = interval
        self.generation = 0
        self._signature: Hashable = None
        self._listeners = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._primed = asyncio.Event()

    @property
    def listeners(self) -> int:
        return self._listeners

    def _read_signature(self) -> Hashable:
        with self.session_factory() as session:
            return worklist_signature(session)

    async def _poll(self) -> None:
        try:
            while self._listeners > 0:
                try:
                    signature = await run_in_threadpool(self._read_signature)
                except SQLAlchemyError as exc:  # database away or pool exhausted: keep the last view, retry
                    log.warning("worklist signature unavailable", extra={"error": type(exc).__name__})
                    signature = self._signature
                if self._signature is None:  # (re)started: this is the baseline
                    self._signature = signature
                elif signature != self._signature:
                    self._signature = signature
                    self.generation += 1
                    async with self._changed:
                        self._changed.notify_all()
                self._primed.set()
                await asyncio.sleep(self.interval)
        finally:  # whatever ended it, the next listener starts a new watch
            self._task = None

    def _moved_on_from(self, seen: int) -> Callable[[], bool]:
        """A predicate for the condition: the worklist changed since generation ``seen``."""
        return lambda: self.generation != seen

    async def changes(self, heartbeat: float = 15.0) -> AsyncGenerator[int | None, None]:
        """Yield the generation once the watch is on (load the worklist now), then again after
        each change, and None after ``heartbeat`` seconds of quiet (send a keep-alive)."""
        self._listeners += 1
        try:
            if self._task is None:
                self._signature = None  # not watched meanwhile: the first poll is the new baseline
                self._primed = asyncio.Event()
                self._task = asyncio.get_running_loop().create_task(self._poll())
            await self._primed.wait()
            seen = self.generation
            yield seen
            while True:
                async with self._changed:
                    try:
                        await asyncio.wait_for(self._changed.wait_for(self._moved_on_from(seen)), heartbeat)
                    except TimeoutError:
                        pass
                if self.generation == seen:
                    yield None
                else:
                    seen = self.generation
                    yield seen
        finally:
            self._listeners -= 1
