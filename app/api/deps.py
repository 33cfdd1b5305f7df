"""FastAPI dependencies: settings, database sessions and the broker hand-off, from app.state."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import tzinfo
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from app.broker import Broker
from app.errors import InvalidQueryError
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_session_factory(request: Request) -> sessionmaker[Session]:
    return request.app.state.session_factory  # type: ignore[no-any-return]


def get_broker(request: Request) -> Broker | None:
    return request.app.state.broker  # type: ignore[no-any-return]


def get_session(factory: Annotated[sessionmaker[Session], Depends(get_session_factory)]) -> Iterator[Session]:
    with factory() as session:
        yield session


#: The largest page offset: both databases keep OFFSET in a signed 64-bit integer.
MAX_OFFSET = 2**63 - 1
#: How many rows to skip (paging); past the 64-bit range it is a 422, not a database error.
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]


def get_day_zone(
    tz: Annotated[str, Query(max_length=64,
                             description="IANA time zone the received_from/received_to days are in, e.g. "
                                         "Europe/Moscow (the pages send the browser's); default UTC.")] = "UTC",
) -> tzinfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidQueryError(f"unknown time zone {tz[:64]!r}") from exc


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
SessionDep = Annotated[Session, Depends(get_session)]
BrokerDep = Annotated["Broker | None", Depends(get_broker)]
DayZoneDep = Annotated[tzinfo, Depends(get_day_zone)]
