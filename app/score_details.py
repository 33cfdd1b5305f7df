"""Reading a result's flags and lesion descriptors back from its ``details`` JSON.

The worker writes them there (``worker.pipeline.findings_details``); the API, the admin export
and the SR read them here, so a result scored before flags existed (no such keys) reads as
unflagged with no descriptors, and any flag code, known or new, passes through unchanged.
Plain dicts only: the API process does not import the imaging code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SIDES = ("right", "left")
#: Per-lung descriptor numbers, in the order the export columns list them.
LUNG_DESCRIPTOR_FIELDS = ("lesion_volume_ml", "peripheral_share", "ground_glass_share", "consolidation_share", "foci")


def flags_of(details: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The flags as ``{code, message, lower_bound}`` dicts (empty for an unflagged or older result)."""
    return [{"code": str(f.get("code", "")), "message": str(f.get("message", "")),
             "lower_bound": bool(f.get("lower_bound", False))}
            for f in (details or {}).get("flags") or [] if isinstance(f, Mapping)]


def lower_bound_of(details: Mapping[str, Any] | None) -> bool:
    """The severity is a lower bound: said outright, or by any of the flags."""
    return bool((details or {}).get("severity_lower_bound")) or any(f["lower_bound"] for f in flags_of(details))


def descriptors_of(details: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """``{right: {...}, left: {...}, bilateral}``, or None where the method gave none."""
    descriptors = (details or {}).get("descriptors")
    return descriptors if isinstance(descriptors, Mapping) and all(s in descriptors for s in SIDES) else None


def descriptor_columns(details: Mapping[str, Any] | None) -> dict[str, Any]:
    """The descriptors flattened for a table: ``bilateral``, ``<field>_<side>`` (None when absent)."""
    descriptors = descriptors_of(details) or {}
    columns: dict[str, Any] = {"bilateral": descriptors.get("bilateral")}
    for side in SIDES:
        lung = descriptors.get(side) or {}
        columns.update({f"{name}_{side}": lung.get(name) for name in LUNG_DESCRIPTOR_FIELDS})
    return columns


DESCRIPTOR_COLUMNS = tuple(descriptor_columns(None))
