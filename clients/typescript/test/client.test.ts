import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { cancel, createCourierClient, describeNetworkError, executeWorkflow, getStatus, parseRetryAfter } from "../src/index.js";
import { jobStatus, loadWorkflow } from "./helpers.js";

type Reply = { status: number; body?: unknown; headers?: Record<string, string> } | Error;

/** A fetch that answers from a script and records what it was asked. */
function scriptedFetch(...replies: Reply[]) {
  const calls: { url: string; init: RequestInit }[] = [];
  const fetch = (async (input: string | URL | Request, init: RequestInit = {}) => {
    calls.push({ url: String(input), init });
    const reply = replies.shift();
    if (!reply) throw new Error("no more scripted replies");
    if (reply instanceof Error) throw reply;
    const text = typeof reply.body === "string" ? reply.body : JSON.stringify(reply.body ?? {});
    return new Response(text, { status: reply.status, headers: reply.headers ?? {} });
  }) as typeof globalThis.fetch;
  return { fetch, calls };
}

const sleeps: number[] = [];
const base = { baseUrl: "https://gpu.example:8188/", apiKey: "k1", sleep: async (ms: number) => void sleeps.push(ms) };
const workflow = loadWorkflow("txt2img-sd15.json");

test("executeWorkflow POSTs the contract body with X-API-Key and returns accepted on 202", async () => {
  const { fetch, calls } = scriptedFetch({ status: 202, body: jobStatus() });
  const result = await executeWorkflow({ ...base, fetch, workflow, contentRequestId: "req-1" });
  assert.equal(result.kind, "accepted");
  assert.equal(result.kind === "accepted" && result.job.queue_position, 2);
  assert.equal(calls.length, 1);
  const call = calls[0]!;
  assert.equal(call.url, "https://gpu.example:8188/execute-workflow");
  assert.equal(call.init.method, "POST");
  const headers = new Headers(call.init.headers);
  assert.equal(headers.get("x-api-key"), "k1");
  assert.equal(headers.get("content-type"), "application/json");
  assert.deepEqual(JSON.parse(String(call.init.body)), { workflow_json: workflow, content_request_id: "req-1" });
});

test("200 is a replay of an already accepted id", async () => {
  const { fetch } = scriptedFetch({ status: 200, body: jobStatus({ state: "running", queue_position: 0 }) });
  const result = await executeWorkflow({ ...base, fetch, workflow, contentRequestId: "req-1" });
  assert.equal(result.kind, "replayed");
  assert.equal(result.kind === "replayed" && result.job.state, "running");
});

test("rejections carry the courier's typed error and node_errors", async () => {
  const nodeErrors = { "3": { errors: [{ type: "value_not_in_list" }], class_type: "KSampler" } };
  const { fetch } = scriptedFetch(
    { status: 400, body: { error: { type: "prompt_outputs_failed_validation", message: "Prompt outputs failed validation" }, node_errors: nodeErrors } },
    { status: 409, body: { error: { type: "idempotency_conflict", message: "different workflow" }, node_errors: {} } },
    { status: 401, body: { error: { type: "unauthorized", message: "bad key" }, node_errors: {} } },
    { status: 413, body: { error: { type: "payload_too_large", message: "too big" }, node_errors: {} } },
  );
  const r400 = await executeWorkflow({ ...base, fetch, workflow, contentRequestId: "req-1" });
  assert.ok(r400.kind === "rejected");
  assert.equal(r400.httpStatus, 400);
  assert.equal(r400.error.type, "prompt_outputs_failed_validation");
  assert.deepEqual(r400.nodeErrors, nodeErrors);
  for (const [status, type] of [[409, "idempotency_conflict"], [401, "unauthorized"], [413, "payload_too_large"]] as const) {
    const r = await executeWorkflow({ ...base, fetch, workflow, contentRequestId: "req-1", retries: 3 });
    assert.ok(r.kind === "rejected");
    assert.deepEqual([r.httpStatus, r.error.type, r.retryAfterSeconds], [status, type, null]);
  }
});

