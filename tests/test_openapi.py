"""The OpenAPI document: valid 3.1, served without a key or secrets, and true to the code.

Every answer the suite's harnesses give and every callback its receiver gets is validated
against the document (conftest.py, conformance.py); the tests here check that this covers
the routes' flows and that the checker does catch what breaks the document.
"""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp import web
from openapi_spec_validator import validate as validate_spec

from comfy_courier.executor.settings import Settings
from comfy_courier.openapi import HTTP_ERRORS, PATH, document
from comfy_courier.routes import add_routes

from conformance import Conformance
from conftest import API_KEY, WEBHOOK_SECRET, model_free

METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
JOB = "/execute-workflow/{content_request_id}"


def test_the_document_is_valid_openapi_3_1():
    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate_spec(doc)
    assert set(doc["webhooks"]) == {"callback", "statusUpdate"}


def test_every_registered_route_is_documented_and_every_documented_route_exists():
    routes = web.RouteTableDef()
    add_routes(routes, lambda: None, Settings.from_env({}))
    registered = {(route.method, route.path) for route in routes if isinstance(route, web.RouteDef)}
    documented = {(method.upper(), path) for path, item in document()["paths"].items()
                  for method in item if method in METHODS}
    assert registered == documented
    assert ("GET", PATH) in registered


def test_error_types_and_states_come_from_the_code():
    from comfy_courier.executor import errors
    from comfy_courier.executor.jobs import ErrorType, JobState

    schemas = document()["components"]["schemas"]
    assert schemas["JobState"]["enum"] == [s.value for s in JobState]
    assert schemas["ErrorType"]["enum"] == [e.value for e in ErrorType]
    responses = document()["paths"]["/execute-workflow"]["post"]["responses"]
    assert "Retry-After" in responses[str(errors.QueueFull.status)]["headers"]
    conflict = responses["409"]["content"]["application/json"]["schema"]["allOf"][1]
    assert conflict["properties"]["error"]["properties"]["type"]["enum"] == [
        errors.IdempotencyConflict.type]

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    # WorkflowRejected answers with ComfyUI's own error (passthrough), not a type of ours
    answered = {cls for cls in subclasses(errors.CourierError)
                if cls.status != 500 and cls is not errors.WorkflowRejected}
    assert answered == set(HTTP_ERRORS), "a new HTTP error: list it in openapi.HTTP_ERRORS"
    known = schemas["Rejection"]["properties"]["error"]["properties"]["type"]["anyOf"][0]["enum"]
    assert set(known) == {cls.type for cls in HTTP_ERRORS} | {"internal_error"}


async def test_served_without_a_key_under_both_paths_and_holds_no_secret(make_harness):
    h = await make_harness(env={
        "COURIER_WEBHOOK_SECRET": WEBHOOK_SECRET, "COURIER_METRICS_KEY": "metrics-key-abcdef",
        "COURIER_CALLBACK_API_KEY": "callback-key-0123456789"})
    for path in (PATH, "/api" + PATH):
        resp = await h.client.get(path)
        assert resp.status == 200 and resp.content_type == "application/json"
        text = await resp.text()
        assert json.loads(text) == document()
        for secret in h.settings.secrets:
            assert secret not in text
    assert h.conformance.checked[("GET", PATH, 200)] == 2


