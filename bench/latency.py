"""Time to triage (issue 13): last instance to scored row, and ingest by listener processes.

A hand-run benchmark, not a test::

    python bench/latency.py                      # all three parts, about 12 minutes on 2 cores
    python bench/latency.py --part latency --slices 80
    python bench/latency.py --part ingest --slices 600 --repeat 3
    python bench/latency.py --part idle

**latency**: ``cttriage serve`` (the embedded default: SQLite, a supervised worker) is started
twice, once with the default rules and once with the release rule switched off
(``CTTRIAGE_SETTLE_AFTER_RELEASE_SECONDS`` huge, so only ``settle_seconds`` settles). Each time
one study of ``--slices`` 512 x 512 slices is sent over one association by dcmtk's ``storescu``;
the clock runs from its exit (the last instance answered) to the study's scored row, polled on the
API every 50 ms. The job's timestamps split it into settling, hand-over to the broker, waiting for
a worker and processing, as the study page does.

**ingest**: ``--slices`` in total (600 by default: shorter runs last a few seconds, too few on a
2-core VM), split into 1 or 4 studies sent at once by as many
``storescu`` processes (one association each; dcmtk's compiled sender, so the sending side costs
little CPU), against dcmtk's ``storescp --fork``, pynetdicom's ``storescp`` and ``cttriage dicom
--processes 1`` and ``2`` (SQLite unless ``--database-url``; every instance fsynced and committed
before its answer, which the storescps do not do). Instances per second over the wall time from
the first sender's start to the last one's exit; the page cache is written back and the
senders' files read into it before each timing (these VMs reclaim idle page cache within
minutes, and a sender reading from disk would time the disk, not the server). Ratios are
within this run only: on the project's 2-core VMs absolute rates move by tens of percent
between runs. Each rate is printed as median (min-max) over the runs, and each ratio with its
range over the runs' pairs (a pair is measured minutes apart), so a reader sees how near the
noise a target sits.

**idle**: the CPU a server uses while 4 associations stay open and silent, pynetdicom's
``storescp`` (its association threads poll every millisecond) beside ``cttriage dicom
--processes 1`` (``app.dicom.event_driven``: they wait for their socket or their DUL's events).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python bench/latency.py`
    sys.path.insert(0, str(ROOT))

from bench.common import wait_echo, write_study  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.harness_cpu import CpuWindow  # noqa: E402
from tests.harness_servers import truncate_all  # noqa: E402
from tests.service_process import API, ServiceProcess, cttriage, embedded_service  # noqa: E402

CALLED_AET = "CTTRIAGE"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


def write_studies(out: Path, count: int, slices: int) -> list[list[Path]]:
    """``count`` phantom studies of ``slices`` 512 x 512 slices each (5 mm apart: a whole chest)."""
    from models.phantom import PhantomSpec

    return [write_study(out / f"study{i}", PhantomSpec(slices=slices, rows=512, columns=512, pixel_spacing=0.7,
                                                       slice_spacing=max(5.0, 300.0 / slices), seed=i,
                                                       severity_left=10.0 + i, severity_right=5.0)).paths
            for i in range(count)]


def storescu(files: list[Path], port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([STORESCU, "-aec", CALLED_AET, "127.0.0.1", str(port), *map(str, files)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def seconds(a: str | None, b: str | None) -> float | None:
    if a is None or b is None:
        return None
    when = [datetime.fromisoformat(v.replace("Z", "+00:00")) for v in (a, b)]
    return (when[1] - when[0]).total_seconds()


# --- latency ---------------------------------------------------------------------------------


def latency_once(work: Path, files: list[Path], study_uid: str, rule: str) -> dict[str, Any]:
    settings = {"CTTRIAGE_LOG_JSON": "true"}
    if rule == "settle only":
        settings["CTTRIAGE_SETTLE_AFTER_RELEASE_SECONDS"] = "1000000"
    with embedded_service(work, **settings) as service:
        wait_echo(service.dicom_port, CALLED_AET, service.process)
        sender = storescu(files, service.dicom_port)
        _, err = sender.communicate(timeout=600)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
        sent = time.monotonic()
        while True:
            study = API.get(f"{service.api}/api/studies/{study_uid}", timeout=10).json()
            if study.get("state") in ("scored", "failed", "rejected"):
                break
            if time.monotonic() - sent > 300:
                raise RuntimeError(f"not scored after 300 s: {study.get('state')}")
            time.sleep(0.05)
        total = time.monotonic() - sent
    job = study["jobs"][-1]
    return {
        "rule": rule, "state": study["state"], "trigger": job["trigger"], "total": total,
        "settling": seconds(study["last_received_at"], job["created_at"]),
        "to broker": seconds(job["created_at"], job["enqueued_at"]),
        "worker wait": seconds(job["enqueued_at"], job["started_at"]),
        "processing": seconds(job["started_at"], job["finished_at"]),
    }


def run_latency(work: Path, slices: int, repeat: int) -> list[dict[str, Any]]:
    import pydicom

    (files,) = write_studies(work / "latency-study", 1, slices)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    rows = []
    for i in range(repeat):
        for rule in ("settle only", "after release"):
            print(f"  latency: {rule}, run {i + 1}", file=sys.stderr, flush=True)
            run_dir = work / f"latency-{rule.replace(' ', '-')}-{i}"
            run_dir.mkdir()
            rows.append(latency_once(run_dir, files, study_uid, rule))
    return rows


def print_latency(rows: list[dict[str, Any]], slices: int) -> None:
    keys = ("total", "settling", "to broker", "worker wait", "processing")
    print(f"\nlast instance -> scored row: `cttriage serve`, {slices} x 512x512 slices, one storescu association")
    print(f"{'rule':<14} {'trigger':<9} " + " ".join(f"{k:>12}" for k in keys))
    for r in rows:
        print(f"{r['rule']:<14} {r['trigger']:<9} " + " ".join(
            f"{r[k]:>11.2f}s" if r[k] is not None else f"{'-':>12}" for k in keys))
    medians = {rule: statistics.median(r["total"] for r in rows if r["rule"] == rule)
               for rule in ("settle only", "after release")}
    print(f"median: settle only {medians['settle only']:.2f} s, after release {medians['after release']:.2f} s "
          f"({medians['settle only'] / medians['after release']:.1f}x faster)")


# --- ingest ----------------------------------------------------------------------------------


@contextmanager
def _process(command: list[str], env: dict[str, str], log: Path, port: int) -> Iterator[ServiceProcess]:
    log.parent.mkdir(parents=True, exist_ok=True)
    process = ServiceProcess(command, env, log).start()
    try:
        wait_echo(port, CALLED_AET, process)
        time.sleep(2.0)  # every child of a multi-process listener up, not only the first
        yield process
    finally:
        process.stop()


def dcmtk_storescp(work: Path, port: int) -> Any:
    out = work / "out"
    out.mkdir(parents=True)
    return _process([STORESCP, "--fork", "-aet", CALLED_AET, "-od", str(out), str(port)], {}, work / "scp.log", port)


def pynetdicom_storescp(work: Path, port: int) -> Any:
    out = work / "out"
    return _process([sys.executable, "-m", "pynetdicom", "storescp", str(port), "-aet", CALLED_AET, "-od",
                     str(out), "-q"], {}, work / "scp.log", port)


def cttriage_dicom(processes: int, database_url: str | None) -> Callable[[Path, int], Any]:
    def launch(work: Path, port: int) -> Any:
        env = {"CTTRIAGE_DATA_DIR": str(work), "CTTRIAGE_DICOM_PORT": str(port), "CTTRIAGE_MIN_FREE_BYTES": "0",
               "CTTRIAGE_DICOM_HOST": "127.0.0.1", "CTTRIAGE_SETTLE_SECONDS": "3600"}
        if database_url:
            env["CTTRIAGE_DATABASE_URL"] = database_url
        migrate = subprocess.run(cttriage("migrate"), cwd=ROOT, env={**os.environ, **env}, capture_output=True)
        if migrate.returncode != 0:
            raise RuntimeError(migrate.stderr.decode(errors="replace")[-500:])
        return _process(cttriage("dicom", "--processes", str(processes)), env, work / "dicom.log", port)

    return launch


def ingest_once(launch: Callable[[Path, int], Any], work: Path, studies: list[list[Path]]) -> float:
    """Instances per second of ``studies`` sent at once, one storescu each."""
    port = free_port()
    with launch(work, port):
        os.sync()
        for files in studies:  # the senders read from the page cache, whatever reclaimed it since
            for path in files:
                path.read_bytes()
        start = time.monotonic()
        senders = [storescu(files, port) for files in studies]
        for sender in senders:
            _, err = sender.communicate(timeout=900)
            if sender.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
        elapsed = time.monotonic() - start
    return sum(len(files) for files in studies) / elapsed


def run_ingest(work: Path, slices: int, repeat: int, database_url: str | None) -> dict[tuple[str, int], list[float]]:
    one = write_studies(work / "ingest-1", 1, slices)
    four = write_studies(work / "ingest-4", 4, slices // 4)
    servers: dict[str, Callable[[Path, int], Any]] = {
        "dcmtk storescp --fork": dcmtk_storescp,
        "pynetdicom storescp": pynetdicom_storescp,
        "cttriage --processes 1": cttriage_dicom(1, database_url),
        "cttriage --processes 2": cttriage_dicom(2, database_url),
    }
    rates: dict[tuple[str, int], list[float]] = {}
    for i in range(repeat):
        for name, launch in servers.items():
            for associations, studies in ((1, one), (4, four)):
                print(f"  ingest: {name}, {associations} association(s), run {i + 1}", file=sys.stderr, flush=True)
                if database_url and name.startswith("cttriage"):
                    truncate_all(database_url)
                run_dir = work / f"run-{i}-{name.replace(' ', '_')}-{associations}"
                rates.setdefault((name, associations), []).append(ingest_once(launch, run_dir, studies))
                shutil.rmtree(run_dir, ignore_errors=True)
    return rates


def print_ingest(rates: dict[tuple[str, int], list[float]], slices: int, database: str) -> None:
    print(f"\ningest: {slices} x 512x512 slices in total ({slices * 512 * 512 * 2 / 1e6:.0f} MB of pixels), "
          f"storescu senders, cttriage on {database}; instances/s, median of {len(next(iter(rates.values())))}")
    names = sorted({name for name, _ in rates}, key=lambda n: list(dict.fromkeys(k for k, _ in rates)).index(n))
    print(f"{'server':<24} {'1 association':>22} {'4 associations':>22}")
    median = {key: statistics.median(values) for key, values in rates.items()}

    def cell(key: tuple[str, int]) -> str:
        return f"{median[key]:.1f} ({min(rates[key]):.1f}-{max(rates[key]):.1f})"

    for name in names:
        print(f"{name:<24} {cell((name, 1)):>22} {cell((name, 4)):>22}")
    for label, ours, theirs, target in (
            ("--processes 2 / --processes 1 at 4 associations",
             ("cttriage --processes 2", 4), ("cttriage --processes 1", 4), " (target >= 1.5x)"),
            ("cttriage --processes 1 / pynetdicom storescp at 1 association",
             ("cttriage --processes 1", 1), ("pynetdicom storescp", 1), " (target >= 1.0x)"),
            ("cttriage --processes 2 / pynetdicom storescp at 1 association",
             ("cttriage --processes 2", 1), ("pynetdicom storescp", 1), "")):
        # each run's pair was measured minutes apart at most: their ratios show the spread
        per_run = [a / b for a, b in zip(rates[ours], rates[theirs], strict=True)]
        print(f"{label}: {median[ours] / median[theirs]:.2f}x{target}; "
              f"per run {min(per_run):.2f}-{max(per_run):.2f}x")


# --- idle associations -----------------------------------------------------------------------


def idle_once(launch: Callable[[Path, int], Any], work: Path, associations: int, seconds: float) -> float:
    """Percent of a core the server uses while ``associations`` Verification associations stay open
    and silent (a PACS may hold its associations between studies)."""
    from pynetdicom import AE

    port = free_port()
    with launch(work, port) as server:
        ae = AE(ae_title="BENCH_IDLE")
        ae.add_requested_context("1.2.840.10008.1.1")
        assocs = [ae.associate("127.0.0.1", port, ae_title=CALLED_AET) for _ in range(associations)]
        try:
            if not all(assoc.is_established for assoc in assocs):
                raise RuntimeError("an idle association was not accepted")
            time.sleep(1.0)
            window = CpuWindow({"server": [server]}).start()
            time.sleep(seconds)
            cpu, _, elapsed = window.end()
        finally:
            for assoc in assocs:
                assoc.release()
    return 100.0 * cpu["server"] / elapsed


def run_idle(work: Path, associations: int, repeat: int) -> dict[str, list[float]]:
    servers: dict[str, Callable[[Path, int], Any]] = {
        "pynetdicom storescp": pynetdicom_storescp,
        "cttriage --processes 1": cttriage_dicom(1, None),
    }
    usage: dict[str, list[float]] = {}
    for i in range(repeat):
        for name, launch in servers.items():
            print(f"  idle: {name}, run {i + 1}", file=sys.stderr, flush=True)
            run_dir = work / f"idle-{i}-{name.replace(' ', '_')}"
            usage.setdefault(name, []).append(idle_once(launch, run_dir, associations, 5.0))
            shutil.rmtree(run_dir, ignore_errors=True)
    return usage


def print_idle(usage: dict[str, list[float]], associations: int) -> None:
    print(f"\nidle: {associations} open, silent associations; server CPU in % of one core over 5 s, "
          f"median of {len(next(iter(usage.values())))}")
    for name, values in usage.items():
        print(f"{name:<24} {statistics.median(values):>6.1f} %")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "latency", "ingest", "idle"], default="all")
    parser.add_argument("--slices", type=int, default=0, help="latency: 80; ingest: 600 in total")
    parser.add_argument("--repeat", type=int, default=0, help="latency: 1; ingest: 3")
    parser.add_argument("--database-url", help="ingest: cttriage on this database (default: SQLite)")
    parser.add_argument("--workdir", help="where studies and servers' files go (default: a temporary folder)")
    args = parser.parse_args(argv)
    for tool in (STORESCU, STORESCP):
        if not Path(tool).exists():
            parser.error(f"{tool} is missing: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="cttriage-latency-", dir=args.workdir) as tmp:
        work = Path(tmp)
        if args.part in ("all", "latency"):
            slices = args.slices or 80
            print_latency(run_latency(work, slices, args.repeat or 1), slices)
        if args.part in ("all", "ingest"):
            slices = args.slices or 600
            rates = run_ingest(work, slices, args.repeat or 3, args.database_url)
            print_ingest(rates, slices, "PostgreSQL" if args.database_url else "SQLite")
        if args.part in ("all", "idle"):
            print_idle(run_idle(work, 4, args.repeat or 3), 4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
