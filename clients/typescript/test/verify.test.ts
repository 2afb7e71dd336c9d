import { test } from "node:test";
import assert from "node:assert/strict";
import { signWebhook, verifyCallback, verifyStatusUpdate, type VerifyOptions } from "../src/index.js";
import { Webhook } from "standardwebhooks";
import { errorBody, newSecret, successBody } from "./helpers.js";

const API_KEY = "cb-key-1";
const SECRET = newSecret();
const NOW = 1_800_000_000; // seconds
const now = () => NOW * 1000;

async function signedRequest(
  body: unknown,
  {
    secret = SECRET,
    timestamp = NOW,
    id = "msg_1",
    apiKey = API_KEY as string | null,
    extra = {} as Record<string, string>,
  } = {},
): Promise<Request> {
  const raw = typeof body === "string" ? body : JSON.stringify(body);
  const headers: Record<string, string> = {
    "content-type": "application/json",
    "webhook-id": id,
    "webhook-timestamp": String(timestamp),
    "webhook-signature": await signWebhook(secret, id, timestamp, raw),
    ...extra,
  };
  if (apiKey !== null) headers["x-api-key"] = apiKey;
  return new Request("https://app.example/api/comfy-callback", { method: "POST", headers, body: raw });
}

const options: VerifyOptions = { apiKey: API_KEY, secret: SECRET, now };

test("signWebhook matches the reference Standard Webhooks implementation", async () => {
  // Value from the Python `standardwebhooks` library for the spec's example message.
  const sig = await signWebhook(
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLSYG",
    "msg_p5jXN8AQM9LWM0D4loKWxJek",
    1614265330,
    '{"test": 2432232314}',
  );
  assert.equal(sig, "v1,0iyUg5ZWoFAvzOYrmKMchzJUfGj0FFYoWD45bChDnOE=");
});

test("verifyCallback and the standardwebhooks reference library agree, both ways", async () => {
  const raw = JSON.stringify(successBody());
  const stamp = Math.floor(Date.now() / 1000);
  const reference = new Webhook(SECRET);
  const headers = {
    "webhook-id": "msg_ref",
    "webhook-timestamp": String(stamp),
    "webhook-signature": reference.sign("msg_ref", new Date(stamp * 1000), raw),
  };
  const ours = await verifyCallback(
    new Request("https://app.example/cb", { method: "POST", headers: { ...headers, "x-api-key": API_KEY }, body: raw }),
    { apiKey: API_KEY, secret: SECRET },
  );
  assert.ok(ours.ok, JSON.stringify(ours));
  const signed = await signWebhook(SECRET, "msg_ref", stamp, raw);
  assert.deepEqual(reference.verify(raw, { ...headers, "webhook-signature": signed }), JSON.parse(raw));
  assert.throws(() => reference.verify(raw, { ...headers, "webhook-signature": signed.replace("v1,", "v1,A") }));
});

test("a signed callback with the right key verifies and returns the typed body", async () => {
  const body = successBody();
  const request = await signedRequest(body);
  const result = await verifyCallback(request, options);
  assert.ok(result.ok, JSON.stringify(result));
  assert.deepEqual(result.body, body);
  assert.equal(result.webhookId, "msg_1");
  assert.equal(result.timestamp, NOW);
  assert.equal(result.rawBody, JSON.stringify(body));
  assert.equal(request.bodyUsed, true, "the body is read once, by verifyCallback");
  if (result.body.status === "success") assert.equal(result.body.image_url, body.image_url);
});

test("X-API-Key: missing, wrong, rotated, comma-separated", async () => {
  let result = await verifyCallback(await signedRequest(successBody(), { apiKey: null }), options);
  assert.deepEqual(!result.ok && [result.error.code, result.error.status], ["missing_api_key", 401]);
  result = await verifyCallback(await signedRequest(successBody(), { apiKey: "cb-key-2" }), options);
  assert.deepEqual(!result.ok && [result.error.code, result.error.status], ["bad_api_key", 401]);
  result = await verifyCallback(await signedRequest(successBody(), { apiKey: "cb-key-2" }), { ...options, apiKey: ["cb-key-1", "cb-key-2"] });
  assert.ok(result.ok);
  result = await verifyCallback(await signedRequest(successBody(), { apiKey: "cb-key-2" }), { ...options, apiKey: " cb-key-1 , cb-key-2 " });
  assert.ok(result.ok);
  result = await verifyCallback(await signedRequest(successBody(), { apiKey: "cb-key-" }), options);
  assert.ok(!result.ok && result.error.code === "bad_api_key", "a prefix of the key is not the key");
});

