"""The throughput benchmark's results: one run's figures from the database rows and the push log,
and the tables printed for a person to read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import StudyFiles, pct
from bench.senders import PushLog


@dataclass
class RunConfig:
    """One worker count's run: how the workers, listener and senders were set up."""

    workers: int
    mode: str  # prefork or processes
    settle: float
    assembler_interval: float
    senders: int
    sender_kind: str
    poll: float
    timeout: float
    wait_quiet: float = 0.0


def seconds(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else (b - a).total_seconds()


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def peak_concurrency(rows: dict[str, dict[str, Any]]) -> int:
    """Most jobs running at once, from the jobs' started/finished times."""
    events = []
    for row in rows.values():
        for j in row["jobs"]:
            if j["started_at"] and j["finished_at"]:
                events += [(j["started_at"], 1), (j["finished_at"], -1)]
    running = peak = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        running += d
        peak = max(peak, running)
    return peak


def summarise_drain(rows: dict[str, dict[str, Any]], studies: list[StudyFiles], cpu: dict[str, float], busy: float,
                    wall: float) -> dict[str, Any]:
    jobs = [row["jobs"][-1] for row in rows.values() if row["jobs"]]
    scored = [row for row in rows.values() if row["state"] == "scored"]
    first_queued = min((j["created_at"] for j in jobs), default=None)
    last_queued = max((j["created_at"] for j in jobs), default=None)
    last_scored = max((row["scored_at"] for row in scored), default=None)
    span = seconds(first_queued, last_scored)
    metrics = {}
    for key, values in {
        "queue_wait_s": [seconds(j["enqueued_at"], j["started_at"]) for j in jobs],
        "job_run_s": [seconds(j["started_at"], j["finished_at"]) for j in jobs],
        "scoring_total_s": [(j["timings"] or {}).get("total") for j in jobs],
    }.items():
        vals = [v for v in values if v is not None]
        metrics[key] = {"p50": pct(vals, 50), "p95": pct(vals, 95), "max": max(vals, default=None), "n": len(vals)}
    return {
        "studies": len(studies),
        "scored": len(scored),
        "queued_within_s": seconds(first_queued, last_queued),
        "span_s": span,
        "studies_per_min": len(studies) * 60.0 / span if span else None,
        "metrics": metrics,
        "scoring_seconds_sum": round(sum((j["timings"] or {}).get("total") or 0.0 for j in jobs), 2),
        "peak_concurrent_jobs": peak_concurrency(rows),
        "cpu_seconds_in_window": cpu,
        "window_seconds": round(wall, 2),
        "machine_cpu_busy": round(busy, 3),
    }


def summarise(cfg: RunConfig, studies: list[StudyFiles], rows: dict[str, dict[str, Any]],
              truth: dict[str, StudyFiles], log: PushLog, seen: dict[str, float], api_states: dict[str, str],
              t_first_push: float, wall: float, cpu: dict[str, float], busy: float, run_dir: Path) -> dict[str, Any]:
    t0 = utc(t_first_push)
    per_study: list[dict[str, Any]] = []
    for s in studies:
        row = rows.get(s.uid)
        if row is None:
            per_study.append({"study_uid": s.uid, "state": "missing"})
            continue
        jobs = row["jobs"]
        last_job = jobs[-1] if jobs else {}
        rec: dict[str, Any] = {
            "study_uid": s.uid,
            "state": row["state"],
            "reason": row["reason"],
            "version": row["version"],
            "jobs": len(jobs),
            "instances": row["instance_count"],
            "expected_instances": len(s.paths),
            "push_started_s": round(log.started.get(s.uid, float("nan")) - t_first_push, 3),
            "push_finished_s": round(log.finished.get(s.uid, float("nan")) - t_first_push, 3),
            "last_received_s": seconds(t0, row["last_received_at"]),
            "scored_s": seconds(t0, row["scored_at"]),
            "api_seen_s": round(seen[s.uid] - t_first_push, 3) if s.uid in seen else None,
            "latency_s": seconds(row["last_received_at"], row["scored_at"]),
            "latency_api_s": (seen[s.uid] - row["last_received_at"].timestamp()) if s.uid in seen else None,
            "settle_wait_s": seconds(row["last_received_at"], last_job.get("created_at")),
            "dispatch_s": seconds(last_job.get("created_at"), last_job.get("enqueued_at")),
            "queue_wait_s": seconds(last_job.get("enqueued_at"), last_job.get("started_at")),
            "job_run_s": seconds(last_job.get("started_at"), last_job.get("finished_at")),
            "scoring_total_s": (last_job.get("timings") or {}).get("total"),
            "timings": last_job.get("timings"),
            "worker": last_job.get("worker"),
            "severity_error": (max(abs(row["severity_left"] - s.truth_left), abs(row["severity_right"] - s.truth_right))
                               if row["severity_left"] is not None else None),
        }
        rec["latency_minus_settle_s"] = None if rec["latency_s"] is None else rec["latency_s"] - cfg.settle
        per_study.append(rec)

    def col(key: str) -> list[float]:
        return [r[key] for r in per_study if r.get(key) is not None]

    scored = [r for r in per_study if r.get("state") == "scored"]
    last_scored = max(col("scored_s"), default=None)
    last_seen = max(col("api_seen_s"), default=None)
    pushed_end = max((v for v in log.finished.values()), default=t_first_push) - t_first_push
    n = len(studies)
    instances = sum(len(s.paths) for s in studies)
    size = sum(s.size_bytes for s in studies)

    peak = peak_concurrency({uid: row for uid, row in rows.items() if uid in truth})

    metrics = {}
    for key in ("latency_s", "latency_minus_settle_s", "latency_api_s", "settle_wait_s", "dispatch_s",
                "queue_wait_s", "job_run_s", "scoring_total_s"):
        values = col(key)
        metrics[key] = {"p50": pct(values, 50), "p95": pct(values, 95), "max": max(values, default=None),
                        "n": len(values)}
    scoring_sum = sum(col("scoring_total_s"))
    return {
        "workers": cfg.workers,
        "worker_mode": cfg.mode,
        "worker_processes": (f"1 x `cttriage worker --concurrency {cfg.workers}`" if cfg.mode == "prefork"
                             else f"{cfg.workers} x `cttriage worker --concurrency 1`"),
        "settle_seconds": cfg.settle,
        "assembler_interval_seconds": cfg.assembler_interval,
        "senders": cfg.senders,
        "sender_kind": cfg.sender_kind,
        "studies": n,
        "scored": len(scored),
        "not_scored": [{"study_uid": r["study_uid"], "state": r.get("state"), "reason": r.get("reason")}
                       for r in per_study if r.get("state") != "scored"],
        "reopened_studies": sum(1 for r in per_study if (r.get("version") or 1) > 1 or (r.get("jobs") or 1) > 1),
        "instances": instances,
        "megabytes": round(size / 1e6, 1),
        "push_failures": log.failures,
        "scu_responses_rescued": log.rescued,
        "ingest_seconds": round(pushed_end, 3),
        "ingest_instances_per_s": round(instances / pushed_end, 1) if pushed_end > 0 else None,
        "makespan_scored_s": last_scored,
        "makespan_api_s": last_seen,
        "studies_per_min": (n * 60.0 / last_scored) if last_scored else None,
        "studies_per_min_api": (n * 60.0 / last_seen) if last_seen else None,
        "metrics": metrics,
        "scoring_seconds_sum": round(scoring_sum, 2),
        "peak_concurrent_jobs": peak,
        "cpu_seconds_in_window": cpu,
        "window_seconds": round(wall, 2),
        "machine_cpu_busy": round(busy, 3),
        "cpus": os.cpu_count(),
        "max_severity_error": max(col("severity_error"), default=None),
        "logs": str(run_dir),
        "per_study": per_study,
    }


# --- report -----------------------------------------------------------------------------------


def fmt(v: float | None, width: int = 7, digits: int = 2) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def print_run(r: dict[str, Any]) -> None:
    print(f"\n=== workers={r['workers']}: {r['worker_processes']}; settle {r['settle_seconds']:g} s, "
          f"assembler every {r['assembler_interval_seconds']:g} s, {r['senders']} sender {r['sender_kind']}")
    print(f"studies {r['studies']} ({r['instances']} instances, {r['megabytes']} MB): scored {r['scored']}"
          + (f", NOT scored {r['not_scored']}" if r["not_scored"] else "")
          + (f", reopened {r['reopened_studies']}" if r["reopened_studies"] else ""))
    if r.get("servers_restarted"):
        print(f"WARNING: {' and '.join(r['servers_restarted'])} restarted during this batch: not a clean measurement")
    print(f"ingest (first push -> last push answered): {r['ingest_seconds']:.1f} s, "
          f"{r['ingest_instances_per_s']} instances/s"
          + (f"; {len(r['push_failures'])} PUSH FAILURES (re-sent once), first: {r['push_failures'][0]}"
             if r["push_failures"] else "")
          + (f"; pynetdicom requestor race hit {r['scu_responses_rescued']} times (response put back)"
             if r["scu_responses_rescued"] else ""))
    print(f"throughput: {fmt(r['studies_per_min'], 0, 1)} studies/min (last scored_at {r['makespan_scored_s']:.1f} s "
          f"after first push); API-visible {fmt(r['studies_per_min_api'], 0, 1)} studies/min "
          f"({r['makespan_api_s']:.1f} s)")
    print(f"\n  {'per study (seconds)':<46} {'p50':>7} {'p95':>7} {'max':>7}")
    labels = {
        "latency_s": "latency last received -> scored_at",
        "latency_minus_settle_s": "  same minus settle",
        "latency_api_s": "latency last received -> API showed scored",
        "settle_wait_s": "  settle wait (last received -> queued)",
        "dispatch_s": "  dispatch (queued -> on the broker)",
        "queue_wait_s": "  queue wait (on the broker -> worker started)",
        "job_run_s": "  job run (started -> finished)",
        "scoring_total_s": "  pure scoring (jobs.timings.total)",
    }
    for key, label in labels.items():
        m = r["metrics"][key]
        print(f"  {label:<46} {fmt(m['p50'])} {fmt(m['p95'])} {fmt(m['max'])}")
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_seconds_in_window"].items())
    print(f"\n  CPU seconds in the {r['window_seconds']:.1f} s window: {cpu}; machine busy "
          f"{100 * r['machine_cpu_busy']:.0f} % of {r['cpus']} CPUs")
    print(f"  scoring seconds summed {r['scoring_seconds_sum']:.1f}; most jobs running at once "
          f"{r['peak_concurrent_jobs']}; largest severity error vs truth {fmt(r['max_severity_error'], 0)} pp")
    d = r.get("drain")
    if d:
        m = d["metrics"]
        print(f"\n  drain (all {d['studies']} queued within {d['queued_within_s']:.2f} s, no ingest running): "
              f"{fmt(d['studies_per_min'], 0, 1)} studies/min over {d['span_s']:.1f} s (first queued -> last scored), "
              f"scored {d['scored']}")
        print(f"    job run p50/p95 {fmt(m['job_run_s']['p50'], 0)}/{fmt(m['job_run_s']['p95'], 0)} s, pure scoring "
              f"p50/p95 {fmt(m['scoring_total_s']['p50'], 0)}/{fmt(m['scoring_total_s']['p95'], 0)} s, "
              f"most jobs at once {d['peak_concurrent_jobs']}")
        if d.get("servers_restarted"):
            print(f"    WARNING: {' and '.join(d['servers_restarted'])} restarted during the drain")
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in d["cpu_seconds_in_window"].items())
        print(f"    CPU seconds in the {d['window_seconds']:.1f} s window: {cpu}; machine busy "
              f"{100 * d['machine_cpu_busy']:.0f} %")


