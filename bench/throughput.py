"""End-to-end scoring throughput and latency of the production processes, by worker count.

A hand-run benchmark, not a test::

    python bench/throughput.py                       # 12 studies, workers 1 and 2
    python bench/throughput.py --studies 24 --workers 1,2,3 --out bench-throughput.json
    python bench/throughput.py --worker-mode processes   # W `worker --concurrency 1` processes

It needs the local PostgreSQL (127.0.0.1:5432, trust auth, admin database ``test``) and Redis
(127.0.0.1:6379) that the tests use (``scripts/services.sh`` starts them). It creates its own
database ``cttriage_bench_<hex>`` (migrated with Alembic, truncated between worker counts, dropped
at the end), uses Redis database 12 (flushed before, between and after) and a temporary folder
for the studies, storage and logs (``--keep DIR`` keeps them).

What it does:

1. Generates ``--studies`` phantom studies once (``models.phantom``; default 60 slices of
   256x256 at 1.4 mm pixels, 5 mm apart: 60 instances, 7.9 MB a study), each with its own UIDs,
   seed and severities (the worse lung spread over 0..80 %), plus warm-up and drain studies.
2. For each worker count W in ``--workers``: starts ``cttriage dicom``, ``cttriage api`` and the
   worker(s) as separate processes with the tests' harness (``tests/deployment.py``; each process in
   its own process group) with
   ``CTTRIAGE_SETTLE_SECONDS`` (default 2 s) and ``CTTRIAGE_ASSEMBLER_INTERVAL_SECONDS`` (0.5 s).
   In the default ``--worker-mode prefork`` that is ONE ``cttriage worker --concurrency W``
   (Celery prefork pool; W=1 is the solo pool), in ``--worker-mode processes`` W separate
   ``cttriage worker --concurrency 1`` processes (solo pools; note they all get the same Celery
   node name, ``cttriage-cpu@<host>``, since ``cttriage worker`` has no option to change it).
   Then:

   * warm-up: W studies pushed and scored first, so that every worker process has imported
     numpy/scipy and opened its database pool (cold start is not measured);
   * end to end (the timed batch): all studies pushed by 4 concurrent senders (``--senders``),
     each study over its own association (``app.dicom.push.push_files``), while the poller reads
     ``/api/worklist`` every ``--poll`` s until every study is scored (or failed/rejected);
   * drain (``--no-drain`` skips it): as many other studies received by a listener whose settle
     time never ends, then a listener with the normal settle time queues them all in one pass and
     the warm workers empty the queue with no ingest competing: the workers' own throughput.

   Senders are processes by default (``--sender-kind``); see ``bench.senders.SenderPool`` for why
   not threads.
3. Reads the database (``studies``, ``jobs``) and reports per worker count:

   * studies per minute: N / (last ``scored_at`` - first push started), and the same with the
     time the API first showed the last study scored;
   * per study latency from its last instance received (``studies.last_received_at``) to
     scored (``studies.scored_at``; and to first seen scored by the API poller), p50/p95/max.
     It contains the settle time (a study is only queued after ``settle_seconds`` without new
     instances, checked every assembler interval), so it is also reported minus
     ``settle_seconds`` and broken down: settle wait (last received -> job created), dispatch
     (-> on the broker), queue wait (-> worker started), job run (-> finished) and pure scoring
     (``jobs.timings.total``);
   * ingest time, the CPU seconds each component used in the timed window (PostgreSQL and Redis
     counted over all their clients, and whatever else ran on the machine), the most jobs that
     ran at once, and the largest severity error against the phantom truth (a sanity check).

   Percentiles are linear interpolations over N values; with N=12 the p95 is nearly the max.
   The scaling ratios are studies/min with W workers over studies/min with the first worker
   count, end to end and drain. ``--out`` writes everything (per-study rows included) as JSON.

All started processes are stopped (SIGTERM to their process group, then SIGKILL) on exit, Ctrl-C,
SIGTERM or error; the database is dropped and the Redis database flushed (``tests/harness_servers.py``).
The tables are printed by ``bench/throughput_report.py``; the CPU accounting is ``tests/harness_cpu.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python bench/throughput.py`
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.common import StudyFiles, progress, write_study  # noqa: E402
from bench.senders import PushLog, SenderPool, push_all  # noqa: E402
from bench.study_rows import TERMINAL, describe_stuck, read_study_rows, restarted, server_epochs  # noqa: E402
from bench.throughput_report import RunConfig, print_run, print_summary, summarise, summarise_drain  # noqa: E402
from tests.conftest import PG_ADMIN_URL  # noqa: E402
from tests.deployment import Deployment, start_deployment  # noqa: E402
from tests.harness_cpu import CpuWindow, wait_quiet  # noqa: E402
from tests.harness_servers import create_database, drop_database, flushed_redis, truncate_all  # noqa: E402
from tests.service_process import API, ServiceProcess, wait_listening  # noqa: E402

#: The CPU accounting's name for this process group: the poller and the sender processes.
OWN_CPU = "bench (senders, poller)"


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def severities(i: int, n: int) -> tuple[float, float]:
    """Varied severities: the worse lung spread over 0..80 %, the other one a fraction of it."""
    worst = 80.0 * i / max(n - 1, 1)
    other = worst * ((i * 37) % 5) / 8.0
    return (worst, other) if i % 2 == 0 else (other, worst)


def generate_studies(out: Path, n: int, *, slices: int, size: int, pixel_spacing: float, slice_spacing: float,
                     seed0: int, label: str) -> list[StudyFiles]:
    """``n`` phantom studies, each with its own UIDs, seed and severities."""
    from models.phantom import PhantomSpec

    studies = []
    for i in range(n):
        left, right = severities(i, n)
        spec = PhantomSpec(slices=slices, rows=size, columns=size, pixel_spacing=pixel_spacing,
                           slice_spacing=slice_spacing, severity_left=left, severity_right=right, seed=seed0 + i)
        studies.append(write_study(out / f"{label}{i:03d}", spec, accession=f"BENCH{label.upper()}{i:04d}",
                                   patient_id=f"BENCH{i:04d}"))
    if len({s.uid for s in studies}) != n:
        raise RuntimeError("generated studies do not have distinct UIDs")
    return studies


def poll_until_terminal(deployment: Deployment, uids: set[str], interval: float, timeout: float,
                        db_url: str) -> tuple[dict[str, float], dict[str, str]]:
    """Poll the worklist until every study in ``uids`` is terminal; stop at once if a service exits.

    Returns when the API first showed each study terminal (bench clock, epoch s) and its state.
    """
    seen: dict[str, float] = {}
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + 15
    while True:
        now = time.time()
        try:
            response = API.get(f"{deployment.api}/api/worklist", params={"limit": 500}, timeout=10)
            if response.status_code in (401, 403):
                raise RuntimeError(f"the API refused the benchmark's key: {response.text[:300]}")
            items = response.json()["items"]
        except (httpx.HTTPError, KeyError, ValueError):
            items = []
        for item in items:
            uid = item["study_uid"]
            if uid in uids and uid not in seen and item["state"] in TERMINAL:
                seen[uid] = now
                states[uid] = item["state"]
        if len(seen) == len(uids):
            return seen, states
        if time.monotonic() >= next_report:
            progress(f"  {len(seen)}/{len(uids)} studies scored (or failed/rejected) so far")
            next_report = time.monotonic() + 15
        dead = deployment.dead()
        if dead:
            raise RuntimeError(f"service process(es) exited during the run: {', '.join(dead)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(uids) - len(seen)} of {len(uids)} studies not terminal after "
                               f"{timeout:.0f} s:\n{describe_stuck(db_url, uids - set(seen))}")
        time.sleep(interval)


def start_services(cfg: RunConfig, db_url: str, redis_url: str, run_dir: Path) -> Deployment:
    """`cttriage dicom`, `cttriage api` and the workers of ``cfg``, every one of them ready."""
    deployment = start_deployment(run_dir, db_url, redis_url, workers=0, settle_seconds=str(cfg.settle),
                                  assembler_interval_seconds=str(cfg.assembler_interval),
                                  api_host="127.0.0.1", dicom_host="127.0.0.1")
    processes, concurrency = (1, cfg.workers) if cfg.mode == "prefork" else (cfg.workers, 1)
    try:
        for i in range(processes):
            deployment.start(f"worker{i}", "worker", "--device", "cpu", "--concurrency", str(concurrency))
        deployment.wait_ready()
    except BaseException:
        deployment.stop()
        raise
    return deployment


def push_and_wait(d: Deployment, studies: list[StudyFiles], pool: SenderPool, stop: threading.Event,
                  cfg: RunConfig, db_url: str, what: str) -> None:
    """Push ``studies`` (untimed) and wait until they are terminal."""
    log = PushLog()
    push_all(studies, d.dicom_port, pool, log, stop)
    if log.failures:
        print(f"warning: {what} push trouble: {log.failures[:3]}", file=sys.stderr)
    poll_until_terminal(d, {s.uid for s in studies}, cfg.poll, cfg.timeout, db_url)


def timed_batch(d: Deployment, studies: list[StudyFiles], pool: SenderPool, stop: threading.Event, cfg: RunConfig,
                db_url: str, redis_url: str) -> dict[str, Any]:
    """The timed end-to-end window: pushes, settling and scoring all at once."""
    epochs0 = server_epochs(db_url, redis_url)
    window = CpuWindow({"dicom": [d.processes["dicom"]], "api": [d.processes["api"]], "worker": d.workers()},
                       OWN_CPU).start()
    log = PushLog()
    t_first_push = time.time()
    pusher = threading.Thread(target=push_all, args=(studies, d.dicom_port, pool, log, stop), name="pusher",
                              daemon=True)
    pusher.start()
    seen, api_states = poll_until_terminal(d, {s.uid for s in studies}, cfg.poll, cfg.timeout, db_url)
    while pusher.is_alive():
        pusher.join(0.2)
    cpu, busy, wall = window.end()
    return {"log": log, "seen": seen, "api_states": api_states, "t_first_push": t_first_push, "cpu": cpu,
            "busy": busy, "wall": wall, "restarts": restarted(epochs0, server_epochs(db_url, redis_url))}


def drain_batch(d: Deployment, drain: list[StudyFiles], pool: SenderPool, stop: threading.Event, cfg: RunConfig,
                db_url: str, redis_url: str) -> dict[str, Any]:
    """The same number of studies received first by a listener whose settle time never ends, then a
    listener with the normal settle time queues them all in one pass and the (warm) workers empty the
    queue with nothing else to do: the workers' own throughput, without ingest."""
    d.retire("dicom")
    hold = d.start("dicom-hold", "dicom", env={"CTTRIAGE_SETTLE_SECONDS": "86400"})
    wait_listening(d.dicom_port, hold)
    log = PushLog()
    push_all(drain, d.dicom_port, pool, log, stop)
    if log.failures:
        print(f"warning: drain push trouble: {log.failures[:3]}", file=sys.stderr)
    d.retire("dicom-hold")
    epochs0 = server_epochs(db_url, redis_url)
    listener: list[ServiceProcess] = []  # started inside the window, so that its start-up counts
    window = CpuWindow({"dicom": listener, "api": [d.processes["api"]], "worker": d.workers()}, OWN_CPU).start()
    listener.append(d.start("dicom-release", "dicom"))
    poll_until_terminal(d, {s.uid for s in drain}, cfg.poll, cfg.timeout, db_url)
    cpu, busy, wall = window.end()
    result = summarise_drain(read_study_rows(db_url, [s.uid for s in drain]), drain, cpu, busy, wall)
    result["servers_restarted"] = restarted(epochs0, server_epochs(db_url, redis_url))
    return result


