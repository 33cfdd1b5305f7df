"""Typed errors of cttriage, and the one place where they map to DICOM statuses and HTTP problems.

Every failure the service can name is a subclass of :class:`CtTriageError`. Each class carries
``dicom_status`` (what a C-STORE answers when it is raised while receiving) and ``http_status``
(what the API answers). A study that fails processing keeps ``str(error)`` as its reason, so the
message must be useful to an admin and must never contain patient data.
"""

from __future__ import annotations

from typing import ClassVar

# DICOM C-STORE statuses (PS3.4 B.2.3, PS3.7 C.4.2).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
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


# --- processing: the study itself is unusable (no retry) -----------------------------------


class StudyRejectedError(CtTriageError):
    """A study that cannot be scored by design (no usable series, unreadable volume)."""

    http_status = 422
    title = "Study rejected"


class NoUsableSeriesError(StudyRejectedError):
    """Series selection passed over every series of the study."""

    title = "No usable series"


class VolumeError(StudyRejectedError):
    """The chosen series cannot be stacked into a volume."""

    title = "Volume cannot be built"


class MissingPixelDataError(VolumeError):
    title = "Missing pixel data"


class PixelDecodeError(VolumeError):
    title = "Pixel data cannot be decoded"


class SliceGapError(VolumeError):
    title = "Missing slices"


class DuplicatePositionError(VolumeError):
    title = "Duplicate slice positions"


class MixedGeometryError(VolumeError):
    title = "Mixed slice geometry"


class GantryTiltError(VolumeError):
    title = "Gantry tilt"


class ImplausibleGeometryError(StudyRejectedError):
    """Headers describe a geometry no chest CT has. Checked from the headers before any pixel is
    loaded: resampling a 25 mm pixel spacing to the 2 mm grid once took 6 GB for a 1.5 MB study."""

    title = "Implausible geometry"


class ImplausiblePixelSpacingError(ImplausibleGeometryError):
    title = "Implausible pixel spacing"


class ImplausibleSliceSpacingError(ImplausibleGeometryError):
    title = "Implausible slice spacing"


class ImplausibleMatrixError(ImplausibleGeometryError):
    title = "Implausible image matrix"


class ImplausibleFrameCountError(ImplausibleGeometryError):
    title = "Implausible number of slices"


class VolumeTooLargeError(StudyRejectedError):
    """The volume, or its scoring grid, has more voxels than a worker is set to hold: it can never
    fit, so the study is rejected at once rather than retried as out of memory."""

    title = "Volume too large"


class SegmentationError(StudyRejectedError):
    """The image was read but no lungs could be found in it."""

    title = "Lungs not found"


class ModelOutputError(CtTriageError):
    """The networks produced a number that is not one (NaN or infinite: an overflow in reduced
    precision): the study fails with this reason rather than being ranked on it."""

    title = "Network output not finite"


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
