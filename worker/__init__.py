"""Celery app, scoring task and the scoring pipeline."""