def run_once(cfg: RunConfig, studies: list[StudyFiles], warmups: list[StudyFiles], drain: list[StudyFiles],
             db_url: str, redis_url: str, workdir: Path, pool: SenderPool) -> dict[str, Any]:
    """One worker count: warm-up, the timed end-to-end batch and the drain, on a fresh deployment."""
    import redis

    run_dir = workdir / f"run-w{cfg.workers}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    truncate_all(db_url)
    redis.Redis.from_url(redis_url).flushdb()
    stop = threading.Event()
    drain_result: dict[str, Any] | None = None
    progress(f"workers={cfg.workers}: starting the services (logs in {run_dir})")
    d = start_services(cfg, db_url, redis_url, run_dir)
    try:
        progress(f"workers={cfg.workers}: dicom, api and {len(d.workers())} worker process(es) ready; warm-up")
        # Warm-up: every worker process imports numpy/scipy and opens its pool before the timing.
        if warmups:
            push_and_wait(d, warmups, pool, stop, cfg, db_url, "warm-up")
        if cfg.wait_quiet:
            wait_quiet(cfg.wait_quiet, progress)
        progress(f"workers={cfg.workers}: end-to-end batch of {len(studies)} studies")
        e2e = timed_batch(d, studies, pool, stop, cfg, db_url, redis_url)
        if drain:
            if cfg.wait_quiet:
                wait_quiet(cfg.wait_quiet, progress)
            progress(f"workers={cfg.workers}: drain batch of {len(drain)} studies")
            drain_result = drain_batch(d, drain, pool, stop, cfg, db_url, redis_url)
    except BaseException as exc:
        stop.set()
        if isinstance(exc, Exception):
            print(f"--- log tails (full logs in {run_dir})\n{d.logs()}", file=sys.stderr)
        raise
    finally:
        d.stop()

    log: PushLog = e2e["log"]
    if log.failures:
        print(f"warning: {len(log.failures)} push failures, first: {log.failures[0]}", file=sys.stderr)
    rows = read_study_rows(db_url, [s.uid for s in studies])
    result = summarise(cfg, studies, rows, {s.uid: s for s in studies}, log, e2e["seen"], e2e["api_states"],
                       e2e["t_first_push"], e2e["wall"], e2e["cpu"], e2e["busy"], run_dir)
    result["drain"] = drain_result
    result["servers_restarted"] = e2e["restarts"]
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=12, help="studies in the timed batch (default 12)")
    parser.add_argument("--slices", type=int, default=60, help="slices per study (default 60)")
    parser.add_argument("--size", type=int, default=256, help="rows and columns (default 256)")
    parser.add_argument("--pixel-spacing", type=float, default=1.4, help="mm (default 1.4)")
    parser.add_argument("--slice-spacing", type=float, default=5.0, help="mm (default 5)")
    parser.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated (default 1,2)")
    parser.add_argument("--worker-mode", choices=("prefork", "processes"), default="prefork",
                        help="prefork: one `worker --concurrency W` (default); processes: W `--concurrency 1`")
    parser.add_argument("--settle", type=float, default=2.0, help="CTTRIAGE_SETTLE_SECONDS (default 2)")
    parser.add_argument("--assembler-interval", type=float, default=0.5,
                        help="CTTRIAGE_ASSEMBLER_INTERVAL_SECONDS (default 0.5)")
    parser.add_argument("--senders", type=int, default=4, help="concurrent senders (default 4)")
    parser.add_argument("--sender-kind", choices=("processes", "threads"), default="processes",
                        help="senders are processes (default) or threads of this process (see bench/senders.py)")
    parser.add_argument("--poll", type=float, default=0.25, help="API poll interval, s (default 0.25)")
    parser.add_argument("--scu-race-workaround", action=argparse.BooleanOptionalAction, default=True,
                        help="in the senders, put back C-STORE responses pynetdicom's requestor reactor "
                             "took by mistake (see bench/senders.py; default: on)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up studies before each timed batch (default: the worker count; 0: none)")
    parser.add_argument("--drain", action=argparse.BooleanOptionalAction, default=True,
                        help="after the end-to-end batch, also time the workers emptying a queue of --studies "
                             "studies received beforehand (default: on)")
    parser.add_argument("--timeout", type=float, default=300, help="per batch, s (default 300)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed batch, wait up to this long for the machine to be under 15 %% "
                             "busy (a shared machine; default 0: do not wait)")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", type=Path, help="keep studies, storage and logs in this folder")
    args = parser.parse_args(argv)
    args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if not args.worker_counts or min(args.worker_counts) < 1:
        parser.error("--workers needs positive integers")
    return args


