"""Alembic migrations (run with `cttriage migrate`)."""