test("429 returns retryAfterSeconds without retries, and is retried after Retry-After with retries", async () => {
  const queueFull = { status: 429, headers: { "Retry-After": "3" }, body: { error: { type: "queue_full", message: "full", retry_after: 3 }, node_errors: {} } };
  let { fetch } = scriptedFetch(queueFull);
  const once = await executeWorkflow({ ...base, fetch, workflow, contentRequestId: "req-1" });
  assert.ok(once.kind === "rejected");
  assert.deepEqual([once.httpStatus, once.error.type, once.retryAfterSeconds], [429, "queue_full", 3]);

  sleeps.length = 0;
  const scripted = scriptedFetch(queueFull, { status: 202, body: jobStatus() });
  const retried = await executeWorkflow({ ...base, fetch: scripted.fetch, workflow, contentRequestId: "req-1", retries: 2 });
  assert.equal(retried.kind, "accepted");
  assert.deepEqual(sleeps, [3000]);
  assert.equal(scripted.calls.length, 2);

  // A Retry-After longer than maxRetryDelayMs ends the retries at once.
  ({ fetch } = scriptedFetch({ ...queueFull, headers: { "Retry-After": "120" } }));
  const long = await executeWorkflow({ ...base, fetch, workflow, contentRequestId: "req-1", retries: 5 });
  assert.ok(long.kind === "rejected" && long.retryAfterSeconds === 120);
});

test("network errors and 503 are retried a bounded number of times", async () => {
  sleeps.length = 0;
  const unavailable = { status: 503, body: { error: { type: "unavailable", message: "starting" }, node_errors: {} } };
  const { fetch, calls } = scriptedFetch(new TypeError("fetch failed"), unavailable, new TypeError("fetch failed"));
  const result = await executeWorkflow({ ...base, fetch, workflow, contentRequestId: "req-1", retries: 2 });
  assert.equal(result.kind, "unreachable");
  assert.equal(result.kind === "unreachable" && result.message, "fetch failed");
  assert.equal(result.kind === "unreachable" && result.code, null);
  assert.equal(calls.length, 3);
  assert.equal(sleeps.length, 2);
  assert.ok(sleeps[0]! >= 500 && sleeps[1]! >= 1000 && sleeps[1]! <= 1250, String(sleeps));
});

test("non-courier answers become http_error / invalid_response rejections", async () => {
  const { fetch } = scriptedFetch({ status: 404, body: "404: Not Found" }, { status: 202, body: { hello: 1 } });
  const notFound = await executeWorkflow({ ...base, fetch, workflow, contentRequestId: "req-1" });
  assert.ok(notFound.kind === "rejected");
  assert.deepEqual([notFound.httpStatus, notFound.error.type, notFound.error.message], [404, "http_error", "404: Not Found"]);
  const odd = await executeWorkflow({ ...base, fetch, workflow, contentRequestId: "req-1" });
  assert.ok(odd.kind === "rejected" && odd.error.type === "invalid_response");
});

test("an invalid content_request_id throws before anything is sent", async () => {
  const { fetch, calls } = scriptedFetch();
  for (const id of ["", "a/b", "a.b", "a:b", "x".repeat(129)]) {
    await assert.rejects(executeWorkflow({ ...base, fetch, workflow, contentRequestId: id }), TypeError);
    await assert.rejects(getStatus({ ...base, fetch, contentRequestId: id }), TypeError);
  }
  assert.equal(calls.length, 0);
});

test("getStatus and cancel use GET/DELETE on /execute-workflow/{id}", async () => {
  const { fetch, calls } = scriptedFetch(
    { status: 200, body: jobStatus({ state: "running", progress: 0.5, queue_position: 0 }) },
    { status: 404, body: { error: { type: "not_found", message: "unknown id" }, node_errors: {} } },
    { status: 202, body: jobStatus({ state: "running" }) },
    { status: 409, body: { error: { type: "conflict", message: "already finished" }, node_errors: {} } },
  );
  const found = await getStatus({ ...base, fetch, contentRequestId: "req-1" });
  assert.ok(found.kind === "found" && found.job.progress === 0.5);
  const missing = await getStatus({ ...base, fetch, contentRequestId: "nope" });
  assert.ok(missing.kind === "rejected" && missing.httpStatus === 404 && missing.error.type === "not_found");
  const cancelling = await cancel({ ...base, fetch, contentRequestId: "req-1" });
  assert.equal(cancelling.kind, "cancelling");
  const late = await cancel({ ...base, fetch, contentRequestId: "req-1" });
  assert.ok(late.kind === "rejected" && late.httpStatus === 409);
  assert.deepEqual(
    calls.map((c) => [c.init.method, c.url]),
    [
      ["GET", "https://gpu.example:8188/execute-workflow/req-1"],
      ["GET", "https://gpu.example:8188/execute-workflow/nope"],
      ["DELETE", "https://gpu.example:8188/execute-workflow/req-1"],
      ["DELETE", "https://gpu.example:8188/execute-workflow/req-1"],
    ],
  );
});

