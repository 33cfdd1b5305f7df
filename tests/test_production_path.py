"""The production deployment on this machine's real servers: PostgreSQL, Redis, and the
separate processes `cttriage dicom`, `cttriage api` and `cttriage worker` (a real Celery worker).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.dicom.push import push_files
from tests.conftest import dcmtk_storescu, write_phantom_study
from tests.deployment import Deployment, start_deployment
from tests.service_process import API, wait_for_state

SMALL = {"slices": 40, "rows": 160, "columns": 160, "pixel_spacing": 2.2, "slice_spacing": 7.0}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, pg_url: str, redis_url: str) -> Iterator[Deployment]:
    deployment = start_deployment(tmp_path_factory.mktemp("production"), pg_url, redis_url)
    yield deployment
    deployment.stop()


def test_study_is_scored_through_postgres_redis_and_celery(deployment: Deployment, tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path, severity_left=40.0, severity_right=12.0, seed=31, **SMALL)
    assert set(push_files(sorted(tmp_path.glob("*.dcm")), host="127.0.0.1", port=deployment.dicom_port)) == {0}
    study = wait_for_state(deployment.api, truth["study_instance_uid"], logs=deployment.logs)
    assert study["state"] == "scored", study
    assert abs(study["severity_left"] - truth["severity_left"]) <= 3.0
    assert abs(study["severity_right"] - truth["severity_right"]) <= 3.0
    [job] = study["jobs"]
    assert job["state"] == "done" and job["worker"].startswith("cttriage-cpu-")
    assert "celery" not in (job["error"] or "")


def test_dcmtk_sender_into_production(deployment: Deployment, tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path, severity_left=0.0, severity_right=25.0, seed=32, **SMALL)
    result = dcmtk_storescu(sorted(tmp_path.glob("*.dcm")), deployment.dicom_port)
    assert result.returncode == 0, result.stderr
    study = wait_for_state(deployment.api, truth["study_instance_uid"], logs=deployment.logs)
    assert study["state"] == "scored", study
    assert study["severity_left"] < 1.5 and abs(study["severity_right"] - truth["severity_right"]) <= 3.0
    items = API.get(f"{deployment.api}/api/worklist").json()["items"]
    assert truth["study_instance_uid"] in [i["study_uid"] for i in items]


def test_readiness_and_metrics(deployment: Deployment, tmp_path: Path) -> None:
    ready = API.get(f"{deployment.api}/readyz")
    assert ready.status_code == 200 and ready.json()["broker"] == "ok", ready.text
    truth = write_phantom_study(tmp_path, severity_left=10.0, severity_right=10.0, seed=33, **SMALL)
    push_files(sorted(tmp_path.glob("*.dcm")), host="127.0.0.1", port=deployment.dicom_port)
    wait_for_state(deployment.api, truth["study_instance_uid"], logs=deployment.logs)
    text = httpx.get(f"{deployment.api}/metrics").text  # open to the scraper, no key
    scored = float(re.search(r'^cttriage_studies\{state="scored"\} (\S+)$', text, re.M).group(1))  # type: ignore[union-attr]
    assert scored >= 1
    assert re.search(r'^cttriage_instances_received_total (\S+)$', text, re.M)
    assert 'cttriage_scoring_stage_seconds_bucket{le="+Inf",stage="lungs"}' in text
    assert "cttriage_queue_depth" in text


def test_worker_loads_its_networks_as_it_starts(deployment: Deployment) -> None:
    """The first study after a worker (re)start must not wait for weights: the worker settles its
    scoring method before it reports ready, and logs structured lines like the other processes.
    This worker listens on a queue no job goes to, so nothing but its start-up can log this."""
    worker = deployment.start("idle-worker", "worker", "--device", "cpu", "--queues", "no-jobs-here")
    deadline = time.monotonic() + 90
    while " ready." not in worker.log() and time.monotonic() < deadline:
        assert worker.alive(), worker.log()[-3000:]
        time.sleep(0.2)
    records = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    loggers = [record["logger"] for record in records]
    assert "worker.networks" in loggers and "celery.apps.worker" in loggers, worker.log()[-3000:]
    assert loggers.index("worker.networks") < loggers.index("celery.apps.worker")  # before "ready"
    assert "threshold method" in records[loggers.index("worker.networks")]["message"]
