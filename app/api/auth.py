"""Authentication for the API: `Authorization: Bearer <key>` (or `X-API-Key: <key>`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from app.api.deps import SessionFactoryDep
from app.errors import ForbiddenError, NotAuthenticatedError
from app.security import Principal, Role, authenticate


def _key_from(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return x_api_key


def current_principal(
    request: Request,
    factory: SessionFactoryDep,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Principal:
    key = _key_from(authorization, x_api_key)
    if not key:
        raise NotAuthenticatedError("an API key is required (Authorization: Bearer <key>)")
    with factory() as session:
        principal = authenticate(session, key)
    if principal is None:
        raise NotAuthenticatedError("unknown or revoked API key")
    request.state.principal = principal
    return principal


def require(role: Role):  # type: ignore[no-untyped-def]
    """Dependency factory: the caller must hold ``role`` (admins hold every role)."""

    def dependency(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not principal.may(role):
            raise ForbiddenError(f"this needs the {role.value} role")
        return principal

    return dependency


Radiologist = Annotated[Principal, Depends(require(Role.radiologist))]
Admin = Annotated[Principal, Depends(require(Role.admin))]
