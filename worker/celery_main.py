"""Entry point for `celery -A worker.celery_main worker`: the app built from the environment."""

from app.settings import get_settings
from worker.celery_app import create_celery

app = create_celery(get_settings())
