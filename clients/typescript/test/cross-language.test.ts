/**
 * Callbacks built and signed by the Python side (comfy_courier.executor.signing, the
 * `standardwebhooks` library) verify with verifyCallback. Skips when python3 or the
 * comfy_courier package (`pip install -e <repo root>`) is missing.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { verifyCallback } from "../src/index.js";
import { FIXTURES, newSecret } from "./helpers.js";

interface Case {
  name: string;
  headers: Record<string, string>;
  body: string;
}

const python = process.env.PYTHON ?? "python3";
const oldSecret = newSecret();
const currentSecret = newSecret();
const timestamp = Math.floor(Date.now() / 1000);

function signWithPython(): { cases: Case[]; notes: string[] } | { skip: string } {
  const run = spawnSync(python, [FIXTURES + "sign_callback.py", JSON.stringify({ secrets: [oldSecret, currentSecret], timestamp })], {
    encoding: "utf8",
    timeout: 60_000,
  });
  if (run.error) return { skip: `${python} cannot be run (${run.error.message})` };
  if (run.status === 77) return { skip: run.stderr.trim() || "comfy_courier is not importable" };
  if (run.status !== 0) throw new Error(`sign_callback.py failed (${run.status}): ${run.stderr}`);
  return JSON.parse(run.stdout);
}

const signed = signWithPython();
const skip = "skip" in signed ? signed.skip : false;

test("callbacks signed by the Python side verify with verifyCallback (two secrets: rotation)", { skip }, async (t) => {
  if ("skip" in signed) return;
  for (const note of signed.notes) t.diagnostic(note);
  assert.ok(signed.cases.length >= 2);
  for (const { name, headers, body } of signed.cases) {
    const signatures = headers["webhook-signature"]!.split(" ");
    assert.equal(signatures.length, 2, `${name}: one v1 signature per secret`);
    const request = () =>
      new Request("https://app.example/api/comfy-callback", {
        method: "POST",
        headers: { ...headers, "content-type": "application/json", "x-api-key": "cb-key" },
        body,
      });
    for (const secret of [currentSecret, oldSecret, [newSecret(), oldSecret]]) {
      const result = await verifyCallback(request(), { apiKey: "cb-key", secret });
      assert.ok(result.ok, `${name}: ${JSON.stringify(result)}`);
      assert.deepEqual(result.body, JSON.parse(body));
      assert.equal(result.webhookId, headers["webhook-id"]);
      assert.equal(result.timestamp, timestamp);
    }
    const wrong = await verifyCallback(request(), { apiKey: "cb-key", secret: newSecret() });
    assert.ok(!wrong.ok && wrong.error.code === "bad_signature", name);
    const late = await verifyCallback(request(), { apiKey: "cb-key", secret: currentSecret, now: () => (timestamp + 301) * 1000 });
    assert.ok(!late.ok && late.error.code === "stale_timestamp", name);
  }
});
