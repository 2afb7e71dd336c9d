/**
 * Verifying courier callbacks in a route handler: constant-time `X-API-Key` check and
 * Standard Webhooks signatures (https://www.standardwebhooks.com) computed by the
 * `standardwebhooks` reference library (pure JavaScript, as the courier's Python side uses
 * its Python twin), so it runs on Node >= 20 and on the Edge runtime alike.
 */
import { Webhook } from "standardwebhooks";
import type { CallbackBody, StatusUpdateBody } from "./types.js";
import { validateCallbackBody, validateStatusUpdate, type ValidationResult } from "./validate.js";

export type VerifyErrorCode =
  | "not_configured" // no usable key/secret was given to verifyCallback (500: the courier retries)
  | "missing_api_key"
  | "bad_api_key"
  | "missing_webhook_id"
  | "missing_signature"
  | "invalid_timestamp"
  | "stale_timestamp"
  | "bad_signature"
  | "body_too_large"
  | "invalid_body";

export interface VerifyError {
  code: VerifyErrorCode;
  /** The HTTP status to answer with. The courier retries every non-2xx until its horizon (only 410 stops it). */
  status: 400 | 401 | 413 | 500;
  message: string;
  /** For `invalid_body`: what did not match the contract. */
  details?: string[];
}

export type VerifyResult<T> =
  | {
      ok: true;
      body: T;
      /** `webhook-id`: stable across retries of one event. De-duplicate on it. */
      webhookId: string;
      /** `webhook-timestamp` in seconds, when the event was signed. */
      timestamp: number | null;
      /** The body exactly as received (what the signature covers). */
      rawBody: string;
    }
  | { ok: false; error: VerifyError; webhookId: string | null };

/** One value, several values, or a comma-separated list (as the courier's environment variables are). */
export type OneOrMany = string | readonly string[] | undefined;

export interface VerifyOptions {
  /**
   * Accepted `X-API-Key` value(s) (the courier's `COURIER_CALLBACK_API_KEY`).
   * Several allow rotation. Passing the option with nothing in it (an unset env var)
   * is a configuration error, never a silent skip.
   */
  apiKey?: OneOrMany;
  /**
   * Standard Webhooks secret(s) `whsec_<base64>` (the courier's `COURIER_WEBHOOK_SECRET`).
   * When given, a valid `webhook-signature` is required; any secret matching any signature passes.
   */
  secret?: OneOrMany;
  /** Accepted clock difference for `webhook-timestamp`, both directions. Default 300 s. */
  toleranceSeconds?: number;
  /** Largest accepted body. Default 1 MiB. */
  maxBodyBytes?: number;
  /** Clock in ms since the epoch (tests). Default `Date.now`. */
  now?: () => number;
}

const encoder = new TextEncoder();

function list(value: OneOrMany): string[] {
  const items = typeof value === "string" ? value.split(",") : value ?? [];
  return items.map((s) => s.trim()).filter((s) => s.length > 0);
}

/** The reference implementation's signer for one `whsec_<base64>` secret, or null if it refuses the secret. */
function webhookFor(secret: string): Webhook | null {
  try {
    return new Webhook(secret);
  } catch {
    return null; // not base64, or empty
  }
}

/**
 * The `v1,<base64>` signature of one event, as the courier sends it in `webhook-signature`
 * (computed by the `standardwebhooks` reference library). Handy for testing your own route handler.
 */
export async function signWebhook(
  secret: string,
  webhookId: string,
  timestamp: number,
  body: string | Uint8Array,
): Promise<string> {
  const webhook = webhookFor(secret);
  if (!webhook) throw new TypeError("secret must be whsec_<base64>");
  return webhook.sign(webhookId, new Date(timestamp * 1000), body);
}

/** Equal-length comparison whose time does not depend on where the bytes differ. */
function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ b[i]!;
  return diff === 0;
}

async function sha256(text: string): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", encoder.encode(text)));
}

/** Compares SHA-256 digests, so neither the content nor the length of a key leaks through timing. */
async function apiKeyMatches(given: string, accepted: string[]): Promise<boolean> {
  const digest = await sha256(given);
  let match = false;
  for (const key of accepted) match = equalBytes(digest, await sha256(key)) || match;
  return match;
}

/**
 * Does any `v1,` signature of the header match the one the reference library computes for any
 * secret? The timestamp was checked before, against our clock and tolerance: the library's own
 * `verify` checks it against `Date.now()` with a fixed 300 s, which `now`/`toleranceSeconds`
 * could not change. The comparison is the library's: whole `v1,<base64>` strings, constant time.
 */
function signatureMatches(
  header: string,
  webhookId: string,
  timestamp: number,
  raw: Uint8Array,
  webhooks: Webhook[],
): boolean {
  const given = header.split(" ").filter((part) => part.startsWith("v1,")).map((part) => encoder.encode(part));
  let match = false;
  for (const webhook of webhooks) {
    const expected = encoder.encode(webhook.sign(webhookId, new Date(timestamp * 1000), raw));
    for (const signature of given) match = equalBytes(signature, expected) || match;
  }
  return match;
}

