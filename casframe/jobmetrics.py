"""Prometheus metrics of one maintenance run (``casframe prune`` and ``casframe gc``), pushed
to a Pushgateway or written for node_exporter's textfile collector when the run ends.

Batch jobs cannot be scraped while they run, so what a run did is kept as gauges of its last
run (objects and bytes freed, duration) with the time it last succeeded, the convention the
Prometheus documentation sets for batch jobs: an alert on that time catches a run that stopped
running, an alert on the figures one that stopped freeing. docs/maintenance.md says when to
use which target.

Imported only when a run is asked to report metrics, so other commands never load
prometheus_client. It must never put a credential in a label: the store's URL is shown
without its user, password or query.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import push_to_gateway, write_to_textfile

from casframe.maintenance import GcReport, PruneReport

__all__ = ["job_registry", "publish", "store_label"]


def store_label(url: str) -> str:
    """``url`` without credentials or query: safe to show as a label."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def job_registry(
    report: PruneReport | GcReport, seconds: float, finished: float | None = None
) -> CollectorRegistry:
    """The gauges of one finished run that took ``seconds``: ``casframe_prune_*`` or
    ``casframe_gc_*``."""
    registry = CollectorRegistry()
    job = "gc" if isinstance(report, GcReport) else "prune"
    prune = report.prune if isinstance(report, GcReport) else report

    def gauge(name: str, text: str, value: float) -> None:
        Gauge(f"casframe_{job}_{name}", text, registry=registry).set(value)

    gauge("objects_freed", "Objects the last run deleted.",
          prune.objects_freed if prune is not None else 0)
    gauge("freed_bytes", "Bytes the last run deleted.",
          prune.bytes_freed if prune is not None else 0)
    gauge("duration_seconds", "How long the last run took.", seconds)
    gauge("last_success_timestamp_seconds", "When the last run finished (Unix time).",
          time.time() if finished is None else finished)
    if prune is not None:
        gauge("objects_scanned", "Objects the last run's prune looked at.",
              prune.objects_scanned)
        gauge("scanned_bytes", "Bytes of the objects the last run's prune looked at.",
              prune.bytes_scanned)
    if isinstance(report, GcReport):
        gauge("refs_expired", "Refs the last run deleted to get under the quota.",
              len(report.refs_deleted))
        gauge("store_bytes", "Bytes the store holds after the last run.",
              report.predicted_bytes)
        gauge("quota_bytes", "The quota (--max-size) of the last run.", report.max_size)
        gauge("target_reached", "1 when the last run got the store under its target, else 0.",
              1 if report.reached_target else 0)
    return registry


def publish(
    report: PruneReport | GcReport,
    seconds: float,
    store_url: str,
    *,
    gateway: str | None = None,
    textfile: str | None = None,
) -> None:
    """Push the run's gauges to the Pushgateway at ``gateway`` (grouped by job and store, so
    each store's last run replaces only its own) and/or write them to ``textfile``
    (atomically, for node_exporter's ``--collector.textfile.directory``)."""
    registry = job_registry(report, seconds)
    job = "casframe_gc" if isinstance(report, GcReport) else "casframe_prune"
    if textfile is not None:
        write_to_textfile(textfile, registry)
    if gateway is not None:
        try:
            push_to_gateway(
                gateway, job=job, registry=registry,
                grouping_key={"store": store_label(store_url)}, timeout=30,
            )
        except OSError as exc:
            # urllib's errors: HTTPError has the status code and its reason, URLError a reason.
            reason = getattr(exc, "reason", None) or exc
            status = getattr(exc, "code", None)
            shown = f"HTTP {status} {reason}" if isinstance(status, int) else str(reason)
            raise OSError(f"cannot push metrics to {gateway}: {shown}") from None
