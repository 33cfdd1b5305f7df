"""docker-compose.yml passes `docker compose config` and describes the whole deployment.

There is no Docker engine on these machines; the Compose CLI validates the file without one.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compose_command() -> list[str]:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True) if shutil.which("docker") else None
    if probe is not None and probe.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed (scripts/install.sh installs it)")


def test_compose_file_is_valid_and_complete() -> None:
    command = compose_command()
    config = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert config.returncode == 0, config.stderr
    services = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config", "--services"],
                              capture_output=True, text=True, cwd=ROOT, timeout=60, check=True).stdout.split()
    assert {"postgres", "redis", "migrate", "api", "dicom", "worker"} <= set(services)
    text = config.stdout
    assert "capabilities:" in text and "gpu" in text and "driver: nvidia" in text  # the worker reserves a GPU
    assert text.count("healthcheck:") >= 4
    assert "CTTRIAGE_DATABASE_URL: postgresql+psycopg://" in text and "CTTRIAGE_BROKER_URL: redis://" in text


def test_dockerfile_builds_one_image_for_every_role() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["cttriage"]' in dockerfile
    assert "torch==${TORCH_VERSION}" in dockerfile
    for folder in ("app", "worker", "models", "migrations"):
        assert f"COPY {folder} ./{folder}" in dockerfile
