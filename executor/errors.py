"""The courier's error hierarchy: each HTTP-facing error knows its status and JSON type.

Subclasses also inherit the matching stdlib error so callers can catch either.
"""

from __future__ import annotations

from typing import Any


class CourierError(Exception):
    """Base of every error the courier raises on purpose."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        """The JSON error body of the contract: `node_errors` at top level, as in /prompt."""
        node_errors = self.details.get("node_errors", {})
        error = {"type": self.type, "message": self.message}
        error.update({k: v for k, v in self.details.items() if k != "node_errors"})
        return {"error": error, "node_errors": node_errors}


class NotConfigured(CourierError, RuntimeError):
    status = 503
    type = "not_configured"


class Unavailable(CourierError, RuntimeError):
    status = 503
    type = "unavailable"


class StoreError(Unavailable):
    """The store failed a call (busy, full, gone): the change may or may not be written."""


class Unauthorized(CourierError, PermissionError):
    status = 401
    type = "unauthorized"


class PayloadTooLarge(CourierError, ValueError):
    status = 413
    type = "payload_too_large"


class BadRequest(CourierError, ValueError):
    status = 400
    type = "invalid_request"


class WorkflowRejected(BadRequest):
    """ComfyUI's own validation failed; its error dict and node_errors pass through."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any]) -> None:
        super().__init__(str(error.get("message") or "Prompt failed validation"))
        self.error = error
        self.node_errors = node_errors

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "node_errors": self.node_errors}


class NotFound(CourierError, LookupError):
    status = 404
    type = "not_found"


class Conflict(CourierError, RuntimeError):
    status = 409
    type = "conflict"


class IdempotencyConflict(Conflict):
    type = "idempotency_conflict"


class QueueFull(CourierError, RuntimeError):
    status = 429
    type = "queue_full"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class UnsupportedComfyUI(CourierError, RuntimeError):
    """The running ComfyUI lacks an internal the courier builds on."""


class StorageError(CourierError, OSError):
    """An upload failed; `retryable` says whether trying again can help."""

    type = "upload"

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
