"""cttriage: DICOM worklist triage for chest CT (API, DICOM listener, database)."""

__version__ = "0.1.0"
