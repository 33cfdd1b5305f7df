"""C-STORE ingest throughput: cttriage's listener against pynetdicom's bare ``storescp``.

A hand-run benchmark, not a test::

    python bench/ingest.py                 # 300 slices of 512x512, 3 repeats
    python bench/ingest.py --slices 100 --repeat 5

It writes one synthetic CT study (``models.phantom``, 512x512 slices), then, for each repeat and
each server, starts the server in a subprocess on a free port, warms it up with a small separate
study (``--warmup``, untimed) and sends the whole study over one association with a pynetdicom
SCU, timing from the first C-STORE request to the last response.
The page cache is flushed (``os.sync``) before each timing, since the baseline does not fsync.
The servers:

* ``baseline``: ``python -m pynetdicom storescp`` writing files to a temporary folder (no fsync,
  no database);
* ``cttriage``: :func:`app.dicom.listener.serve_listener` with a fresh SQLite database, writing
  each instance with fsync and committing its record before answering.

Both get the same maximum PDU (``--max-pdu``; 0, unlimited, is the listener's default). The SCU
streams each file's dataset bytes as they are (no decode and re-encode on the sending side), so
the timing is dominated by the receiving server. Besides the wall-clock rate it reports each
server's CPU time per instance (Linux only).

``--workdir /dev/shm/...`` puts both servers' storage (and our SQLite file) on tmpfs, where fsync
costs nothing: the difference to a run on disk is what per-instance durability costs on that disk.

On the project's 2-core VMs, writing into memory the guest has not touched lately costs about
3 ms per MB, ten times a warm page-cache write (the host seems to take freed guest memory back; the
virtio-balloon driver is loaded). It hits both servers, but comes and goes with what ran before:
compare only runs of one invocation, and take medians over several repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python bench/ingest.py`
    sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
from pynetdicom import AE, _config  # noqa: E402

from bench.common import wait_echo, write_study  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.harness_cpu import process_cpu_seconds  # noqa: E402
from tests.service_process import ServiceProcess  # noqa: E402

CALLED_AET = "BENCH_SCP"
CALLING_AET = "BENCH_SCU"

OUR_LISTENER = textwrap.dedent(
    """
    from app.db.models import Base
    from app.db.session import make_session_factory
    from app.dicom.listener import serve_listener
    from app.settings import Settings

    settings = Settings()  # from the CTTRIAGE_* environment the benchmark sets
    factory = make_session_factory(settings)
    Base.metadata.create_all(factory.kw["bind"])
    serve_listener(settings, factory)
    """
)


# --- the study and the servers ------------------------------------------------------------


def phantom_files(out_dir: Path, slices: int) -> list[Path]:
    """The benchmark study: one axial series of the project's chest phantom."""
    from models.phantom import PhantomSpec

    return write_study(out_dir, PhantomSpec(slices=slices, rows=512, columns=512)).paths


@dataclass(frozen=True)
class Server:
    name: str
    #: (port, work folder, max PDU) -> command and extra environment
    command: Callable[[int, Path, int], tuple[list[str], dict[str, str]]]
    #: work folder -> how many instances it kept
    kept: Callable[[Path], int]


def _baseline_command(port: int, work: Path, max_pdu: int) -> tuple[list[str], dict[str, str]]:
    out = work / "out"
    return (
        [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-aet", CALLED_AET, "-ba", "127.0.0.1",
         "-pdu", str(max_pdu), "-od", str(out), "-q"],
        {},
    )


def _ours_command(port: int, work: Path, max_pdu: int) -> tuple[list[str], dict[str, str]]:
    env = {
        "CTTRIAGE_DATA_DIR": str(work),
        "CTTRIAGE_AE_TITLE": CALLED_AET,
        "CTTRIAGE_DICOM_HOST": "127.0.0.1",
        "CTTRIAGE_DICOM_PORT": str(port),
        "CTTRIAGE_MAX_PDU": str(max_pdu),
    }
    return [sys.executable, "-c", OUR_LISTENER], env


def _ours_kept(work: Path) -> int:
    import sqlite3

    with sqlite3.connect(work / "cttriage.sqlite") as db:
        return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])


SERVERS = (
    Server("baseline", _baseline_command, lambda work: sum(1 for _ in (work / "out").iterdir())),
    Server("cttriage", _ours_command, _ours_kept),
)


@contextmanager
def running(server: Server, work: Path, max_pdu: int) -> Iterator[tuple[int, int]]:
    """The server on a free port, answering C-ECHO; yields the port and its process id."""
    port = free_port()
    command, env = server.command(port, work, max_pdu)
    process = ServiceProcess(command, env, work / "server.log").start()
    try:
        wait_echo(port, CALLED_AET, process)
        assert process.proc is not None
        yield port, process.proc.pid
    finally:
        process.stop()