def run_all(args: argparse.Namespace, pool: SenderPool, redis_url: str, workdir: Path,
            db_url: str) -> list[dict[str, Any]]:
    """Generate the studies, then run and print each worker count."""
    started = time.perf_counter()
    geometry = dict(slices=args.slices, size=args.size, pixel_spacing=args.pixel_spacing,
                    slice_spacing=args.slice_spacing)
    studies = generate_studies(workdir / "studies", args.studies, seed0=1000, label="s", **geometry)
    n_warm = max(args.worker_counts) if args.warmup is None else args.warmup
    warmups = generate_studies(workdir / "warmup", n_warm, seed0=9000, label="w", **geometry) if n_warm else []
    drain = generate_studies(workdir / "drain", args.studies, seed0=5000, label="d", **geometry) if args.drain else []
    mb = sum(s.size_bytes for s in studies) / 1e6
    print(f"generated {len(studies)} studies ({args.slices} slices {args.size}x{args.size}, "
          f"{args.pixel_spacing} mm pixels, {args.slice_spacing} mm apart; {mb:.1f} MB) and {len(warmups)} "
          f"warm-up and {len(drain)} drain studies in {time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs")
    print(f"database {db_url.rsplit('/', 1)[1]}, broker {redis_url}, work folder {workdir}")
    results = []
    for w in args.worker_counts:
        cfg = RunConfig(workers=w, mode=args.worker_mode, settle=args.settle,
                        assembler_interval=args.assembler_interval, senders=args.senders,
                        sender_kind=args.sender_kind, poll=args.poll, wait_quiet=args.wait_quiet,
                        timeout=args.timeout)
        result = run_once(cfg, studies, warmups[: (w if args.warmup is None else n_warm)], drain, db_url,
                          redis_url, workdir, pool)
        results.append(result)
        print_run(result)
        if not args.keep:
            shutil.rmtree(workdir / f"run-w{w}" / "storage", ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The sender processes fork now, before this process has threads or connections.
    pool = SenderPool(args.sender_kind, args.senders, args.scu_race_workaround)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    db_url: str | None = None
    try:
        with flushed_redis(args.redis_db) as redis_url, \
                tempfile.TemporaryDirectory(prefix="cttriage-bench-") as tmp:
            workdir = args.keep or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            db_url = create_database("cttriage_bench", admin_url=args.pg_admin_url)
            results = run_all(args, pool, redis_url, workdir, db_url)
            print_summary(results)
            if args.out:
                payload = {"argv": sys.argv, "args": {k: str(v) for k, v in vars(args).items()},
                           "started": datetime.now(UTC).isoformat(), "runs": results}
                args.out.write_text(json.dumps(payload, indent=2, default=str))
                print(f"\nwrote {args.out}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        pool.close()
        if db_url:
            try:
                drop_database(db_url, args.pg_admin_url)
            except Exception as exc:  # report, the rest is cleaned up already
                print(f"could not drop database {db_url}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