const fail = (
  code: VerifyErrorCode,
  status: VerifyError["status"],
  message: string,
  webhookId: string | null = null,
  details?: string[],
): { ok: false; error: VerifyError; webhookId: string | null } => ({
  ok: false,
  error: details ? { code, status, message, details } : { code, status, message },
  webhookId,
});

/**
 * Authenticates a request from the courier and validates its body with `validate`.
 * Reads the body exactly once; pass the untouched Request.
 */
export async function verifyWebhook<T>(
  request: Request,
  options: VerifyOptions,
  validate: (value: unknown) => ValidationResult<T>,
): Promise<VerifyResult<T>> {
  const apiKeys = list(options.apiKey);
  const secretTexts = list(options.secret);
  const secrets = secretTexts.map(webhookFor);
  if ("apiKey" in options && apiKeys.length === 0) {
    return fail("not_configured", 500, "apiKey was passed but is empty (is the environment variable set?)");
  }
  if ("secret" in options && secretTexts.length === 0) {
    return fail("not_configured", 500, "secret was passed but is empty (is the environment variable set?)");
  }
  if (apiKeys.length === 0 && secretTexts.length === 0) {
    return fail("not_configured", 500, "configure apiKey and/or secret: refusing to accept unauthenticated callbacks");
  }
  if (secrets.some((s) => s === null)) {
    return fail("not_configured", 500, "every secret must be whsec_<base64>");
  }

  const headers = request.headers;
  if (apiKeys.length > 0) {
    const given = headers.get("x-api-key");
    if (!given) return fail("missing_api_key", 401, "X-API-Key header missing");
    if (!(await apiKeyMatches(given, apiKeys))) return fail("bad_api_key", 401, "X-API-Key does not match");
  }

  const webhookId = headers.get("webhook-id");
  if (!webhookId) return fail("missing_webhook_id", 400, "webhook-id header missing");

  const maxBytes = options.maxBodyBytes ?? 1024 * 1024;
  const declared = Number(headers.get("content-length") ?? 0);
  if (declared > maxBytes) return fail("body_too_large", 413, `body over ${maxBytes} bytes`, webhookId);

  let timestamp: number | null = null;
  let signature: string | null = null;
  if (secrets.length > 0) {
    signature = headers.get("webhook-signature");
    const stamp = headers.get("webhook-timestamp");
    if (!signature || !stamp) {
      return fail("missing_signature", 401, "webhook-signature or webhook-timestamp header missing", webhookId);
    }
    if (!/^\d{1,15}$/.test(stamp)) return fail("invalid_timestamp", 401, "webhook-timestamp is not integer seconds", webhookId);
    timestamp = Number(stamp);
    const tolerance = options.toleranceSeconds ?? 300;
    const nowSeconds = (options.now ?? Date.now)() / 1000;
    if (Math.abs(nowSeconds - timestamp) > tolerance) {
      return fail("stale_timestamp", 401, `webhook-timestamp is more than ${tolerance} s from now`, webhookId);
    }
  }

  if (request.bodyUsed) throw new TypeError("verifyCallback needs the unread request body");
  const raw = new Uint8Array(await request.arrayBuffer());
  if (raw.length > maxBytes) return fail("body_too_large", 413, `body over ${maxBytes} bytes`, webhookId);

  if (signature !== null && timestamp !== null) {
    if (!signatureMatches(signature, webhookId, timestamp, raw, secrets as Webhook[])) {
      return fail("bad_signature", 401, "no signature matches any configured secret", webhookId);
    }
  }

  let rawBody: string;
  let parsed: unknown;
  try {
    rawBody = new TextDecoder("utf-8", { fatal: true }).decode(raw);
    parsed = JSON.parse(rawBody);
  } catch {
    return fail("invalid_body", 400, "body is not UTF-8 JSON", webhookId);
  }
  const checked = validate(parsed);
  if (!checked.ok) return fail("invalid_body", 400, "body does not match the contract", webhookId, checked.errors);
  return { ok: true, body: checked.value, webhookId, timestamp, rawBody };
}

/** Verifies a final callback (`COURIER_CALLBACK_URL`) and returns its validated body. */
export function verifyCallback(request: Request, options: VerifyOptions): Promise<VerifyResult<CallbackBody>> {
  return verifyWebhook(request, options, validateCallbackBody);
}

/** Verifies an intermediate update (`COURIER_STATUS_URL`, status `queued`/`running`). */
export function verifyStatusUpdate(request: Request, options: VerifyOptions): Promise<VerifyResult<StatusUpdateBody>> {
  return verifyWebhook(request, options, validateStatusUpdate);
}
