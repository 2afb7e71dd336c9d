"""Prometheus metrics for GET /courier/metrics, in a registry of the courier's own.

A private registry (not the process-global one) keeps ComfyUI's other extensions and
several couriers in one test process from colliding.

Hosts sharing a store (`host` given) label every series with the host's instance name, so
one Prometheus scrape job over the fleet keeps them apart, and add the fleet's gauges
(live hosts, waiting jobs): every host reports the same fleet values, so aggregate them
with max(), not sum().
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

M = TypeVar("M", Counter, Gauge, Histogram)

FLEET_GAUGES = (
    ("courier_fleet_hosts_live", "Hosts whose heartbeat is within COURIER_TAKEOVER_AFTER"),
    ("courier_fleet_jobs_waiting", "Accepted jobs waiting for any host to claim them"),
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class PerHost:
    """A labelled metric whose first label, the host, is filled in: `.labels(*rest)`."""

    def __init__(self, metric: Counter, host: str) -> None:
        self._metric = metric
        self._host = host

    def labels(self, *values: str) -> Counter:
        return self._metric.labels(self._host, *values)


class Metrics:
    def __init__(self, host: str | None = None) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.host = host
        hosts = ["host"] if host is not None else []

        def one(kind: type[M], name: str, text: str, **options: Any) -> M:
            metric = kind(name, text, hosts, registry=registry, **options)
            return metric.labels(host) if host is not None else metric

        def labelled(name: str, text: str, labels: list[str]) -> Counter | PerHost:
            metric = Counter(name, text, hosts + labels, registry=registry)
            return PerHost(metric, host) if host is not None else metric

        self.jobs_accepted = one(Counter, "courier_jobs_accepted", "Jobs accepted (202)")
        self.jobs_rejected = labelled(
            "courier_jobs_rejected", "Requests rejected, by HTTP status", ["status"]
        )
        self.jobs_final = labelled(
            "courier_jobs_final",
            "Jobs finished, by final status and error type",
            ["status", "error_type"],
        )
        self.job_duration = one(
            Histogram,
            "courier_job_duration_seconds",
            "Acceptance to final state",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800),
        )
        self.upload_bytes = one(Counter, "courier_upload_bytes", "Bytes stored")
        self.upload_duration = one(
            Histogram,
            "courier_upload_duration_seconds",
            "One image upload, retries included",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.upload_failures = one(
            Counter, "courier_upload_failures", "Images that could not be stored"
        )
        self.jobs_pruned = one(
            Counter,
            "courier_jobs_pruned",
            "Finished jobs slimmed to their outcome after COURIER_RETENTION_DAYS",
        )
        self.callbacks_superseded = one(
            Counter,
            "courier_callbacks_superseded",
            "Final callbacks still undelivered when a newer attempt of their id was "
            "accepted: dropped then, never sent after that",
        )
        self.callback_attempts = labelled(
            "courier_callback_attempts", "Final-callback delivery attempts, by outcome", ["outcome"]
        )
        self.jobs_claimed = one(
            Counter, "courier_jobs_claimed", "Waiting jobs this host claimed from the fleet"
        )

        self.gauges = {
            name: one(Gauge, name, help_text)
            for name, help_text in (
                ("courier_unfinished_jobs", "Courier jobs queued, running or uploading"),
                ("courier_comfy_queue_pending", "Prompts waiting in ComfyUI's queue (all clients)"),
                ("courier_comfy_queue_running", "Prompts ComfyUI is executing"),
                ("courier_outbox_pending", "Final callbacks not yet delivered"),
                ("courier_outbox_dead", "Final callbacks given up on (dead letters)"),
            )
        }
        if host is not None:  # the fleet's own: the same on every host, so no host label
            for name, help_text in FLEET_GAUGES:
                self.gauges[name] = Gauge(name, help_text, registry=registry)

    def render(self, snapshot: dict[str, float]) -> bytes:
        """The exposition text, with the scrape-time gauges set from `snapshot` first."""
        for name, gauge in self.gauges.items():
            gauge.set(snapshot.get(name, 0.0))
        return generate_latest(self.registry)
