"""API keys and roles.

Two roles: ``radiologist`` reads the worklist and studies; ``admin`` may do everything. Keys
are 256-bit random tokens; only their SHA-256 is stored (a fast hash is right for high-entropy
tokens, unlike passwords), so a database leak reveals no usable key. A key is shown once.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import ApiKey, AuditEvent, utcnow
from app.errors import ConfigurationError, ConflictError, NotFoundError

KEY_PREFIX = "ctt_"
#: A key given from outside (``CTTRIAGE_BOOTSTRAP_ADMIN_KEY``) must be at least this long, hold
#: this many different characters and mix two kinds (lower case, upper case, digits, others):
#: only the SHA-256 of a key is stored, which is safe for random tokens, not for short words.
MIN_KEY_LENGTH = 24
MIN_DISTINCT_CHARACTERS = 10
MIN_CHARACTER_KINDS = 2


class Role(enum.StrEnum):
    radiologist = "radiologist"
    admin = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name and role (never the key itself)."""

    name: str
    role: Role

    def may(self, needed: Role) -> bool:
        return self.role is Role.admin or self.role is needed


def generate_key() -> str:
    """A new random key (256 bits), drawn again in the unlikely case it reads as weak."""
    while key_weakness(key := KEY_PREFIX + secrets.token_urlsafe(32)):
        pass
    return key


def key_weakness(key: str) -> str | None:
    """Why ``key`` is too weak to be an API key (never quoting it), or None when it is strong enough."""
    if len(key) < MIN_KEY_LENGTH:
        return f"is {len(key)} characters long, fewer than {MIN_KEY_LENGTH}"
    if len(set(key)) < MIN_DISTINCT_CHARACTERS:
        return f"has {len(set(key))} different characters, fewer than {MIN_DISTINCT_CHARACTERS}"
    kinds = {"lower" if c.islower() else "upper" if c.isupper() else "digit" if c.isdigit() else "other" for c in key}
    if len(kinds) < MIN_CHARACTER_KINDS:
        return f"uses only one kind of character ({kinds.pop()}); mix at least {MIN_CHARACTER_KINDS}"
    return None


def check_configured_key(key: str, setting: str = "CTTRIAGE_BOOTSTRAP_ADMIN_KEY") -> None:
    """Refuse to start with a weak key from the configuration (ConfigurationError, one line)."""
    if weakness := key_weakness(key):
        raise ConfigurationError(f"{setting} {weakness}; use e.g. `python3 -c 'import secrets; "
                                 "print(secrets.token_urlsafe(32))'`")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, name: str, role: Role, key: str | None = None) -> str:
    """Store a new key's hash; returns the key, which is not kept anywhere."""
    key = key or generate_key()
    session.add(ApiKey(name=name, role=role.value, key_sha256=hash_key(key), created_at=utcnow()))
    try:
        session.flush()
    except IntegrityError as exc:
        raise ConflictError(f"a key named {name!r} (or with the same value) exists") from exc
    return key


def revoke_api_key(session: Session, name: str) -> None:
    row = session.execute(select(ApiKey).where(ApiKey.name == name)).scalar_one_or_none()
    if row is None:
        raise NotFoundError(f"no key named {name!r}")
    row.revoked_at = row.revoked_at or utcnow()


def authenticate(session: Session, key: str) -> Principal | None:
    digest = hash_key(key)
    row = session.execute(
        select(ApiKey).where(ApiKey.key_sha256 == digest, ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if row is None or not hmac.compare_digest(row.key_sha256, digest):
        return None
    return Principal(row.name, Role(row.role))


def ensure_bootstrap_admin(session_factory: sessionmaker[Session], configured_key: str | None) -> str | None:
    """On first start (no keys at all) create an admin key.

    Returns the new key when it was generated here, so the caller prints it once; a key given
    in the configuration (``CTTRIAGE_BOOTSTRAP_ADMIN_KEY``) is registered and not echoed, and is
    checked on every start (ConfigurationError when weak), not only the first.
    """
    if configured_key is not None:
        check_configured_key(configured_key)
    with session_factory.begin() as session:
        if session.execute(select(func.count()).select_from(ApiKey)).scalar_one():
            return None
        key = create_api_key(session, "admin", Role.admin, configured_key)
    return None if configured_key else key


def record_audit(session: Session, principal: Principal, action: str, study_uid: str | None = None,
                 detail: str | None = None) -> None:
    session.add(AuditEvent(at=utcnow(), actor=principal.name, role=principal.role.value, action=action,
                           study_uid=study_uid, detail=detail))
