"""Checks real HTTP answers and callbacks against the courier's OpenAPI document.

conftest.py puts `Conformance.middleware` on every stand-in app the suite builds and runs
every request its callback receiver gets through `check_webhook`, so each response and
callback of the whole suite is validated; a fixture fails at teardown on any violation.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

import jsonschema
from aiohttp import web
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from comfy_courier.openapi import document

BASE = "urn:comfy-courier:openapi"
DOC = document()
_REGISTRY: Registry[Any] = Registry().with_resource(BASE, Resource(DOC, DRAFT202012))
_VALIDATORS: dict[str, jsonschema.protocols.Validator] = {}


def pointer(*parts: str) -> str:
    return "#/" + "/".join(quote(p.replace("~", "~0").replace("/", "~1"), safe="~") for p in parts)


def validate(ref: str, instance: Any) -> list[str]:
    """Errors of `instance` against the schema at `ref` (a JSON pointer into the document)."""
    validator = _VALIDATORS.get(ref)
    if validator is None:
        validator = jsonschema.Draft202012Validator({"$ref": BASE + ref}, registry=_REGISTRY)
        _VALIDATORS[ref] = validator
    return [f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
            for e in validator.iter_errors(instance)]


def _status_key(responses: Mapping[str, Any], status: int) -> str | None:
    for key in (str(status), f"{str(status)[0]}XX", "default"):
        if key in responses:
            return key
    return None


class Conformance:
    """Collects violations of the document; `checked` counts (operation, status) seen."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.checked: Counter[tuple[str, str, int]] = Counter()

    def check_response(self, method: str, template: str, status: int,
                       headers: Mapping[str, str], body: bytes) -> list[str]:
        """Violations of one answer of `method template` (a documented path template)."""
        found: list[str] = []
        path_item = DOC["paths"].get(template)
        operation = path_item.get(method.lower()) if path_item else None
        where = f"{method} {template} -> {status}"
        if operation is None:
            found.append(f"{where}: operation not in the document")
            return self._record(found)
        self.checked[(method, template, status)] += 1
        key = _status_key(operation["responses"], status)
        if key is None:
            found.append(f"{where}: status not documented")
            return self._record(found)
        spec = operation["responses"][key]
        for name, header in spec.get("headers", {}).items():
            if header.get("required") and name not in headers:
                found.append(f"{where}: required header {name} missing")
        content = spec.get("content")
        if not content:
            return self._record(found)
        media = headers.get("Content-Type", "").split(";")[0].strip()
        if media not in content:
            found.append(f"{where}: content type {media!r} not documented ({sorted(content)})")
            return self._record(found)
        if media == "application/json":
            try:
                instance = json.loads(body)
            except ValueError as e:
                found.append(f"{where}: body is not JSON: {e}")
                return self._record(found)
            ref = pointer("paths", template, method.lower(), "responses", key, "content",
                          media, "schema")
            found += [f"{where}: {error}" for error in validate(ref, instance)]
        return self._record(found)

    def check_webhook(self, headers: Mapping[str, str], body: bytes) -> list[str]:
        """Violations of one callback or status update the courier sent."""
        try:
            instance = json.loads(body)
        except ValueError as e:
            return self._record([f"webhook body is not JSON: {e}"])
        name = "statusUpdate" if instance.get("status") in ("queued", "running") else "callback"
        operation = DOC["webhooks"][name]["post"]
        found = []
        for parameter in operation["parameters"]:
            if parameter["required"] and parameter["name"] not in headers:
                found.append(f"webhook {name}: header {parameter['name']} missing")
        if ("webhook-signature" in headers) != ("webhook-timestamp" in headers):
            found.append(f"webhook {name}: webhook-signature without webhook-timestamp")
        if not headers.get("Content-Type", "").startswith("application/json"):
            found.append(f"webhook {name}: Content-Type {headers.get('Content-Type')!r}")
        ref = pointer("webhooks", name, "post", "requestBody", "content", "application/json",
                      "schema")
        found += [f"webhook {name}: {error}" for error in validate(ref, instance)]
        self.checked[("WEBHOOK", name, 0)] += 1
        return self._record(found)

    def _record(self, found: list[str]) -> list[str]:
        self.violations += found
        return found

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as e:  # aiohttp's own 404/405: only checked on our paths
            response = e
        resource = request.match_info.route.resource
        template = resource.canonical if resource is not None else None
        if template is not None and template.startswith("/api/"):
            template = template[len("/api"):]
        if (template in DOC["paths"] and request.method != "HEAD"
                and isinstance(response, web.Response)):
            body = response.body if isinstance(response.body, bytes) else b""
            self.check_response(request.method, template, response.status, response.headers,
                                body)
        if isinstance(response, web.HTTPException):
            raise response
        return response
