"""Prometheus metrics, read from the database at scrape time.

The listener, the API and the workers may be separate processes (production), so counters kept
in one process's memory would miss the others; the database already records every instance,
job and result, so the collector derives the metrics from it on each scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.counters import ASSOCIATIONS_REFUSED, INSTANCES_TOO_LARGE, read_counts
from app.db.models import Instance, Job, JobState, Result, Study, StudyState, utcnow

#: Seconds; scoring stages on CPU take from tens of milliseconds to a minute.
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Histograms cover the results of this recent window.
HISTOGRAM_WINDOW = timedelta(hours=24)


def _histogram(name: str, doc: str, samples: dict[str, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["stage"])
    for stage, values in sorted(samples.items()):
        buckets = [(str(edge), float(sum(v <= edge for v in values))) for edge in STAGE_BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        family.add_metric([stage], buckets, sum_value=float(sum(values)))
    return family


class DatabaseCollector(Collector):
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterator[Metric]:
        with self.session_factory() as session:
            received = session.execute(
                select(func.count(), func.coalesce(func.sum(Instance.receive_count), 0))).one()
            by_state = dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).all())
            jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            errors = session.execute(
                select(Study.state, Study.reason_code, func.count())
                .where(Study.state.in_([StudyState.failed.value, StudyState.rejected.value]))
                .group_by(Study.state, Study.reason_code)).all()
            timings = session.execute(
                select(Result.timings).where(Result.created_at >= utcnow() - HISTOGRAM_WINDOW)).scalars().all()
            counted = read_counts(session)

        instances = CounterMetricFamily("cttriage_instances_received",
                                        "DICOM instances received (unique SOP instances)")
        instances.add_metric([], float(received[0]))
        yield instances
        deliveries = CounterMetricFamily("cttriage_instance_deliveries", "Instance deliveries, re-sends included")
        deliveries.add_metric([], float(received[1]))
        yield deliveries

        studies = GaugeMetricFamily("cttriage_studies", "Studies by state", labels=["state"])
        for state in StudyState:
            studies.add_metric([state.value], float(by_state.get(state.value, 0)))
        yield studies

        depth = GaugeMetricFamily("cttriage_queue_depth", "Scoring jobs waiting (outbox + broker)")
        depth.add_metric([], float(jobs.get(JobState.pending.value, 0) + jobs.get(JobState.enqueued.value, 0)))
        yield depth
        running = GaugeMetricFamily("cttriage_jobs_running", "Scoring jobs being processed")
        running.add_metric([], float(jobs.get(JobState.running.value, 0)))
        yield running

        failures = GaugeMetricFamily("cttriage_studies_not_scored", "Failed or rejected studies by reason",
                                     labels=["state", "reason"])
        for state_value, code, count in errors:
            failures.add_metric([state_value, code or "unknown"], float(count))
        yield failures

        # Events with no row of their own, counted by whichever process saw them (app.counters).
        for name, label, doc in (
                (ASSOCIATIONS_REFUSED, "reason", "DICOM connections or associations refused, by reason"),
                (INSTANCES_TOO_LARGE, "source", "Instances refused for their size, by source")):
            family = CounterMetricFamily(f"cttriage_{name}", doc, labels=[label])
            for value, count in sorted(counted.get(name, {}).items()):
                family.add_metric([value], float(count))
            yield family

        samples: dict[str, list[float]] = {}
        for timing in timings:
            for stage, seconds in (timing or {}).items():
                if isinstance(seconds, (int, float)):
                    samples.setdefault(stage, []).append(float(seconds))
        yield _histogram("cttriage_scoring_stage_seconds",
                         f"Scoring time per stage over the last {HISTOGRAM_WINDOW}", samples)
