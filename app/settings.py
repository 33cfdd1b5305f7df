"""All configuration of cttriage, read once from ``CTTRIAGE_*`` environment variables.

The defaults are the embedded mode: SQLite and a SQLite-backed Celery broker under ``data_dir``,
so one command runs the whole service on a laptop. Production sets ``CTTRIAGE_DATABASE_URL``
(PostgreSQL) and ``CTTRIAGE_BROKER_URL`` (Redis).
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from urllib.parse import quote

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.dicom.own_objects import OwnObjectsPolicy

#: ``dicom_processes`` 0 takes a process per core up to this: beyond it the database's commits,
#: not the CPU, bound the rate.
MAX_AUTO_DICOM_PROCESSES = 4


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTTRIAGE_", env_file=None, extra="ignore")

    # --- where things live ---
    data_dir: Path = Field(Path("./data"), description="Root for the embedded database, broker and storage.")
    storage_dir: Path | None = Field(None, description="Received DICOM; defaults to data_dir/storage.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; defaults to SQLite in data_dir.")
    broker_url: str | None = Field(None, description="Celery broker; defaults to SQLite in data_dir.")
    #: Prefix of every Redis key of this deployment, so several deployments (or test runs) can
    #: share one Redis database without taking each other's tasks.
    broker_key_prefix: str = ""
    #: How often a worker on the embedded (SQLite) broker looks for a task while none is waiting:
    #: the longest a queued study waits for an idle worker (kombu's default is 1 s). A Redis
    #: consumer is woken by the broker instead.
    embedded_broker_poll_seconds: float = Field(0.2, gt=0)
    #: Refuse C-STORE with 0xA700 (out of resources) below this much free space.
    min_free_bytes: int = 512 * 1024 * 1024

    # --- DICOM listener ---
    ae_title: str = "CTTRIAGE"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    #: Calling AE titles allowed to associate; empty means any.
    allowed_calling_aets: list[str] = Field(default_factory=list)
    #: Peer networks allowed to connect (CIDR, e.g. ["10.1.2.0/24"]); empty means any.
    allowed_calling_ips: list[str] = Field(default_factory=list)
    #: DICOM TLS: certificate and key of this node; with a CA file, peers must present a
    #: certificate it signed.
    dicom_tls_cert: Path | None = None
    dicom_tls_key: Path | None = None
    dicom_tls_ca: Path | None = None
    max_pdu: int = 0  # unlimited
    #: Associations (and bare TCP connections) served at once; beyond it a connection is refused.
    dicom_max_associations: int = Field(default=64, ge=1)
    #: ... and from one peer IP, so one misbehaving sender cannot take every slot.
    dicom_max_associations_per_peer: int = Field(default=16, ge=1)
    #: Listener processes sharing the DICOM port (``cttriage dicom`` and ``serve``): C-STORE
    #: ingest is CPU-bound in Python, so associations in parallel need processes. 0: one per
    #: core, at most 4. The association limits above hold per process.
    dicom_processes: int = Field(default=0, ge=0)
    #: Seconds a connection may stay silent before its A-ASSOCIATE-RQ (pynetdicom's ARTIM timer,
    #: set from AE.acse_timeout on the acceptor side) and to wait for A-RELEASE/A-ABORT replies.
    dicom_acse_timeout: float = Field(default=10.0, gt=0)
    #: Seconds to wait for a DIMSE message that is expected.
    dicom_dimse_timeout: float = Field(default=30.0, gt=0)
    #: Seconds an established association may stay idle (no PDU at all) before it is aborted.
    network_timeout: float = Field(default=30.0, gt=0)
    #: Largest instance accepted, by C-STORE (0xA700, the rest of the data set is discarded while
    #: it arrives) or upload (413).
    max_instance_bytes: int = Field(default=2**30, gt=0)
    #: Largest total unpacked size of one uploaded zip (413 before anything is unpacked).
    max_zip_unpacked_bytes: int = Field(default=4 * 2**30, gt=0)

    # --- HTTP API ---
    api_host: str = "127.0.0.1"
    api_port: int = 8000

    # --- study assembly and scoring ---
    #: A study is complete when no instance arrived for this long.
    settle_seconds: float = 30.0
    #: ... or this long after the release of an association that delivered a complete series
    #: (one the series rules would score: axial, uniform spacing, no gap, the chest coverage),
    #: with no instance since (``app.assembly.mark_released``).
    settle_after_release_seconds: float = Field(default=3.0, ge=0)
    #: How often the assembler looks for settled studies.
    assembler_interval_seconds: float = 1.0
    #: A series is scored only if it covers this much along the head-foot axis ((n - 1) x slice
    #: spacing + slice thickness): a whole chest, however thickly sliced, not a slab of it.
    min_coverage_mm: float = Field(default=150.0, gt=0)
    #: ... and only if its slices are at most this far apart (wider steps miss small lesions).
    max_slice_spacing_mm: float = Field(default=10.0, gt=0)
    #: In-plane spacing the pipeline resamples to before segmentation (the paper's 2x2 mm).
    inplane_spacing_mm: float = 2.0
    #: Plausible geometry, checked from the headers before any pixel is loaded (a series outside
    #: is passed over with its own reason): pixel spacing and slice step in mm, rows and columns
    #: (12 mm: real chest CT is 0.5-1.5 mm, coarse test and demo phantoms up to 11.2 mm).
    min_pixel_spacing_mm: float = Field(default=0.1, gt=0)
    max_pixel_spacing_mm: float = Field(default=12.0, gt=0)
    min_slice_spacing_mm: float = Field(default=0.1, gt=0)
    min_matrix: int = Field(default=16, ge=1)
    max_matrix: int = Field(default=2048, ge=1)
    #: Voxels of the volume as stored (slices x rows x columns) and of its scoring grid (resampled
    #: to ``inplane_spacing_mm``): beyond them a study is rejected as too large instead of running
    #: a worker out of memory (scoring holds roughly 250 bytes per scoring-grid voxel at its peak).
    max_volume_voxels: int = Field(default=600_000_000, gt=0)
    max_scoring_voxels: int = Field(default=64_000_000, gt=0)
    #: A processing study older than this is assumed lost by its worker and re-queued.
    processing_timeout_seconds: float = 1800.0
    #: A job whose attempts keep ending without an outcome (worker killed, out of memory, timed
    #: out) fails its study with that reason after this many, instead of coming back forever.
    job_max_attempts: int = Field(default=5, ge=1)
    #: A worker writes a heartbeat on the job it runs this often; a running job whose heartbeat is
    #: older than the timeout lost its worker: it goes back to the outbox (within about a minute,
    #: not the processing timeout), and a second delivery of a job whose heartbeat is fresh stops.
    job_heartbeat_interval_seconds: float = Field(default=5.0, gt=0)
    job_heartbeat_timeout_seconds: float = Field(default=45.0, gt=0)
    #: An enqueued job no worker claimed for this long is handed to the broker again, with the
    #: wait doubling on each re-send (a Redis restart without AOF loses queued messages; the claim
    #: makes a duplicate harmless, the backoff keeps a long queue from filling with them).
    enqueued_resend_seconds: float = Field(default=60.0, gt=0)
    #: The DICOM listener's liveness heartbeat; settling pauses while no listener is alive and
    #: restarts its clock when one comes back (an outage is not silence).
    listener_heartbeat_interval_seconds: float = Field(default=5.0, gt=0)
    listener_heartbeat_timeout_seconds: float = Field(default=20.0, gt=0)
    #: Celery queue of the scoring task (GPU workers in production).
    scoring_queue: str = "gpu"
    #: Worker processes in the embedded mode.
    embedded_worker_concurrency: int = 1

    #: Received files of scored or rejected studies are deleted this long after scoring.
    retention_days: float = 30.0
    #: How often the assembler looks for expired studies.
    retention_check_interval_seconds: float = 600.0
    #: Quarantined files (and their rows) are deleted this long after they were received.
    quarantine_retention_days: float = Field(default=30.0, gt=0)
    #: Bytes the quarantine may hold; beyond it a refused file's bytes are not kept, only its row
    #: and reason (0: keep nothing).
    quarantine_max_bytes: int = Field(default=10 * 2**30, ge=0)

    # --- network weights (none configured: the threshold method; nothing is ever downloaded) ---
    #: A model bundle directory (multitask.pt, optional lungs.pt); wins over model_dir.
    model_path: Path | None = None
    #: A directory of named model versions, MODEL_DIR/<version>/multitask.pt.
    model_dir: Path | None = None
    #: Which version under model_dir; may be left out when it holds exactly one.
    model_version: str | None = None
    #: Where the networks run in a worker: cpu or cuda[:N] (`cttriage worker --device` sets it).
    device: str = "cpu"
    #: Slices per forward pass of the networks.
    inference_batch_slices: int = 32
    #: torch.compile the networks once per worker process (slower first study, faster after).
    torch_compile: bool = False
    #: torch CPU threads per worker process; 0: every core the process may use.
    torch_threads: int = 0

    # --- priority: Moscow CT-0..CT-4 severity bands (percent of the worse lung) ---
    severity_band_edges: list[float] = Field(default_factory=lambda: [0.0, 25.0, 50.0, 75.0])

    # --- comparison with the patient's prior study (app.priors) ---
    #: A change of max-lung severity of at least this many points since the prior is a trend
    #: (worse or better); a smaller one is "unchanged".
    trend_points: float = Field(default=5.0, gt=0.0)
    #: A patient worse than at the prior goes first within its band (models.priority: a bonus that
    #: never crosses bands).
    priority_worsening_first: bool = True

    # --- priors from the PACS (app.prior_lookups; off by default) ---
    #: A study scored without a prior has the patient's most recent earlier CT study found on the
    #: query/retrieve node (C-FIND, Study Root) and sent here (C-MOVE to ae_title), scored after new
    #: studies (app.priority). A failed lookup is shown on the admin page; it never holds up a scoring.
    priors_enabled: bool = False
    priors_host: str | None = None
    priors_port: int = 104
    priors_ae_title: str = "PACS"
    #: Our AE title when calling it, and the C-MOVE destination (the node must know it); default ae_title.
    priors_calling_ae_title: str | None = None
    #: How far back before the study's date a prior may be.
    priors_days_back: int = Field(default=365, ge=1)
    #: Retrievals started in any 24 hours, at most; lookups beyond it are skipped with that reason.
    priors_max_per_day: int = Field(default=50, ge=0)
    priors_timeout_seconds: float = Field(default=30.0, gt=0.0)
    #: How often pending lookups are looked for.
    priors_interval_seconds: float = Field(default=2.0, gt=0.0)

    #: Registered as the admin key on first start if no key exists (else one is generated and
    #: printed once). For automated deployments and tests.
    bootstrap_admin_key: str | None = None

    # --- results back to the PACS: SR, SEG and secondary capture by C-STORE (off by default) ---
    export_enabled: bool = False
    #: The DICOM node that receives them (required when export is enabled).
    export_host: str | None = None
    export_port: int = 104
    export_ae_title: str = "PACS"
    #: Our AE title when calling it; defaults to ae_title.
    export_calling_ae_title: str | None = None
    #: Sends tried per object before it is marked failed (an admin can retry it then).
    export_max_attempts: int = 8
    #: Wait before the first retry; doubles each attempt, up to export_backoff_max_seconds (keep
    #: that below Redis' visibility timeout, processing_timeout_seconds + 60, or a waiting retry
    #: is delivered twice).
    export_backoff_seconds: float = 30.0
    export_backoff_max_seconds: float = 1200.0
    #: Connection, association and reply timeouts of one send.
    export_timeout_seconds: float = 30.0
    #: Hold a result's exports back this long after its scoring (0: send at once). A study that
    #: arrives in parts and is rescored within the hold sends only its newest scoring; the older
    #: one's objects are marked superseded. Keep it below processing_timeout_seconds + 60 (Redis'
    #: visibility timeout), like the backoff.
    export_hold_seconds: float = Field(default=0.0, ge=0.0)

    #: "Open in viewer" link on the worklist and study pages (absent: no link), e.g. an OHIF URL
    #: "https://pacs.example/viewer?StudyInstanceUIDs={study_uid}"; the placeholders {study_uid}
    #: and {accession} are replaced URL-encoded.
    viewer_url_template: str | None = None

    #: Our own SR, SEG and secondary capture sent back by the PACS (a "forward on change" rule):
    #: "store" keeps them, listed as created by cttriage; "drop" answers success and keeps nothing.
    #: Either way they never reopen a study (``app.dicom.own_objects``).
    own_objects: OwnObjectsPolicy = "store"

    log_level: str = "INFO"
    log_json: bool = True

    @model_validator(mode="after")
    def _export_needs_a_host(self) -> Settings:
        if self.export_enabled and not self.export_host:
            raise ValueError("CTTRIAGE_EXPORT_HOST is required when CTTRIAGE_EXPORT_ENABLED is true")
        if self.priors_enabled and not self.priors_host:
            raise ValueError("CTTRIAGE_PRIORS_HOST is required when CTTRIAGE_PRIORS_ENABLED is true")
        return self

    def viewer_url(self, study_uid: str, accession: str | None) -> str | None:
        """The study's "open in viewer" link from ``viewer_url_template`` (None without one)."""
        if not self.viewer_url_template:
            return None
        values = {"study_uid": quote(study_uid, safe=""), "accession": quote(accession or "", safe="")}
        return re.sub(r"\{(study_uid|accession)\}", lambda m: values[m.group(1)], self.viewer_url_template)

    @property
    def listener_processes(self) -> int:
        """``dicom_processes``, with 0 resolved to the cores this process may use (at most 4)."""
        if self.dicom_processes:
            return self.dicom_processes
        return max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_DICOM_PROCESSES))

    @property
    def export_calling_aet(self) -> str:
        return self.export_calling_ae_title or self.ae_title

    @property
    def priors_calling_aet(self) -> str:
        return self.priors_calling_ae_title or self.ae_title

    @cached_property
    def storage_root(self) -> Path:
        return self.storage_dir or self.data_dir / "storage"

    @cached_property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'cttriage.sqlite').resolve()}"

    @cached_property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        return self.celery_broker_url.startswith("sqla+")


def get_settings() -> Settings:
    """Read the environment now; callers pass the result down instead of re-reading it."""
    return Settings()
