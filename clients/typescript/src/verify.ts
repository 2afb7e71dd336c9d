/**
 * Verifying courier callbacks in a route handler: constant-time `X-API-Key` check and
 * Standard Webhooks signatures (https://www.standardwebhooks.com), with Web Crypto only,
 * so it runs on Node >= 20 and on the Edge runtime alike.
 */
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
const SECRET_PREFIX = "whsec_";

function list(value: OneOrMany): string[] {
  const items = typeof value === "string" ? value.split(",") : value ?? [];
  return items.map((s) => s.trim()).filter((s) => s.length > 0);
}

function base64ToBytes(text: string): Uint8Array | null {
  try {
    const binary = atob(text);
    return Uint8Array.from(binary, (ch) => ch.charCodeAt(0));
  } catch {
    return null;
  }
}

function bytesToBase64(bytes: Uint8Array): string {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary);
}

function secretBytes(secret: string): Uint8Array | null {
  const text = secret.startsWith(SECRET_PREFIX) ? secret.slice(SECRET_PREFIX.length) : secret;
  const bytes = base64ToBytes(text);
  return bytes && bytes.length > 0 ? bytes : null;
}

function hmacKey(bytes: Uint8Array, usage: "sign" | "verify"): Promise<CryptoKey> {
  return crypto.subtle.importKey("raw", bytes as BufferSource, { name: "HMAC", hash: "SHA-256" }, false, [usage]);
}

function signedContent(webhookId: string, timestamp: string, body: Uint8Array): Uint8Array {
  const prefix = encoder.encode(`${webhookId}.${timestamp}.`);
  const out = new Uint8Array(prefix.length + body.length);
  out.set(prefix);
  out.set(body, prefix.length);
  return out;
}

/**
 * The `v1,<base64>` signature of one event, as the courier sends it in `webhook-signature`.
 * Handy for testing your own route handler.
 */
export async function signWebhook(
  secret: string,
  webhookId: string,
  timestamp: number,
  body: string | Uint8Array,
): Promise<string> {
  const key = secretBytes(secret);
  if (!key) throw new TypeError("secret must be whsec_<base64>");
  const raw = typeof body === "string" ? encoder.encode(body) : body;
  const content = signedContent(webhookId, String(timestamp), raw);
  const mac = await crypto.subtle.sign("HMAC", await hmacKey(key, "sign"), content as BufferSource);
  return `v1,${bytesToBase64(new Uint8Array(mac))}`;
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

async function signatureMatches(header: string, content: Uint8Array, secrets: Uint8Array[]): Promise<boolean> {
  const signatures = header
    .split(" ")
    .filter((part) => part.startsWith("v1,"))
    .map((part) => base64ToBytes(part.slice(3)))
    .filter((sig): sig is Uint8Array => sig !== null);
  for (const secret of secrets) {
    const key = await hmacKey(secret, "verify");
    for (const sig of signatures) {
      // subtle.verify compares in constant time.
      if (await crypto.subtle.verify("HMAC", key, sig as BufferSource, content as BufferSource)) return true;
    }
  }
  return false;
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
  const secrets = secretTexts.map(secretBytes);
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
    const content = signedContent(webhookId, String(timestamp), raw);
    if (!(await signatureMatches(signature, content, secrets as Uint8Array[]))) {
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
