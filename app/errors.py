"""Typed errors of cttriage, and the one place where they map to study states, DICOM statuses and
HTTP problems.

Every failure the service itself can name is a subclass of :class:`CtTriageError`, which carries
``dicom_status`` (what a C-STORE answers when it is raised while receiving) and ``http_status``
(what the API answers). Failures of the images, the weights or the networks are the imaging
library's (``models.errors``); :data:`IMAGING_ERRORS` maps each to what the service does with it.
A study that fails processing keeps ``str(error)`` as its reason and the class name as its reason
code (:func:`reason_code`), so the message must be useful to an admin and never contain patient data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from models.errors import (
    CheckpointError,
    CheckpointIntegrityError,
    DuplicatePositionError,
    GantryTiltError,
    ImagingError,
    ImplausibleFrameCountError,
    ImplausibleGeometryError,
    ImplausibleMatrixError,
    ImplausiblePixelSpacingError,
    ImplausibleSliceSpacingError,
    MissingPixelDataError,
    MixedGeometryError,
    ModelOutputError,
    NoUsableSeriesError,
    PixelDecodeError,
    SegmentationError,
    SliceGapError,
    UnusableImageError,
    VolumeError,
    VolumeTooLargeError,
)

# DICOM C-STORE statuses (PS3.4 B.2.3, PS3.7 C.4.2).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110


class CtTriageError(Exception):
    """Base of every error the service raises on purpose."""

    dicom_status: ClassVar[int] = STATUS_PROCESSING_FAILURE
    http_status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    #: True where retrying the same work later can succeed (database or broker down).
    transient: ClassVar[bool] = False


# --- receiving -------------------------------------------------------------------------------


class InvalidDicomError(CtTriageError):
    """Bytes that are not a readable DICOM instance, or lack the UIDs we key storage on."""

    dicom_status = STATUS_CANNOT_UNDERSTAND
    http_status = 400
    title = "Invalid DICOM"


class QuarantinedError(InvalidDicomError):
    """Unreadable bytes, kept in the quarantine for an admin: answered as :class:`InvalidDicomError`."""


class StorageFullError(CtTriageError):
    """The storage root has too little free space to keep what was sent."""

    dicom_status = STATUS_OUT_OF_RESOURCES
    http_status = 507
    title = "Storage full"
    transient = True


class InstanceTooLargeError(CtTriageError):
    """An instance or upload beyond the configured size limits: a limit of this node (0xA700, 413),
    not a fault in the data, so the bytes are neither stored nor quarantined."""

    dicom_status = STATUS_OUT_OF_RESOURCES
    http_status = 413
    title = "Too large"


class StorageWriteError(CtTriageError):
    """Writing an instance durably failed for a reason other than space."""

    dicom_status = STATUS_OUT_OF_RESOURCES
    http_status = 500
    title = "Storage write failed"
    transient = True


class DatabaseUnavailableError(CtTriageError):
    """The database could not record what was received; the sender must retry."""

    dicom_status = STATUS_OUT_OF_RESOURCES
    http_status = 503
    title = "Database unavailable"
    transient = True


# --- start-up ------------------------------------------------------------------------------


class ConfigurationError(CtTriageError):
    """A setting the service must not run with (a weak bootstrap key): refused at start, in one line."""

    title = "Configuration refused"


# --- API -------------------------------------------------------------------------------------


class NotAuthenticatedError(CtTriageError):
    """No API key, or one that is unknown or revoked."""

    http_status = 401
    title = "Not authenticated"


class ForbiddenError(CtTriageError):
    """A valid key whose role does not allow the request."""

    http_status = 403
    title = "Forbidden"


class NotFoundError(CtTriageError):
    http_status = 404
    title = "Not found"


class InvalidQueryError(CtTriageError):
    """A query parameter the schema lets through but that names nothing (an unknown time zone)."""

    http_status = 422
    title = "Request is not valid"


class ConflictError(CtTriageError):
    http_status = 409
    title = "Conflict"


# --- imaging errors: what the service does with each ---------------------------------------

#: Study states a scoring error leaves (``app.db.models.StudyState`` values).
REJECTED = "rejected"  # the images cannot be scored by design: no retry
FAILED = "failed"  # the method failed (weights, network output): an admin looks


@dataclass(frozen=True)
class ErrorMapping:
    """What the service does with one kind of imaging error."""

    state: str
    dicom_status: int
    http_status: int
    title: str


def _rejected(title: str) -> ErrorMapping:
    return ErrorMapping(REJECTED, STATUS_PROCESSING_FAILURE, 422, title)


def _failed(title: str) -> ErrorMapping:
    return ErrorMapping(FAILED, STATUS_PROCESSING_FAILURE, 500, title)


#: The one table: an imaging error maps by its most specific class listed here.
IMAGING_ERRORS: dict[type[ImagingError], ErrorMapping] = {
    ImagingError: _failed("Imaging error"),
    UnusableImageError: _rejected("Study rejected"),
    NoUsableSeriesError: _rejected("No usable series"),
    VolumeError: _rejected("Volume cannot be built"),
    MissingPixelDataError: _rejected("Missing pixel data"),
    PixelDecodeError: _rejected("Pixel data cannot be decoded"),
    SliceGapError: _rejected("Missing slices"),
    DuplicatePositionError: _rejected("Duplicate slice positions"),
    MixedGeometryError: _rejected("Mixed slice geometry"),
    GantryTiltError: _rejected("Gantry tilt"),
    ImplausibleGeometryError: _rejected("Implausible geometry"),
    ImplausiblePixelSpacingError: _rejected("Implausible pixel spacing"),
    ImplausibleSliceSpacingError: _rejected("Implausible slice spacing"),
    ImplausibleMatrixError: _rejected("Implausible image matrix"),
    ImplausibleFrameCountError: _rejected("Implausible number of slices"),
    VolumeTooLargeError: _rejected("Volume too large"),
    SegmentationError: _rejected("Lungs not found"),
    ModelOutputError: _failed("Network output not finite"),
    CheckpointError: _failed("Model checkpoint unusable"),
    CheckpointIntegrityError: _failed("Model checkpoint altered"),
}

#: Every error raised on purpose, the service's and the imaging library's.
TYPED_ERRORS: tuple[type[Exception], ...] = (CtTriageError, ImagingError)


def imaging_mapping(exc: ImagingError) -> ErrorMapping:
    """The row of :data:`IMAGING_ERRORS` for ``exc``: its own class, else its nearest listed base."""
    for cls in type(exc).__mro__:
        if cls in IMAGING_ERRORS:
            return IMAGING_ERRORS[cls]
    raise AssertionError("ImagingError is in the table")  # pragma: no cover


def dicom_status(exc: BaseException) -> int:
    """What a C-STORE answers when receiving raised ``exc``; 0xC000 for an error nobody named."""
    if isinstance(exc, CtTriageError):
        return exc.dicom_status
    if isinstance(exc, ImagingError):
        return imaging_mapping(exc).dicom_status
    return STATUS_CANNOT_UNDERSTAND


def study_state(exc: BaseException) -> str:
    """The state a study is left in when scoring it raised ``exc``: rejected or failed."""
    return imaging_mapping(exc).state if isinstance(exc, ImagingError) else FAILED


def reason_code(exc: BaseException) -> str:
    """What a study stores as its reason code: the error's class name."""
    return type(exc).__name__