test("API key alone (unsigned courier) is enough when no secret is configured", async () => {
  const request = new Request("https://app.example/cb", {
    method: "POST",
    headers: { "x-api-key": API_KEY, "webhook-id": "msg_u" },
    body: JSON.stringify(errorBody()),
  });
  const result = await verifyCallback(request, { apiKey: API_KEY });
  assert.ok(result.ok);
  assert.equal(result.timestamp, null);
  assert.equal(result.body.status, "error");
});

test("nothing configured, or an option given but empty, fails closed with 500 (the courier retries)", async () => {
  const cases: VerifyOptions[] = [
    {},
    { apiKey: undefined },
    { apiKey: "", secret: SECRET },
    { apiKey: API_KEY, secret: undefined },
    { apiKey: API_KEY, secret: "whsec_***" },
    { apiKey: API_KEY, secret: [] },
  ];
  for (const opts of cases) {
    const result = await verifyCallback(await signedRequest(successBody()), { ...opts, now });
    assert.ok(!result.ok, JSON.stringify(opts));
    assert.equal(result.error.code, "not_configured");
    assert.equal(result.error.status, 500);
  }
});

test("webhook-id is required, signed or not", async () => {
  const request = new Request("https://app.example/cb", {
    method: "POST",
    headers: { "x-api-key": API_KEY },
    body: JSON.stringify(successBody()),
  });
  const result = await verifyCallback(request, { apiKey: API_KEY });
  assert.deepEqual(!result.ok && [result.error.code, result.error.status], ["missing_webhook_id", 400]);
});

test("a configured secret requires signature and timestamp headers", async () => {
  const request = new Request("https://app.example/cb", {
    method: "POST",
    headers: { "x-api-key": API_KEY, "webhook-id": "msg_1" },
    body: JSON.stringify(successBody()),
  });
  const result = await verifyCallback(request, options);
  assert.deepEqual(!result.ok && [result.error.code, result.error.status, result.webhookId], ["missing_signature", 401, "msg_1"]);
});

test("timestamps outside the tolerance are rejected in both directions", async () => {
  for (const skew of [-301, 301]) {
    const result = await verifyCallback(await signedRequest(successBody(), { timestamp: NOW + skew }), options);
    assert.deepEqual(!result.ok && [result.error.code, result.error.status], ["stale_timestamp", 401], String(skew));
  }
  for (const skew of [-300, 300]) {
    assert.ok((await verifyCallback(await signedRequest(successBody(), { timestamp: NOW + skew }), options)).ok);
  }
  const wide = await verifyCallback(await signedRequest(successBody(), { timestamp: NOW - 900 }), { ...options, toleranceSeconds: 1000 });
  assert.ok(wide.ok);
  const junk = await verifyCallback(
    await signedRequest(successBody(), { extra: { "webhook-timestamp": "17e8" } }),
    options,
  );
  assert.ok(!junk.ok && junk.error.code === "invalid_timestamp");
});

