"""DICOM networking: the C-ECHO/C-STORE listener and durable instance storage."""