# --- the measurement -----------------------------------------------------------------------


def send_study(port: int, paths: list[Path], associations: int = 1) -> float:
    """Send every file, split over ``associations`` concurrent associations (round robin);
    seconds from the first request to the last response."""
    meta = pydicom.dcmread(paths[0], stop_before_pixels=True)
    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(meta.SOPClassUID, meta.file_meta.TransferSyntaxUID)
    ae.maximum_pdu_size = 0
    assocs = [ae.associate("127.0.0.1", port, ae_title=CALLED_AET) for _ in range(associations)]
    if not all(assoc.is_established for assoc in assocs):
        raise RuntimeError("association was not established")
    shares = [paths[i::associations] for i in range(associations)]
    failed: list[str] = []

    def send(assoc: Any, share: list[Path]) -> None:
        failed.extend(p.name for p in share if assoc.send_c_store(p).get("Status") != 0)  # None: aborted

    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(associations) as pool:
            list(pool.map(send, assocs, shares))
        elapsed = time.perf_counter() - started
    finally:
        for assoc in assocs:
            assoc.release()
    if failed:
        raise RuntimeError(f"{len(failed)} C-STORE failures, first {failed[0]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300, help="slices in the study (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per server (default 3)")
    parser.add_argument("--max-pdu", type=int, default=0, help="both servers' maximum PDU (default 0: unlimited)")
    parser.add_argument("--associations", type=int, default=1,
                        help="concurrent associations the study is split over (default 1)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="slices of a separate study each server gets, untimed, before the timed one "
                             "(default 20; 0: none): a listener runs for months, so its first instances "
                             "(imports, caches, a new database file) are not what is measured")
    parser.add_argument("--workdir", type=Path, help="keep the study and the received files here")
    args = parser.parse_args(argv)

    _config.STORE_SEND_CHUNKED_DATASET = True  # send file bytes as they are
    with tempfile.TemporaryDirectory(prefix="cttriage-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        started = time.perf_counter()
        paths = phantom_files(workdir / "study", args.slices)
        warmup = phantom_files(workdir / "warmup", args.warmup) if args.warmup else []
        os.sync()  # no dirty pages left over to slow down the first server's fsyncs
        total_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"study: {len(paths)} instances, {total_mb:.1f} MB (written in {time.perf_counter() - started:.1f} s), "
              f"{args.associations} association(s), max PDU {args.max_pdu or 'unlimited'}, "
              f"warm-up {len(warmup)} instances")

        times: dict[str, list[float]] = {server.name: [] for server in SERVERS}
        cpu: dict[str, list[float]] = {server.name: [] for server in SERVERS}
        for repeat in range(args.repeat):
            for server in SERVERS:  # interleaved, so drift hits both alike
                work = workdir / f"{server.name}-{repeat}"
                work.mkdir(parents=True)
                with running(server, work, args.max_pdu) as (port, pid):
                    if warmup:
                        send_study(port, warmup)
                        os.sync()
                    # On a small shared VM the wall-clock figures drift by 10-20 % between repeats; the
                    # server's CPU time per instance is much steadier: did a change make it cheaper?
                    cpu_before = process_cpu_seconds(pid)
                    times[server.name].append(send_study(port, paths, args.associations))
                    cpu_after = process_cpu_seconds(pid)
                if cpu_before is not None and cpu_after is not None:
                    cpu[server.name].append(cpu_after - cpu_before)
                os.sync()  # the baseline does not fsync: flush its writes outside the next timing
                kept = server.kept(work)
                if kept != len(paths) + len(warmup):
                    raise RuntimeError(f"{server.name} kept {kept} of {len(paths) + len(warmup)} instances")

        print(f"\n{'server':<10} {'run':>4} {'seconds':>8} {'inst/s':>8} {'MB/s':>8} {'CPU ms/inst':>12}")
        for name, runs in times.items():
            cpu_ms = [c / len(paths) * 1e3 for c in cpu[name]] or [float("nan")] * len(runs)
            for i, seconds in enumerate(runs):
                print(f"{name:<10} {i + 1:>4} {seconds:>8.2f} {len(paths) / seconds:>8.1f} {total_mb / seconds:>8.1f} "
                      f"{cpu_ms[i]:>12.2f}")
            median = statistics.median(runs)
            print(f"{name:<10} {'med':>4} {median:>8.2f} {len(paths) / median:>8.1f} {total_mb / median:>8.1f} "
                  f"{statistics.median(cpu_ms):>12.2f}")
        ratio = statistics.median(times["baseline"]) / statistics.median(times["cttriage"])
        print(f"\nratio cttriage/baseline (instances/s, medians): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
