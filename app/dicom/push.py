"""C-STORE SCU: send files to a DICOM node (the demo, `cttriage push`, tests and benchmarks) and
our results back to the PACS (worker.exports)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pydicom
from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import build_context


class AssociationFailed(RuntimeError):
    pass


#: C-STORE statuses a node answers with, in words (PS3.4 B.2.3, PS3.7 C): what an operator can act on.
_STATUS_WORDS = {
    0x0000: "success",
    0x0001: "warning: requested optional attributes not supported",
    0x0107: "warning: attribute list error",
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0x0210: "duplicate invocation",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
    0x0213: "resource limitation",
    0xB000: "warning: coercion of data elements",
    0xB006: "warning: elements discarded",
    0xB007: "warning: data set does not match SOP class",
}


def status_reason(status: int) -> str:
    """One C-STORE outcome in words, e.g. ``0xA700 out of resources``, so a failed push says why."""
    if status == -1:
        return "no answer (association aborted or timed out)"
    if status == NOT_ACCEPTED:
        return "SOP class or transfer syntax not accepted by the node"
    words = _STATUS_WORDS.get(status)
    if words is None:
        high = status & 0xFF00
        words = ("out of resources" if high == 0xA700 else
                 "data set does not match SOP class" if high == 0xA900 else
                 "cannot understand" if status & 0xF000 == 0xC000 else "unknown status")
    return f"0x{status:04X} {words}"


def failure_summary(statuses: Sequence[int]) -> str:
    """The failed statuses grouped by reason, most frequent first: ``0xA700 out of resources (12), ...``."""
    counts = Counter(status_reason(s) for s in statuses if s != 0)
    return ", ".join(f"{reason} ({count})" for reason, count in counts.most_common())


#: A DICOMDIR is a Part 10 file too, but an index of the media, not an instance to store.
_NOT_INSTANCES = {"DICOMDIR"}


def part10_files(paths: Sequence[Path]) -> list[Path]:
    """The DICOM files among ``paths``: files named as they are, and in folders (any depth) every
    file with the Part 10 marker, whatever its name (PACS and CD exports often have no extension)."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            found.append(path)
            continue
        for candidate in sorted(path.rglob("*")):
            if candidate.is_file() and candidate.name.upper() not in _NOT_INSTANCES and _has_part10_marker(candidate):
                found.append(candidate)
    return found


def _has_part10_marker(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def push_files(paths: Sequence[Path], *, host: str, port: int, called_aet: str = "CTTRIAGE",
               calling_aet: str = "CTTRIAGE_SCU") -> list[int]:
    """Send every file over one association; returns the C-STORE status of each (-1: no answer)."""
    return push_datasets([pydicom.dcmread(p) for p in paths], host=host, port=port, called_aet=called_aet,
                         calling_aet=calling_aet)


#: New associations tried for instances that got no answer at all.
UNANSWERED_RETRIES = 2


def push_datasets(datasets: Sequence[Dataset], *, host: str, port: int, called_aet: str,
                  calling_aet: str, timeout: float | None = None) -> list[int]:
    """Send datasets (each with its file meta's transfer syntax); returns the C-STORE status of
    each (-1: no answer). ``timeout`` bounds connecting, association and each reply. Raises
    AssociationFailed when the node cannot be reached or refuses us.

    Instances that got no answer (the association timed out or broke) are sent again on a new
    association, as a PACS would: a C-STORE is idempotent. pynetdicom's SCU occasionally loses
    a reply under load (its issue #435), which this also covers.
    """
    statuses = _push_once(datasets, host=host, port=port, called_aet=called_aet, calling_aet=calling_aet,
                          timeout=timeout)
    for _ in range(UNANSWERED_RETRIES):
        unanswered = [i for i, status in enumerate(statuses) if status == -1]
        if not unanswered:
            break
        again = _push_once([datasets[i] for i in unanswered], host=host, port=port, called_aet=called_aet,
                           calling_aet=calling_aet, timeout=timeout)
        for i, status in zip(unanswered, again, strict=True):
            statuses[i] = status
    return statuses


#: Status of a dataset whose SOP class (or encoding) the node accepted no presentation context for:
#: no C-STORE was sent, and sending again will not change that.
NOT_ACCEPTED = -2


def _push_once(datasets: Sequence[Dataset], *, host: str, port: int, called_aet: str, calling_aet: str,
               timeout: float | None) -> list[int]:
    """One association: the status of each dataset, -1 where no answer came, NOT_ACCEPTED where the
    node took no presentation context for it (the others are still sent)."""
    proposed: dict[str, set[str]] = {}
    for ds in datasets:
        syntax = str(ds.file_meta.TransferSyntaxUID)
        # Uncompressed data can be sent in either little-endian encoding: some nodes take Implicit VR only.
        uncompressed = syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        proposed.setdefault(str(ds.SOPClassUID), set()).update(
            (syntax, ImplicitVRLittleEndian) if uncompressed else (syntax,))
    ae = AE(ae_title=calling_aet)
    if timeout is not None:
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntaxes in sorted(proposed.items()):
        for syntax in sorted(syntaxes):  # one context per syntax: the node may accept either
            # build_context sets the abstract syntax it is given (the attribute is typed optional)
            ae.add_requested_context(cast(UID, build_context(sop_class, [syntax]).abstract_syntax), syntax)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
        return [NOT_ACCEPTED] * len(datasets)  # the node answered, and takes none of these objects
    if not assoc.is_established:
        why = _why_not_established(assoc)
        raise AssociationFailed(f"association with {called_aet}@{host}:{port} was not established ({why})")
    statuses: list[int] = []
    try:
        for ds in datasets:
            if not assoc.is_established:
                statuses.append(-1)
                continue
            try:
                status = assoc.send_c_store(ds)
            except ValueError:  # pynetdicom: no accepted presentation context for this dataset
                statuses.append(NOT_ACCEPTED)
                continue
            statuses.append(int(status.Status) if status and "Status" in status else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def _why_not_established(assoc: Association) -> str:
    """The A-ASSOCIATE-RJ reason when the node rejected us (a wrong called AE title, an unknown calling one)."""
    if assoc.is_rejected:
        answer = assoc.acceptor.primitive
        reason = answer.reason_str if answer is not None and answer.result_source is not None else ""
        return f"rejected: {reason[:1].lower()}{reason[1:]}" if reason else "rejected"
    return "aborted" if assoc.is_aborted else "no connection"
