import { test } from "node:test";
import assert from "node:assert/strict";
import { validateCallbackBody, validateJobStatus, validateStatusUpdate } from "../src/index.js";
import { errorBody, jobStatus, successBody } from "./helpers.js";

test("a success callback with outputs, timings and unknown keys is valid and kept whole", () => {
  const body = successBody({
    outputs: [{ node_id: "9", index: 0, url: "https://x/1.png", content_type: "image/png", bytes: 10, width: 8, height: 8 }],
    timings: { total_ms: 12.5 },
    something_new: { nested: true },
  });
  const result = validateCallbackBody(body);
  assert.ok(result.ok);
  assert.deepEqual(result.value, body);
});

test("an error callback is valid; error_type may be a type this kit does not know yet", () => {
  assert.ok(validateCallbackBody(errorBody()).ok);
  assert.ok(validateCallbackBody(errorBody({ error_type: "storage_quota" })).ok);
  assert.ok(validateCallbackBody(errorBody({ node_id: null })).ok);
});

test("the four contract keys are required, with the right types per status", () => {
  for (const key of ["content_request_id", "status", "image_url", "error_message"]) {
    const body: Record<string, unknown> = { ...successBody() };
    delete body[key];
    const result = validateCallbackBody(body);
    assert.ok(!result.ok, key);
    assert.ok(result.errors.some((e) => e.startsWith(`${key}: missing`)), result.errors.join());
  }
  const cases: [Record<string, unknown>, string][] = [
    [successBody({ status: "done" }), "status"],
    [successBody({ error_message: "oops" }), "error_message"],
    [errorBody({ error_message: null }), "error_message"],
    [errorBody({ image_url: "https://x" }), "image_url"],
    [successBody({ image_urls: ["a", 1] }), "image_urls"],
    [successBody({ attempt: 0 }), "attempt"],
    [successBody({ timings: { a: "1" } }), "timings"],
    [successBody({ outputs: [{ node_id: "9" }] }), "outputs[0].index"],
    [successBody({ outputs: {} }), "outputs"],
    [errorBody({ node_id: 3 }), "node_id"],
  ];
  for (const [body, key] of cases) {
    const result = validateCallbackBody(body);
    assert.ok(!result.ok, key);
    assert.ok(result.errors.some((e) => e.startsWith(key)), `${key}: ${result.errors.join("; ")}`);
  }
  assert.ok(!validateCallbackBody([]).ok);
  assert.ok(!validateCallbackBody(null).ok);
});

test("success with no image has image_url null", () => {
  assert.ok(validateCallbackBody(successBody({ image_url: null, image_urls: [] })).ok);
});

test("validateStatusUpdate accepts queued/running with progress and rejects final statuses", () => {
  const update = { content_request_id: "r", status: "running", progress: 0.5, attempt: 1, prompt_id: "p", image_url: null, error_message: null };
  assert.ok(validateStatusUpdate(update).ok);
  assert.ok(validateStatusUpdate({ ...update, status: "queued", progress: null }).ok);
  assert.ok(!validateStatusUpdate({ ...update, status: "success" }).ok);
  assert.ok(!validateStatusUpdate({ ...update, progress: 1.5 }).ok);
});

test("validateJobStatus checks the status body", () => {
  assert.ok(validateJobStatus(jobStatus()).ok);
  assert.ok(validateJobStatus(jobStatus({ state: "success", progress: 1, queue_position: null })).ok);
  const bad = validateJobStatus({ ...jobStatus(), state: "done", callback: { state: "x", attempts: 0, last_error: null } });
  assert.ok(!bad.ok);
  assert.deepEqual(bad.errors, ["state: expected a job state", "callback.state: expected pending, delivered, dead or none"]);
});
