"""Prometheus metrics at ``/metrics`` (with ``prometheus-client``), behind ``STUDIO_METRICS_TOKEN``.

Two sources:

- **The web process** measures its own HTTP latency per route (a histogram labelled with the route's
  path template, never the filled-in path, so ids do not explode the label set).
- **Everything about jobs and workers is read from the database at scrape time** by
  :class:`DatabaseCollector`: queue length per queue, jobs by state, failures by reason, stage
  durations, and per worker its training speed, GPU memory and utilisation, from the rows the
  workers' heartbeats write (worker.heartbeat). Celery runs every job in a fresh child process
  (``worker_max_tasks_per_child = 1``) on hosts the web cannot see: a counter kept in a child's
  memory dies with it, and prometheus' multiprocess mode shares files only on one host. The
  database already holds the truth and survives every process; so any web process can answer a
  scrape, and the numbers agree whichever one answers.

With ``studio web --workers N`` each web process keeps its own HTTP histograms; set
``PROMETHEUS_MULTIPROC_DIR`` to a folder the web processes share and the scrape merges them
(prometheus-client's multiprocess mode, for the web processes only).
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.models import JOB_STATUSES, Job, WorkerHeartbeat, utcnow
from app.queue import broker_queue_lengths

QUEUE_BY_KIND = {"train": "gpu", "generate": "gpu"}  # worker.celery_app.TASK_QUEUES, by job kind
BROKER_QUEUES = ("gpu", "cpu")
STAGE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_REASON_LENGTH = 120


class DatabaseCollector(Collector):
    """Job and worker metrics computed from the database at each scrape."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            yield from self._jobs(session)
            yield from self._stages(session)
            yield from self._workers(session)

    def _jobs(self, session: Session) -> Iterable[Metric]:
        from app.operator.service import failure_key

        queue = GaugeMetricFamily("studio_queue_length", "Jobs waiting for a worker, per queue.", labels=["queue"])
        waiting: Counter[str] = Counter()
        for kind, count in session.execute(
            select(Job.kind, func.count()).where(Job.status == "queued").group_by(Job.kind)
        ):
            waiting[QUEUE_BY_KIND.get(kind, "gpu")] += int(count)
        for name in sorted({*QUEUE_BY_KIND.values(), *waiting}):
            queue.add_metric([name], waiting[name])
        yield queue

        lengths = broker_queue_lengths(list(BROKER_QUEUES))
        if lengths is not None:
            messages = GaugeMetricFamily("studio_broker_queue_messages", "Messages waiting in the broker, per queue "
                                         "(Redis only; maintenance tasks included).", labels=["queue"])
            for name, count in lengths.items():
                messages.add_metric([name], count)
            yield messages

        states = GaugeMetricFamily("studio_jobs", "Jobs in the database, by state.", labels=["state"])
        counted = session.execute(select(Job.status, func.count()).group_by(Job.status))
        by_state = {row[0]: int(row[1]) for row in counted}
        for state in JOB_STATUSES:
            states.add_metric([state], int(by_state.get(state, 0)))
        yield states

        failures = CounterMetricFamily("studio_job_failures", "Failed jobs still in the database, by reason "
                                       "(the reason's first sentence).", labels=["reason"])
        reasons: Counter[str] = Counter()
        for (reason,) in session.execute(select(Job.failure_reason).where(Job.status == "failed")):
            reasons[failure_key(reason)[:MAX_REASON_LENGTH]] += 1
        for reason, count in sorted(reasons.items()):
            failures.add_metric([reason], count)
        yield failures

    def _stages(self, session: Session) -> Iterable[Metric]:
        """Each job records how long each of its finished stages took (details.stage_seconds, written by
        the worker when the next stage begins): a histogram over every job in the database."""
        observed: dict[str, list[float]] = defaultdict(list)
        rows = session.execute(select(Job.details).where(Job.started_at.is_not(None)))
        for (details,) in rows:
            for stage, seconds in ((details or {}).get("stage_seconds") or {}).items():
                if isinstance(seconds, int | float):
                    observed[str(stage)].append(float(seconds))
        histogram = HistogramMetricFamily("studio_stage_duration_seconds", "How long job stages took.",
                                          labels=["stage"])
        for stage, values in sorted(observed.items()):
            buckets = [(str(bound), sum(1 for v in values if v <= bound)) for bound in STAGE_BUCKETS]
            buckets.append(("+Inf", len(values)))
            histogram.add_metric([stage], buckets, sum(values))
        yield histogram

    def _workers(self, session: Session) -> Iterable[Metric]:
        lost_before = utcnow() - timedelta(seconds=self.settings.worker_lost_seconds)
        up = GaugeMetricFamily("studio_worker_up", "1 while the worker heartbeats, 0 once it is lost.",
                               labels=["worker", "host"])
        speed = GaugeMetricFamily("studio_worker_training_steps_per_second",
                                  "Training speed of the worker's current (or last) job.", labels=["worker"])
        used = GaugeMetricFamily("studio_worker_gpu_memory_used_bytes", "GPU memory in use.", labels=["worker"])
        total = GaugeMetricFamily("studio_worker_gpu_memory_total_bytes", "GPU memory.", labels=["worker"])
        busy = GaugeMetricFamily("studio_worker_gpu_utilisation_ratio", "GPU utilisation, 0..1.", labels=["worker"])
        seen = GaugeMetricFamily("studio_worker_last_seen_timestamp_seconds", "The worker's last heartbeat.",
                                 labels=["worker"])
        for worker in session.scalars(select(WorkerHeartbeat)):
            up.add_metric([worker.name, worker.host], 0.0 if worker.last_seen_at < lost_before else 1.0)
            seen.add_metric([worker.name], worker.last_seen_at.timestamp())
            if worker.steps_per_second is not None:
                speed.add_metric([worker.name], worker.steps_per_second)
            if worker.gpu_memory_used_bytes is not None:
                used.add_metric([worker.name], worker.gpu_memory_used_bytes)
            if worker.gpu_memory_total_bytes is not None:
                total.add_metric([worker.name], worker.gpu_memory_total_bytes)
            if worker.gpu_utilisation is not None:
                busy.add_metric([worker.name], worker.gpu_utilisation / 100)
        yield from (up, speed, used, total, busy, seen)


class Metrics:
    """One app's metrics: its HTTP latency histogram and the database collector."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.database = DatabaseCollector(sessions, settings)
        self.http_latency = Histogram("studio_http_request_duration_seconds", "HTTP request latency by route.",
                                      ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def exposition(self) -> bytes:
        """The text format of every metric, for one scrape."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = CollectorRegistry()
            registry.register(_Forward(self.registry))
        registry.register(self.database)
        return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


class LatencyMiddleware:
    """Observes each HTTP request's duration under its route's path template ("unmatched" for a 404)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()

        async def send_and_time(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                route = scope.get("route")
                path = getattr(route, "path", None) or ("static" if scope["path"].startswith("/static/")
                                                        else "unmatched")
                self.metrics.http_latency.labels(scope["method"], path).observe(time.perf_counter() - began)

        await self.app(scope, receive, send_and_time)
