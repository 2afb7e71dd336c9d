"""Prometheus metrics for GET /courier/metrics, in a registry of the courier's own.

A private registry (not the process-global one) keeps ComfyUI's other extensions and
several couriers in one test process from colliding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs_accepted = Counter(
            "courier_jobs_accepted", "Jobs accepted (202)", registry=self.registry
        )
        self.jobs_rejected = Counter(
            "courier_jobs_rejected",
            "Requests rejected, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.jobs_final = Counter(
            "courier_jobs_final",
            "Jobs finished, by final status and error type",
            ["status", "error_type"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "courier_job_duration_seconds",
            "Acceptance to final state",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800),
            registry=self.registry,
        )
        self.upload_bytes = Counter("courier_upload_bytes", "Bytes stored", registry=self.registry)
        self.upload_duration = Histogram(
            "courier_upload_duration_seconds",
            "One image upload, retries included",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.upload_failures = Counter(
            "courier_upload_failures", "Images that could not be stored", registry=self.registry
        )
        self.jobs_pruned = Counter(
            "courier_jobs_pruned",
            "Finished jobs slimmed to their outcome after COURIER_RETENTION_DAYS",
            registry=self.registry,
        )
        self.callbacks_superseded = Counter(
            "courier_callbacks_superseded",
            "Final callbacks still undelivered when a newer attempt of their id was "
            "accepted: dropped then, never sent after that",
            registry=self.registry,
        )
        self.callback_attempts = Counter(
            "courier_callback_attempts",
            "Final-callback delivery attempts, by outcome",
            ["outcome"],
            registry=self.registry,
        )

        self.gauges = {
            name: Gauge(name, help_text, registry=self.registry)
            for name, help_text in (
                ("courier_unfinished_jobs", "Courier jobs queued, running or uploading"),
                ("courier_comfy_queue_pending", "Prompts waiting in ComfyUI's queue (all clients)"),
                ("courier_comfy_queue_running", "Prompts ComfyUI is executing"),
                ("courier_outbox_pending", "Final callbacks not yet delivered"),
                ("courier_outbox_dead", "Final callbacks given up on (dead letters)"),
            )
        }

    def render(self, snapshot: dict[str, float]) -> bytes:
        """The exposition text, with the scrape-time gauges set from `snapshot` first."""
        for name, gauge in self.gauges.items():
            gauge.set(snapshot.get(name, 0.0))
        return generate_latest(self.registry)