test("a tampered body, another secret or a signature for another id fail", async () => {
  const body = JSON.stringify(successBody());
  const good = await signWebhook(SECRET, "msg_1", NOW, body);
  const tampered = new Request("https://app.example/cb", {
    method: "POST",
    headers: { "x-api-key": API_KEY, "webhook-id": "msg_1", "webhook-timestamp": String(NOW), "webhook-signature": good },
    body: body.replace("req-1", "req-9"),
  });
  let result = await verifyCallback(tampered, options);
  assert.deepEqual(!result.ok && [result.error.code, result.error.status], ["bad_signature", 401]);

  result = await verifyCallback(await signedRequest(successBody(), { secret: newSecret() }), options);
  assert.ok(!result.ok && result.error.code === "bad_signature");

  result = await verifyCallback(
    await signedRequest(successBody(), { extra: { "webhook-id": "msg_2" } }), // signed for msg_1
    options,
  );
  assert.ok(!result.ok && result.error.code === "bad_signature");

  result = await verifyCallback(
    await signedRequest(successBody(), { extra: { "webhook-signature": "v1,not-base64!!! v2,abc v1," } }),
    options,
  );
  assert.ok(!result.ok && result.error.code === "bad_signature");
});

test("rotation: any signature matching any configured secret passes", async () => {
  const oldSecret = newSecret();
  const newSecretValue = newSecret();
  const raw = JSON.stringify(successBody());
  const both = [await signWebhook(oldSecret, "msg_r", NOW, raw), await signWebhook(newSecretValue, "msg_r", NOW, raw)].join(" ");
  const make = (signature: string) =>
    new Request("https://app.example/cb", {
      method: "POST",
      headers: { "x-api-key": API_KEY, "webhook-id": "msg_r", "webhook-timestamp": String(NOW), "webhook-signature": signature },
      body: raw,
    });
  assert.ok((await verifyCallback(make(both), { apiKey: API_KEY, secret: newSecretValue, now })).ok);
  assert.ok((await verifyCallback(make(both), { apiKey: API_KEY, secret: oldSecret, now })).ok);
  const oldOnly = await signWebhook(oldSecret, "msg_r", NOW, raw);
  assert.ok((await verifyCallback(make(oldOnly), { apiKey: API_KEY, secret: [newSecretValue, oldSecret], now })).ok);
  assert.ok((await verifyCallback(make(oldOnly), { apiKey: API_KEY, secret: `${newSecretValue},${oldSecret}`, now })).ok);
  assert.ok(!(await verifyCallback(make(oldOnly), { apiKey: API_KEY, secret: newSecretValue, now })).ok);
});

test("the signature covers raw UTF-8 bytes", async () => {
  const raw = `{"content_request_id":"r","status":"error","image_url":null,"error_message":"échec — 🙁","attempt":1,"prompt_id":"p","image_urls":[]}`;
  const result = await verifyCallback(await signedRequest(raw), options);
  assert.ok(result.ok);
  assert.equal(result.body.error_message, "échec — 🙁");
  assert.equal(result.rawBody, raw);
});

test("bodies that are not JSON or break the contract are invalid_body (400) with details", async () => {
  let result = await verifyCallback(await signedRequest("not json"), options);
  assert.deepEqual(!result.ok && [result.error.code, result.error.status], ["invalid_body", 400]);
  result = await verifyCallback(await signedRequest({ ...successBody(), status: "done" }), options);
  assert.ok(!result.ok);
  assert.equal(result.error.code, "invalid_body");
  assert.deepEqual(result.error.details, ['status: expected "success" or "error"']);
});

test("oversized bodies are refused with 413", async () => {
  const big = successBody({ padding: "x".repeat(2000) });
  const result = await verifyCallback(await signedRequest(big), { ...options, maxBodyBytes: 1000 });
  assert.deepEqual(!result.ok && [result.error.code, result.error.status], ["body_too_large", 413]);
});

test("a request whose body was already read is a programming error", async () => {
  const request = await signedRequest(successBody());
  await request.text();
  await assert.rejects(verifyCallback(request, options), TypeError);
});

test("verifyStatusUpdate validates intermediate updates", async () => {
  const update = { content_request_id: "r", status: "running", progress: 0.25, attempt: 1, prompt_id: "p", image_url: null, error_message: null };
  const result = await verifyStatusUpdate(await signedRequest(update), options);
  assert.ok(result.ok);
  assert.equal(result.body.progress, 0.25);
  const final = await verifyStatusUpdate(await signedRequest(successBody()), options);
  assert.ok(!final.ok && final.error.code === "invalid_body");
});