async def test_the_flows_of_every_route_conform(make_harness, receiver):
    """One run through each route's answers; the harness validates each (conftest.py)."""
    h = await make_harness(env={"COURIER_METRICS_KEY": "metrics-key-abcdef"})
    assert (await h.post(model_free(), "oa1"))[0] == 202
    assert (await h.post(model_free(), "oa1"))[0] == 200
    other = model_free("other")
    assert (await h.post(other, "oa1"))[0] == 409
    assert (await h.post(model_free(), "oa1", key="wrong"))[0] == 401
    assert (await h.post(model_free(), "bad.id"))[0] == 400
    unknown = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    status, body = await h.post(unknown, "oa2")
    assert status == 400 and body["error"]["type"] == "missing_node_type"  # ComfyUI's own type
    big = await h.client.post("/execute-workflow", headers={"X-API-Key": API_KEY},
                              data=b"x" * (h.settings.max_body_bytes + 1))
    assert big.status == 413
    await h.wait_final("oa1")
    await h.settle()
    for path, status in (("/execute-workflow/oa1", 200), ("/execute-workflow/nope", 404),
                         ("/execute-workflow/bad.id", 400), ("/courier/health", 200)):
        resp = await h.client.get(path, headers={"X-API-Key": API_KEY})
        assert resp.status == status, path
    assert (await h.client.delete("/execute-workflow/oa1",
                                  headers={"X-API-Key": API_KEY})).status == 409
    assert (await h.client.delete("/execute-workflow/nope",
                                  headers={"X-API-Key": API_KEY})).status == 404
    metrics = await h.client.get("/courier/metrics",
                                 headers={"Authorization": "Bearer metrics-key-abcdef"})
    assert metrics.status == 200
    assert (await h.client.get("/courier/metrics")).status == 401

    queued = await make_harness(env={"COURIER_MAX_QUEUE": "1"}, start_worker=False, port=8189)
    assert (await queued.post(model_free(), "oq1"))[0] == 202
    assert (await queued.post(model_free(), "oq2"))[0] == 429
    assert (await queued.client.delete("/execute-workflow/oq1",
                                       headers={"X-API-Key": API_KEY})).status == 202
    closed = await make_harness(env={"COURIER_API_KEY": ""}, port=8190)
    assert (await closed.post(model_free(), "oc1"))[0] == 503

    seen = {(method, template, status) for method, template, status in h.conformance.checked}
    assert seen >= {
        ("POST", "/execute-workflow", s) for s in (200, 202, 400, 401, 409, 413, 429, 503)}
    assert seen >= {("GET", JOB, s) for s in (200, 400, 404)}
    assert seen >= {("DELETE", JOB, s) for s in (202, 404, 409)}
    assert seen >= {("GET", "/courier/health", 200), ("GET", "/courier/metrics", 200),
                    ("GET", "/courier/metrics", 401)}
    assert h.conformance.violations == []
    # the callback of oa1 (and the cancelled oq1's, once delivered) went through the receiver's
    # check against the document's `callback` webhook
    assert receiver.conformance.checked[("WEBHOOK", "callback", 0)] >= 1
    assert receiver.conformance.violations == []


async def test_status_updates_conform_to_the_status_webhook(make_harness, receiver):
    h = await make_harness(env={"COURIER_STATUS_URL": receiver.url,
                                "COURIER_WEBHOOK_SECRET": WEBHOOK_SECRET}, start_worker=False)
    assert (await h.post(model_free(), "su1"))[0] == 202
    [update] = await receiver.wait_for(1)  # `queued`, signed; the job waits for the worker
    assert update.json["status"] == "queued" and "webhook-signature" in update.headers
    assert receiver.conformance.checked[("WEBHOOK", "statusUpdate", 0)] == 1


def test_the_checker_catches_what_breaks_the_document():
    check = Conformance()
    json_type = {"Content-Type": "application/json"}
    status_body = {"content_request_id": "a", "attempt": 1, "prompt_id": "p", "state": "queued",
                   "queue_position": 0, "progress": None, "image_url": None, "image_urls": [],
                   "error_message": None, "callback": {"state": "none", "attempts": 0,
                                                       "last_error": None}}
    assert check.check_response("POST", "/execute-workflow", 202, json_type,
                                json.dumps(status_body).encode()) == []
    wrong_state = json.dumps({**status_body, "state": "done"}).encode()
    assert check.check_response("POST", "/execute-workflow", 202, json_type, wrong_state)
    missing = {k: v for k, v in status_body.items() if k != "callback"}
    assert check.check_response("GET", JOB, 200, json_type, json.dumps(missing).encode())
    rejection = json.dumps({"error": {"type": "queue_full", "message": "full"},
                            "node_errors": {}}).encode()
    [header] = check.check_response("POST", "/execute-workflow", 429, json_type, rejection)
    assert "Retry-After" in header
    assert check.check_response("POST", "/execute-workflow", 409, json_type, rejection)  # type
    assert check.check_response("POST", "/execute-workflow", 418, json_type, rejection)
    assert check.check_response("GET", "/courier/health", 200, {"Content-Type": "text/html"},
                                b"<p>ok</p>")
    assert check.check_response("PUT", "/execute-workflow", 200, json_type, b"{}")
    callback = {"content_request_id": "a", "status": "success", "image_url": "https://x/1.png",
                "error_message": None, "attempt": 1, "prompt_id": "p",
                "image_urls": ["https://x/1.png"]}
    headers = {"Content-Type": "application/json", "webhook-id": "msg_1"}
    assert check.check_webhook(headers, json.dumps(callback).encode()) == []
    assert check.check_webhook({"Content-Type": "application/json"},
                               json.dumps(callback).encode())  # no webhook-id
    assert check.check_webhook(headers, json.dumps({**callback, "error_message": "x"}).encode())
    assert check.check_webhook(headers, json.dumps({**callback, "status": "error"}).encode())
    assert len(check.violations) == 10


def test_the_typescript_kit_carries_the_current_document(capsys):
    """clients/typescript/openapi.json is what the TS suite checks the kit's types against."""
    from comfy_courier.cli import main

    assert main(["openapi"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == document()
    kit = Path(__file__).resolve().parents[1] / "clients" / "typescript" / "openapi.json"
    assert kit.read_text() == printed, (
        "regenerate it: python -m comfy_courier openapi > clients/typescript/openapi.json")
