"""Errors of the imaging library: what can be wrong with the images, the weights or the networks' output.

They say what is wrong and nothing about what a service does with it: ``app.errors`` maps each to
a study state, a DICOM status and an HTTP problem. The class name is the reason code a service
stores, and the message is shown to admins, so it must be useful and never contain patient data.
"""

from __future__ import annotations


class ImagingError(Exception):
    """Base of every error the imaging library raises on purpose."""


# --- the images cannot be scored, by design: retrying does not help ---------------------------


class UnusableImageError(ImagingError):
    """Images that cannot be scored (no usable series, unreadable volume, no lungs)."""


class NoUsableSeriesError(UnusableImageError):
    """Series selection passed over every series of the study."""


class VolumeError(UnusableImageError):
    """The chosen series cannot be stacked into a volume."""


class MissingPixelDataError(VolumeError):
    pass


class PixelDecodeError(VolumeError):
    pass


class SliceGapError(VolumeError):
    pass


class DuplicatePositionError(VolumeError):
    pass


class MixedGeometryError(VolumeError):
    pass


class GantryTiltError(VolumeError):
    pass


class ImplausibleGeometryError(UnusableImageError):
    """Headers describe a geometry no chest CT has. Checked from the headers before any pixel is
    loaded: resampling a 25 mm pixel spacing to the 2 mm grid once took 6 GB for a 1.5 MB study."""


class ImplausiblePixelSpacingError(ImplausibleGeometryError):
    pass


class ImplausibleSliceSpacingError(ImplausibleGeometryError):
    pass


class ImplausibleMatrixError(ImplausibleGeometryError):
    pass


class ImplausibleFrameCountError(ImplausibleGeometryError):
    pass


class VolumeTooLargeError(UnusableImageError):
    """The volume, or its scoring grid, has more voxels than a worker is set to hold: it can never
    fit, so the study is rejected at once rather than retried as out of memory."""


class SegmentationError(UnusableImageError):
    """The image was read but no lungs could be found in it."""


# --- the method itself failed ---------------------------------------------------------------


class ModelOutputError(ImagingError):
    """The networks produced a number that is not one (NaN or infinite: an overflow in reduced
    precision): the study fails with this reason rather than being ranked on it."""


class CheckpointError(ImagingError):
    """A checkpoint that cannot be used: unreadable, wrong format, or not what it claims."""


class CheckpointIntegrityError(CheckpointError):
    """The weights' SHA-256 differs from the one recorded at training time."""
