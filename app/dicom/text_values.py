"""Header text the databases can store: cleaned where it is only shown, refused where it is a key.

PostgreSQL refuses a NUL character in text, and neither database driver can encode a lone
surrogate (what a mis-declared character set can leave behind). Such a value used to fail the
whole record as a database error, which the sender is told to retry: a study with a NUL in its
SeriesDescription was refused forever. Descriptions, accession numbers and names are cleaned (NUL
and other C0 controls dropped, unencodable characters replaced); an identifier (a UID, the study
date) with such characters is not one, and the instance is refused as unreadable instead.
"""

from __future__ import annotations

import re
from typing import Any

from app.errors import InvalidDicomError

#: C0 controls other than tab, line feed and carriage return (NUL first of all), and DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: Lone surrogates: a str holding one cannot be encoded as UTF-8.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def clean_text(value: str) -> str:
    """``value`` without control characters, with unencodable characters as U+FFFD."""
    return _SURROGATE.sub("\ufffd", _CONTROL.sub("", value))


def clean_optional(value: str | None) -> str | None:
    """:func:`clean_text`, keeping None, and None for what is left empty."""
    if value is None:
        return None
    return clean_text(value) or None


def clean_json(value: Any) -> Any:
    """Every string in a JSON-like structure cleaned (the per-frame headers kept with an instance)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_json(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def check_identifier(keyword: str, value: str | None) -> None:
    """Refuse an identifier the databases cannot store as it is; the reason names the field, not the value."""
    if value is None:
        return
    if _CONTROL.search(value) or _SURROGATE.search(value):
        raise InvalidDicomError(f"{keyword} holds a control character or an undecodable byte")
