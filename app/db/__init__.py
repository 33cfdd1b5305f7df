"""Database: typed SQLAlchemy models and session factory."""