test("an abort rejects instead of being retried", async () => {
  const controller = new AbortController();
  controller.abort();
  const fetch = (async (_input: unknown, init: RequestInit = {}) => {
    init.signal?.throwIfAborted();
    return new Response("{}");
  }) as typeof globalThis.fetch;
  await assert.rejects(
    executeWorkflow({ ...base, fetch, signal: controller.signal, retries: 3, workflow, contentRequestId: "req-1" }),
    { name: "AbortError" },
  );
});

test("parseRetryAfter reads seconds and HTTP dates", () => {
  assert.equal(parseRetryAfter("7"), 7);
  assert.equal(parseRetryAfter(null), null);
  assert.equal(parseRetryAfter("soon"), null);
  const now = Date.parse("2026-01-01T00:00:00Z");
  assert.equal(parseRetryAfter("Thu, 01 Jan 2026 00:00:30 GMT", now), 30);
});

test("createCourierClient talks to a real HTTP server with the global fetch", async (t) => {
  const seen: { method: string; url: string; key: string | undefined; body: string }[] = [];
  const server = createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      seen.push({ method: req.method!, url: req.url!, key: req.headers["x-api-key"] as string | undefined, body });
      res.writeHead(req.method === "POST" ? 202 : 200, { "content-type": "application/json" });
      res.end(JSON.stringify(jobStatus()));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => server.close());
  const { port } = server.address() as AddressInfo;
  const courier = createCourierClient({ baseUrl: `http://127.0.0.1:${port}/api`, apiKey: "k1" });
  assert.equal((await courier.executeWorkflow(workflow, "req-1")).kind, "accepted");
  assert.equal((await courier.getStatus("req-1")).kind, "found");
  assert.deepEqual(
    seen.map((s) => [s.method, s.url, s.key]),
    [
      ["POST", "/api/execute-workflow", "k1"],
      ["GET", "/api/execute-workflow/req-1", "k1"],
    ],
  );
  assert.equal(JSON.parse(seen[0]!.body).content_request_id, "req-1");
});

test("unreachable carries the cause: a refused connection to a real closed port", async () => {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve())); // nothing listens there now
  const result = await getStatus({ baseUrl: `http://127.0.0.1:${port}`, apiKey: "k1", contentRequestId: "req-1" });
  assert.ok(result.kind === "unreachable", JSON.stringify(result));
  assert.equal(result.code, "ECONNREFUSED");
  assert.match(result.message, new RegExp(`^fetch failed: connect ECONNREFUSED 127\\.0\\.0\\.1:${port}$`));
});

test("unreachable carries the cause: undici's connect and headers timeouts, and several addresses", async () => {
  const timeout = Object.assign(new Error("Connect Timeout Error (attempted address: 10.0.0.5:8188, timeout: 10000ms)"), {
    code: "UND_ERR_CONNECT_TIMEOUT",
  });
  const { fetch } = scriptedFetch(
    new TypeError("fetch failed", { cause: timeout }),
    new TypeError("fetch failed", { cause: Object.assign(new Error("Headers Timeout Error"), { code: "UND_ERR_HEADERS_TIMEOUT" }) }),
  );
  const connect = await executeWorkflow({ ...base, fetch, workflow, contentRequestId: "req-1" });
  assert.ok(connect.kind === "unreachable");
  assert.equal(connect.code, "UND_ERR_CONNECT_TIMEOUT");
  assert.equal(
    connect.message,
    "fetch failed: Connect Timeout Error (attempted address: 10.0.0.5:8188, timeout: 10000ms) (UND_ERR_CONNECT_TIMEOUT)",
  );
  assert.equal(connect.cause instanceof TypeError && connect.cause.cause, timeout);
  const headers = await cancel({ ...base, fetch, contentRequestId: "req-1" });
  assert.ok(headers.kind === "unreachable" && headers.code === "UND_ERR_HEADERS_TIMEOUT");
  assert.match(headers.message, /Headers Timeout Error/);

  const both = new AggregateError(
    [Object.assign(new Error("connect ECONNREFUSED ::1:8188"), { code: "ECONNREFUSED" }),
     Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:8188"), { code: "ECONNREFUSED" })],
  );
  const described = describeNetworkError(new TypeError("fetch failed", { cause: Object.assign(both, { code: "ECONNREFUSED" }) }));
  assert.deepEqual(described, {
    message: "fetch failed: connect ECONNREFUSED ::1:8188; connect ECONNREFUSED 127.0.0.1:8188",
    code: "ECONNREFUSED",
  });
  assert.deepEqual(describeNetworkError("weird"), { message: "weird", code: null });
});
