"""The OpenAPI 3.1 description of comfy-courier's routes and callbacks (GET /courier/openapi.json).

Built from the code it describes: job states and error types come from `executor.jobs`,
status codes and error `type`s from the classes of `executor.errors`, the id pattern from
`executor.intake`. tests/test_openapi.py checks that every route `add_routes` registers is
here and nothing else is, and every response the test suite receives, and every callback
its receiver gets, is validated against this document. It holds no setting and no secret.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from .executor import errors
from .executor.intake import ID_PATTERN
from .executor.jobs import ErrorType, JobState
from .executor.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

VERSION = "0.1.0"
PATH = "/courier/openapi.json"
# a workflow that runs without a model (the courier's sample): the request body's example
EXAMPLE_WORKFLOW: dict[str, Any] = {
    "1": {"class_type": "EmptyImage",
          "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 16753920}},
    "2": {"class_type": "SaveAndCallback",
          "inputs": {"images": ["1", 0], "filename_prefix": "social"}},
}

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    out = dict(schema)
    out["type"] = [schema["type"], "null"]
    if "enum" in schema:
        out["enum"] = [*schema["enum"], None]
    return out


# Every error the routes answer with; a new CourierError subclass with an HTTP status must be
# listed here (tests/test_openapi.py checks it), so the document and the kit learn its type.
HTTP_ERRORS: tuple[type[errors.CourierError], ...] = (
    errors.BadRequest, errors.Unauthorized, errors.NotFound, errors.Conflict,
    errors.IdempotencyConflict, errors.PayloadTooLarge, errors.QueueFull, errors.NotConfigured,
    errors.Unavailable, errors.StoreError,  # StoreError answers as `unavailable` (503)
)
INTERNAL_ERROR = errors.CourierError.type  # "internal_error": the 500 of an unexpected failure


def _error_types(*classes: type[errors.CourierError]) -> list[str]:
    return sorted({cls.type for cls in classes})


def _rejection(description: str, *classes: type[errors.CourierError], passthrough: bool = False,
               retry_after: bool = False) -> Schema:
    """A JSON rejection response whose `error.type` is one of `classes`' types.

    `passthrough`: ComfyUI's own validation error types (prompt_outputs_failed_validation,
    ...) come through as they are, so any string is allowed beside the courier's.
    """
    statuses = {cls.status for cls in classes}
    assert len(statuses) == 1, f"one status per response, got {statuses}"
    types = {"type": "string", "enum": _error_types(*classes)}
    error_type: Schema = (
        {"anyOf": [types, {"type": "string", "description": "a type of ComfyUI's validator"}]}
        if passthrough
        else types
    )
    schema: Schema = {
        "allOf": [
            _ref("Rejection"),
            {"type": "object", "properties": {"error": {"type": "object",
                                                        "properties": {"type": error_type}}}},
        ]
    }
    response: Schema = {"description": description,
                        "content": {"application/json": {"schema": schema}}}
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying (how long recent jobs ran).",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return response


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# aiohttp's own answer when no route matches the path (an id with a '/', say): not JSON.
_NO_ROUTE: Schema = {"type": "string", "description": "aiohttp's `404: Not Found`"}

_INTERNAL = _json(
    "Unexpected failure inside the courier (see the ComfyUI log); safe to retry with the same id.",
    {"allOf": [_ref("Rejection"), {"type": "object", "properties": {"error": {
        "type": "object", "properties": {"type": {"const": "internal_error"}}}}}]},
)


def _job_responses() -> dict[str, Schema]:
    """What every keyed /execute-workflow route may answer besides its success."""
    return {
        "400": _rejection("The id in the path is not `[A-Za-z0-9_-]{1,128}`.", errors.BadRequest),
        "401": _rejection("`X-API-Key` missing or wrong.", errors.Unauthorized),
        "404": {
            "description": "No job with this id (or no route for the path).",
            "content": {
                "application/json": {"schema": {"allOf": [_ref("Rejection"), {
                    "type": "object", "properties": {"error": {"type": "object", "properties": {
                        "type": {"enum": _error_types(errors.NotFound)}}}}}]}},
                "text/plain": {"schema": _NO_ROUTE},
            },
        },
        "500": _INTERNAL,
        "503": _rejection(
            "No inbound key configured (`not_configured`: fails closed), the courier is "
            "starting or failed to start, or its journal failed mid-request (`unavailable`): "
            "retry with the same id.",
            errors.NotConfigured, errors.Unavailable,
        ),
    }


def _schemas() -> dict[str, Schema]:
    error_type = {"type": "string", "enum": [e.value for e in ErrorType],
                  "description": "Why the job failed."}
    return {
        "ContentRequestId": {
            "type": "string",
            "pattern": f"^{ID_PATTERN.pattern}$",
            "description": "Your id for the job; it becomes a storage path (no dots, slashes "
                           "or colons). The same id again is idempotent.",
            "examples": ["unique-id-123"],
        },
        "WorkflowNode": {
            "type": "object",
            "required": ["class_type", "inputs"],
            "properties": {
                "class_type": {"type": "string"},
                "inputs": {"type": "object"},
                "_meta": {"type": "object", "properties": {"title": {"type": "string"}}},
            },
        },
        "ApiWorkflow": {
            "type": "object",
            "minProperties": 1,
            "description": "An API-format workflow (ComfyUI's *Export (API)*): node id -> node. "
                           "A UI-format workflow (`nodes`/`links` arrays) is refused with a hint.",
            "additionalProperties": _ref("WorkflowNode"),
        },
        "ExecuteWorkflowRequest": {
            "type": "object",
            "required": ["workflow_json", "content_request_id"],
            "additionalProperties": False,
            "properties": {
                "workflow_json": _ref("ApiWorkflow"),
                "content_request_id": _ref("ContentRequestId"),
            },
        },
        "JobState": {"type": "string", "enum": [s.value for s in JobState]},
        "ErrorType": error_type,
        "CallbackDelivery": {
            "type": "object",
            "required": ["state", "attempts", "last_error"],
            "properties": {
                "state": {"type": "string", "enum": ["pending", "delivered", "dead", "none"],
                          "description": "`none`: no callback URL is configured."},
                "attempts": {"type": "integer", "minimum": 0},
                "last_error": {"type": ["string", "null"]},
            },
        },
        "JobStatus": {
            "type": "object",
            "description": "A job's latest attempt. The body of GET, of the POST 202 and 200 "
                           "replay, and of the DELETE 202.",
            "required": ["content_request_id", "attempt", "prompt_id", "state", "queue_position",
                         "progress", "image_url", "image_urls", "error_message", "callback"],
            "properties": {
                "content_request_id": _ref("ContentRequestId"),
                "attempt": {"type": "integer", "minimum": 1},
                "prompt_id": {"type": "string"},
                "state": _ref("JobState"),
                "queue_position": {"type": ["integer", "null"], "minimum": 0,
                                   "description": "0 while running, n = jobs of ComfyUI's whole "
                                                  "queue ahead of it; null once past running."},
                "progress": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "image_url": {"type": ["string", "null"]},
                "image_urls": {"type": "array", "items": {"type": "string"}},
                "error_message": {"type": ["string", "null"]},
                "error_type": _nullable(error_type),
                "callback": _ref("CallbackDelivery"),
            },
        },
        "Rejection": {
            "type": "object",
            "description": "Every refusal: nothing runs and no callback follows. `node_errors` "
                           "at top level, as ComfyUI's `/prompt` has it.",
            "required": ["error", "node_errors"],
            "additionalProperties": False,
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["type", "message"],
                    "properties": {
                        "type": {"anyOf": [
                            {"type": "string",
                             "enum": sorted({*_error_types(*HTTP_ERRORS), INTERNAL_ERROR})},
                            {"type": "string", "description": "a type of ComfyUI's validator "
                                                              "(with `node_errors`)"}]},
                        "message": {"type": "string"},
                        "field": {"type": "string", "description": "The offending field."},
                        "fields": {"type": "array", "items": {"type": "string"},
                                   "description": "Unknown fields of the body."},
                        "node_id": {"type": "string",
                                    "description": "The malformed node of workflow_json."},
                        "hint": {"type": "string", "examples": ["ui_format"]},
                        "retry_after": {"type": "integer", "minimum": 1,
                                        "description": "As the Retry-After header (429)."},
                    },
                },
                "node_errors": {"type": "object"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["ok", "ready", "queue", "outbox", "storage", "journal",
                         "callback_configured", "signed_callbacks", "config_problems",
                         "inbound_key_configured"],
            "properties": {
                "ok": {"const": True},
                "ready": {"type": "boolean"},
                "queue": {
                    "type": "object",
                    "required": ["comfy_running", "comfy_pending", "courier_unfinished",
                                 "courier_max"],
                    "properties": {k: {"type": "integer", "minimum": 0} for k in (
                        "comfy_running", "comfy_pending", "courier_unfinished", "courier_max")},
                },
                "outbox": {
                    "type": "object",
                    "required": ["pending", "dead", "delivered_since_start"],
                    "properties": {k: {"type": "integer", "minimum": 0} for k in (
                        "pending", "dead", "delivered_since_start")},
                },
                "storage": {"type": "string", "enum": ["local", "supabase"]},
                "journal": {"type": "string", "examples": ["process", "thread"],
                            "description": "Where the journal runs."},
                "callback_configured": {"type": "boolean"},
                "signed_callbacks": {"type": "boolean"},
                "config_problems": {"type": "integer", "minimum": 0},
                "instance_name_shared": {
                    "type": "boolean",
                    "description": "Another live process runs under this instance name: this "
                                   "one recovers and adopts nothing (give each its own "
                                   "COURIER_INSTANCE).",
                },
                "inbound_key_configured": {"type": "boolean"},
            },
        },
        "RedeliverRequest": {
            "oneOf": [
                {"type": "object", "required": ["content_request_id"],
                 "additionalProperties": False,
                 "properties": {"content_request_id": _ref("ContentRequestId")}},
                {"type": "object", "required": ["since"], "additionalProperties": False,
                 "properties": {"since": {
                     "description": "Unix seconds, or an ISO 8601 time (UTC without a zone).",
                     "anyOf": [{"type": "number", "minimum": 0}, {"type": "string"}]}}},
            ],
        },
        "Redelivered": {
            "type": "object",
            "required": ["redelivered", "events"],
            "properties": {
                "redelivered": {"type": "integer", "minimum": 0},
                "events": {
                    "type": "array",
                    "description": "The first 1,000 events moved, oldest first.",
                    "items": {
                        "type": "object",
                        "required": ["content_request_id", "attempt", "webhook_id"],
                        "properties": {
                            "content_request_id": _ref("ContentRequestId"),
                            "attempt": {"type": "integer", "minimum": 1},
                            "webhook_id": {"type": "string"},
                        },
                    },
                },
            },
        },
        "HealthDown": {
            "type": "object",
            "required": ["ok", "ready", "reason"],
            "properties": {"ok": {"const": False}, "ready": {"const": False},
                           "reason": {"type": "string"}},
        },
        "CallbackOutput": {
            "type": "object",
            "description": "One delivered image, in `image_urls` order.",
            "required": ["node_id", "index", "url", "content_type", "bytes", "width", "height"],
            "properties": {
                "node_id": {"type": "string"},
                "index": {"type": "integer", "minimum": 0},
                "url": {"type": "string"},
                "content_type": {"type": "string"},
                "bytes": {"type": "integer", "minimum": 0},
                "width": {"type": "integer", "minimum": 0},
                "height": {"type": "integer", "minimum": 0},
            },
        },
        "SuccessCallback": {
            "type": "object",
            "required": ["content_request_id", "status", "image_url", "error_message", "attempt",
                         "prompt_id", "image_urls"],
            "properties": {
                **_callback_common(),
                "status": {"const": "success"},
                "image_url": {"type": ["string", "null"],
                              "description": "The first of `image_urls`."},
                "error_message": {"type": "null"},
            },
        },
        "ErrorCallback": {
            "type": "object",
            "required": ["content_request_id", "status", "image_url", "error_message", "attempt",
                         "prompt_id", "image_urls"],
            "properties": {
                **_callback_common(),
                "status": {"const": "error"},
                "image_url": {"type": "null"},
                "error_message": {"type": "string"},
                "error_type": _ref("ErrorType"),
                "node_id": {"type": ["string", "null"], "description": "The failing node."},
            },
        },
        "CallbackBody": {
            "description": "The final event of an attempt, POSTed to COURIER_CALLBACK_URL. The "
                           "four keys content_request_id, status, image_url, error_message "
                           "always come first.",
            "oneOf": [_ref("SuccessCallback"), _ref("ErrorCallback")],
            "discriminator": {"propertyName": "status", "mapping": {
                "success": "#/components/schemas/SuccessCallback",
                "error": "#/components/schemas/ErrorCallback"}},
        },
        "StatusUpdate": {
            "type": "object",
            "description": "A best-effort intermediate update, POSTed to COURIER_STATUS_URL.",
            "required": ["content_request_id", "status", "progress"],
            "properties": {
                "content_request_id": _ref("ContentRequestId"),
                "status": {"type": "string", "enum": ["queued", "running"]},
                "progress": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "attempt": {"type": "integer", "minimum": 1},
                "prompt_id": {"type": "string"},
                "image_url": {"type": "null"},
                "error_message": {"type": "null"},
            },
        },
    }


def _callback_common() -> dict[str, Schema]:
    return {
        "content_request_id": _ref("ContentRequestId"),
        "attempt": {"type": "integer", "minimum": 1,
                    "description": "Which run of this id (a POST after a final error starts "
                                   "attempt + 1); ignore events of older attempts."},
        "prompt_id": {"type": "string"},
        "image_urls": {"type": "array", "items": {"type": "string"}},
        "outputs": {"type": "array", "items": _ref("CallbackOutput")},
        "timings": {"type": "object", "additionalProperties": {"type": "number"},
                    "description": "Milliseconds per phase: queued_ms, execution_ms, "
                                   "upload_ms, total_ms."},
    }


_SIGNATURE_HEADERS: list[Schema] = [
    {"name": "webhook-id", "in": "header", "required": True, "schema": {"type": "string"},
     "description": "Stable across retries of one event: de-duplicate on it."},
    {"name": "webhook-timestamp", "in": "header", "required": False,
     "schema": {"type": "string", "pattern": "^[0-9]+$"},
     "description": "Unix seconds of this delivery attempt (with COURIER_WEBHOOK_SECRET)."},
    {"name": "webhook-signature", "in": "header", "required": False,
     "schema": {"type": "string"},
     "description": "Space-separated `v1,<base64 HMAC-SHA256>`, one per secret (with "
                    "COURIER_WEBHOOK_SECRET), per Standard Webhooks."},
    {"name": "X-API-Key", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "COURIER_CALLBACK_API_KEY, when set."},
]


def _webhook(summary: str, description: str, schema: str, responses: dict[str, Schema]) -> Schema:
    return {"post": {
        "summary": summary,
        "description": description,
        "parameters": _SIGNATURE_HEADERS,
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": _ref(schema)}}},
        "responses": responses,
    }}


def _paths() -> dict[str, Schema]:
    key: list[dict[str, list[str]]] = [{"apiKey": []}]
    job_id = {"name": "content_request_id", "in": "path", "required": True,
              "schema": _ref("ContentRequestId"), "example": "unique-id-123"}
    status = _ref("JobStatus")
    return {
        "/execute-workflow": {"post": {
            "operationId": "executeWorkflow",
            "summary": "Run a workflow; its images go to storage and one callback follows.",
            "security": key,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("ExecuteWorkflowRequest"),
                "example": {"workflow_json": EXAMPLE_WORKFLOW,
                            "content_request_id": "unique-id-123"}}}},
            "responses": {
                "200": _json("This id was accepted before and is running or succeeded: nothing "
                             "new runs (network retries are safe).", status),
                "202": _json("Queued; exactly one final callback follows.", status),
                "400": _rejection(
                    "Bad JSON, missing or wrong-typed fields, an invalid id, a UI-format "
                    "workflow (`invalid_request`), or ComfyUI's validation failed "
                    "(its own error type, `node_errors` passed through).",
                    errors.BadRequest, passthrough=True),
                "401": _rejection("`X-API-Key` missing or wrong.", errors.Unauthorized),
                "409": _rejection("Same id, another workflow (also after an error).",
                                  errors.IdempotencyConflict),
                "413": _rejection("Body over COURIER_MAX_BODY_MB.", errors.PayloadTooLarge),
                "429": _rejection("COURIER_MAX_QUEUE unfinished jobs: retry after Retry-After.",
                                  errors.QueueFull, retry_after=True),
                "500": _INTERNAL,
                "503": _job_responses()["503"],
            },
        }},
        "/execute-workflow/{content_request_id}": {
            "parameters": [job_id],
            "get": {
                "operationId": "getStatus",
                "summary": "The job's state, queue position, progress, URLs, error and "
                           "callback delivery.",
                "security": key,
                "responses": {"200": _json("The job's latest attempt.", status),
                              **_job_responses()},
            },
            "delete": {
                "operationId": "cancel",
                "summary": "Cancel a queued job or interrupt the running one; an `error` "
                           "callback (`cancelled`) follows.",
                "security": key,
                "responses": {
                    "202": _json("Cancelling (for another instance's job: its current state; "
                                 "the owner cancels within ~2 s).", status),
                    "409": _rejection("The prompt has finished executing (uploading or final).",
                                      errors.Conflict),
                    **_job_responses(),
                },
            },
        },
        "/courier/redeliver": {"post": {
            "operationId": "redeliver",
            "summary": "Send dead-lettered callbacks again under their original `webhook-id`: "
                       "one job's, or every one dead since a time.",
            "security": key,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("RedeliverRequest"),
                "example": {"since": "2026-11-25T10:00:00Z"}}}},
            "responses": {
                "200": _json("Back in the outbox, due now; this instance sends them.",
                             _ref("Redelivered")),
                "400": _rejection("Bad JSON, not exactly one of `content_request_id` and "
                                  "`since`, an invalid id or time.", errors.BadRequest),
                "401": _rejection("`X-API-Key` missing or wrong.", errors.Unauthorized),
                "404": _rejection("No job with this id.", errors.NotFound),
                "409": _rejection("This job's callback is not dead, or this instance has no "
                                  "COURIER_CALLBACK_URL.", errors.Conflict),
                "413": _rejection("Body over the route's small limit.", errors.PayloadTooLarge),
                "500": _INTERNAL,
                "503": _job_responses()["503"],
            },
        }},
        "/courier/health": {"get": {
            "operationId": "health",
            "summary": "Liveness, queue depth, outbox backlog, storage kind. No key, no secrets.",
            "responses": {
                "200": _json("Serving.", _ref("Health")),
                "503": _json("comfy-courier failed to start (see the ComfyUI log).",
                             _ref("HealthDown")),
            },
        }},
        "/courier/metrics": {"get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (the inbound key or COURIER_METRICS_KEY).",
            "security": [{"apiKey": []}, {"bearer": []}],
            "responses": {
                "200": {"description": "Prometheus text exposition format.",
                        "content": {METRICS_CONTENT_TYPE.split(";")[0]: {
                            "schema": {"type": "string"}}}},
                "401": _rejection("No accepted key given.", errors.Unauthorized),
                "503": _rejection("No key configured at all, or the courier failed to start.",
                                  errors.NotConfigured, errors.Unavailable),
            },
        }},
        PATH: {"get": {
            "operationId": "openapi",
            "summary": "This document.",
            "responses": {"200": _json("OpenAPI 3.1.", {"type": "object",
                                                        "required": ["openapi", "paths"]})},
        }},
    }


@functools.lru_cache(maxsize=1)
def _build() -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "comfy-courier",
            "version": VERSION,
            "summary": "ComfyUI as a job executor: POST a workflow, get the image in your "
                       "storage and one signed callback.",
            "description": "Every route also answers under `/api/...` (ComfyUI adds the alias). "
                           "Rejections never produce a callback; an accepted attempt gets "
                           "exactly one final callback, delivered at least once.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "paths": _paths(),
        "webhooks": {
            "callback": _webhook(
                "The final event of an attempt, to COURIER_CALLBACK_URL.",
                "Written to the courier's outbox before the first try; retried now, 5 s, 30 s, "
                "2 min, 10 min, 30 min, 1 h, 2 h, then every 4 h until COURIER_RETRY_HORIZON, "
                "re-signed each time. Redirects are not followed.",
                "CallbackBody",
                {
                    "2XX": {"description": "Delivered."},
                    "408": {"description": "Retried (also 425, 429, 3xx and 5xx; Retry-After "
                                           "honoured)."},
                    "4XX": {"description": "Any other 4xx: a dead letter, never retried "
                                           "(redeliverable by an operator)."},
                    "5XX": {"description": "Retried on the schedule."},
                },
            ),
            "statusUpdate": _webhook(
                "An intermediate update (`queued`, `running` with progress), to "
                "COURIER_STATUS_URL.",
                "Best effort: one try with a 3 s timeout, throttled by "
                "COURIER_PROGRESS_INTERVAL, a fresh webhook-id each, never after the final event.",
                "StatusUpdate",
                {"2XX": {"description": "Received."},
                 "default": {"description": "Ignored: updates are not retried."}},
            ),
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                           "description": "One of COURIER_API_KEY (comma-separated for rotation)."},
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The inbound key or COURIER_METRICS_KEY (metrics only)."},
            },
        },
    }


def document() -> Schema:
    """The OpenAPI document, a fresh copy (callers may change it)."""
    return copy.deepcopy(_build())