def print_summary(results: list[dict[str, Any]]) -> None:
    base = results[0]
    print(f"\n{'workers':>7} {'studies/min':>11} {'(API)':>7} {'scale':>6} {'lat p50':>8} {'lat p95':>8} "
          f"{'-settle p50':>11} {'-settle p95':>11} {'score p50':>9} {'score p95':>9} {'busy':>5}")
    for r in results:
        m = r["metrics"]
        ratio = (r["studies_per_min"] / base["studies_per_min"]) if base["studies_per_min"] else None
        print(f"{r['workers']:>7} {fmt(r['studies_per_min'], 11, 1)} {fmt(r['studies_per_min_api'], 7, 1)} "
              f"{fmt(ratio, 6)} {fmt(m['latency_s']['p50'], 8)} {fmt(m['latency_s']['p95'], 8)} "
              f"{fmt(m['latency_minus_settle_s']['p50'], 11)} {fmt(m['latency_minus_settle_s']['p95'], 11)} "
              f"{fmt(m['scoring_total_s']['p50'], 9)} {fmt(m['scoring_total_s']['p95'], 9)} "
              f"{100 * r['machine_cpu_busy']:>4.0f}%")
    for r in results[1:]:
        if base["studies_per_min"] and r["studies_per_min"]:
            print(f"scaling {r['workers']} workers / {base['workers']} worker(s), end to end: "
                  f"{r['studies_per_min'] / base['studies_per_min']:.2f}x studies/min")
    if all(r.get("drain") for r in results):
        print(f"\n{'workers':>7} {'drain studies/min':>17} {'scale':>6} {'score p50':>9} {'score p95':>9} "
              f"{'job p50':>8} {'busy':>5}")
        b = base["drain"]["studies_per_min"]
        for r in results:
            d = r["drain"]
            ratio = d["studies_per_min"] / b if b and d["studies_per_min"] else None
            print(f"{r['workers']:>7} {fmt(d['studies_per_min'], 17, 1)} {fmt(ratio, 6)} "
                  f"{fmt(d['metrics']['scoring_total_s']['p50'], 9)} {fmt(d['metrics']['scoring_total_s']['p95'], 9)} "
                  f"{fmt(d['metrics']['job_run_s']['p50'], 8)} {100 * d['machine_cpu_busy']:>4.0f}%")

