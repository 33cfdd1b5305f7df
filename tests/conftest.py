"""Shared fixtures: migrated databases (SQLite and the real PostgreSQL), Redis, phantoms, ports.

PostgreSQL and Redis are real servers on this machine (scripts/services.sh starts them); a test
that needs one fails, rather than skips, when it is missing, because CI must exercise that path.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.db.migrate import upgrade_to_head
from app.db.session import make_engine
from app.settings import Settings
from models.volume import CtVolume, hu_volume

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_TEST_DB = 11
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", dicom_port=free_port(), api_port=free_port(),
                        settle_seconds=1.0, min_free_bytes=0)
    settings.data_dir.mkdir(parents=True)
    upgrade_to_head(settings.sqlalchemy_url)
    return settings


@pytest.fixture
def sqlite_factory(sqlite_settings: Settings) -> sessionmaker[Session]:
    return sessionmaker(make_engine(sqlite_settings.sqlalchemy_url), expire_on_commit=False)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, migrated to head, dropped afterwards."""
    from tests.harness_servers import create_database, drop_database

    try:
        url = create_database("cttriage_test", migrate=False)
    except Exception as exc:  # pragma: no cover - environment problem, reported loudly
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required (run scripts/services.sh): {exc}")
    upgrade_to_head(url)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    import redis

    url = f"redis://127.0.0.1:6379/{REDIS_TEST_DB}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"Redis at 127.0.0.1:6379 is required (run scripts/services.sh): {exc}")
    yield url
    client.flushdb()


def store_study_files(settings: Settings, factory: sessionmaker[Session], folder: Path) -> None:
    """Record every DICOM file of ``folder`` through the ingest path C-STORE uses, without a listener."""
    import pydicom

    from app.dicom.storage import IncomingFile
    from app.ingest import describe_instance, store_instance

    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        with IncomingFile(settings.storage_root, path.read_bytes(), min_free_bytes=0) as incoming:
            store_instance(incoming, describe_instance(ds, str(ds.file_meta.TransferSyntaxUID)),
                           storage_root=settings.storage_root, session_factory=factory, source="test",
                           calling_aet=None, own_objects=settings.own_objects)


def write_phantom_study(out: Path, **spec_kwargs: object) -> dict:  # type: ignore[type-arg]
    from models.phantom import PhantomSpec
    from models.phantom_dicom import write_phantom

    return write_phantom(out, PhantomSpec(**spec_kwargs))  # type: ignore[arg-type]


#: storescu's option proposing a compressed syntax first (it cannot re-encode compressed files).
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
}


def dcmtk_storescu(files: list[Path], port: int, called_aet: str = "CTTRIAGE") -> subprocess.CompletedProcess[str]:
    """Send with dcmtk's storescu (a real PACS-side client), proposing the files' own syntax."""
    import pydicom

    syntax = str(pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    propose = [STORESCU_PROPOSE[syntax]] if syntax in STORESCU_PROPOSE else []
    return subprocess.run(
        ["/usr/bin/storescu", "-aet", "DCMTK_SCU", "-aec", called_aet, *propose, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )


def read_truth(folder: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((folder / "truth.json").read_text())


def scored(severity_left: float, severity_right: float, flags: tuple = (),  # type: ignore[type-arg]
           bilateral: bool = True) -> Any:
    """A threshold StudyScore as the pipeline returns it, with ``flags`` (models.findings.ScoreFlag)
    and descriptors in its details: for tests that write results without scoring images."""
    from models.findings import LesionDescriptors, LungDescriptors
    from models.predictor import METHOD_THRESHOLD, THRESHOLD_MODEL_VERSION
    from models.severity import LungSeverity
    from worker.pipeline import StudyScore, findings_details

    severity = LungSeverity(severity_left, severity_right, max(severity_left, severity_right), 1500.0, 1600.0,
                            15.0 * severity_left, 16.0 * severity_right)
    descriptors = LesionDescriptors(right=LungDescriptors(16.0 * severity_right, 0.8, 0.75, 0.25, 3),
                                    left=LungDescriptors(15.0 * severity_left, 0.6, 0.5, 0.5, 2), bilateral=bilateral)
    return StudyScore(series_uid="9.9", method=METHOD_THRESHOLD, model_version=THRESHOLD_MODEL_VERSION,
                      identification=None, severity=severity, timings={"total": 1.0},
                      details={"severity": severity.to_dict(), **findings_details(tuple(flags), descriptors)},
                      flags=tuple(flags), descriptors=descriptors)


def stacked_real_slice(name: str, copies: int = 40) -> CtVolume:
    """One real COVID-19 axial slice of ../shared/data repeated along z every 5 mm: real HU, noise
    and anatomy in 3D (a single slice is rejected as a series). Skips where the data is absent."""
    path = SHARED_DATA / "real-dicom" / "covid19-ny-sbu" / f"{name}.dcm"
    if not path.is_file():
        pytest.skip(f"real test data not present at {path} (see ../shared/data/README.md)")
    ds = pydicom.dcmread(path)
    x, y, _ = (float(v) for v in ds.ImagePositionPatient)
    stack = []
    for k in range(copies):
        item = copy.deepcopy(ds)
        item.ImagePositionPatient = [x, y, 5.0 * k]
        item.SOPInstanceUID = f"1.2.826.0.1.3680043.2.{k + 1}"
        stack.append(item)
    return hu_volume(stack)
