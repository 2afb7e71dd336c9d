/** Calling the courier's routes on the ComfyUI host: submit, poll, cancel. */
import type { ApiWorkflow, ExecuteWorkflowRequest, JobStatus, RejectionBody } from "./types.js";
import { isRejectionBody, validateJobStatus } from "./validate.js";

export interface CourierOptions {
  /** ComfyUI's address, e.g. `https://gpu-1.example.com:8188` (a path prefix such as `/api` is fine). */
  baseUrl: string;
  /** Sent as `X-API-Key` (one of the courier's `COURIER_API_KEY` values). */
  apiKey: string;
  /**
   * Extra tries after a network error, 429, 502, 503 or 504. Default 0. Safe for POST too:
   * the courier de-duplicates on `content_request_id`.
   */
  retries?: number;
  /** Longest wait between tries; a longer `Retry-After` ends the retries. Default 10 000 ms. */
  maxRetryDelayMs?: number;
  /** Cancels the request, e.g. `AbortSignal.timeout(10_000)`; an abort rejects the promise. */
  signal?: AbortSignal;
  /** Replaces the global fetch (tests, instrumentation). */
  fetch?: typeof fetch;
  /** Replaces the timer between retries (tests). */
  sleep?: (ms: number) => Promise<void>;
}

/** The courier (or something in front of it) said no. Nothing runs and no callback follows. */
export interface Rejected {
  kind: "rejected";
  httpStatus: number;
  /** `type` is the courier's (e.g. `unauthorized`, `idempotency_conflict`, `queue_full`) or
   * ComfyUI's validation type; `http_error` / `invalid_response` when the body was not the courier's. */
  error: RejectionBody["error"];
  /** ComfyUI's per-node validation errors (400), else `{}`. */
  nodeErrors: Record<string, unknown>;
  /** From `Retry-After` (429, sometimes 503), in seconds; null when absent. */
  retryAfterSeconds: number | null;
}

/** No HTTP answer (DNS, refused, reset, timeout). Whether a POST was accepted is unknown: retrying with the same id is safe. */
export interface Unreachable {
  kind: "unreachable";
  /** The error and its causes, e.g. `fetch failed: connect ECONNREFUSED 10.0.0.5:8188 (ECONNREFUSED)`. */
  message: string;
  /** The innermost error code, e.g. `ECONNREFUSED`, `ENOTFOUND`, `UND_ERR_CONNECT_TIMEOUT`; null when none was given. */
  code: string | null;
  cause: unknown;
}

export type ExecuteResult =
  | { kind: "accepted"; httpStatus: 202; job: JobStatus }
  /** The id was already accepted (still running, or succeeded): nothing new runs. */
  | { kind: "replayed"; httpStatus: 200; job: JobStatus }
  | Rejected
  | Unreachable;

export type StatusResult = { kind: "found"; httpStatus: 200; job: JobStatus } | Rejected | Unreachable;

/** `cancelling`: removed from the queue or interrupted; an `error` callback (`cancelled`) follows. */
export type CancelResult = { kind: "cancelling"; httpStatus: 202; job: JobStatus } | Rejected | Unreachable;

const ID_PATTERN = /^[A-Za-z0-9_-]{1,128}$/;
const RETRYABLE_STATUS = new Set([429, 502, 503, 504]);

/** True for ids the courier accepts: `[A-Za-z0-9_-]{1,128}` (they become storage paths). */
export function isValidContentRequestId(id: string): boolean {
  return ID_PATTERN.test(id);
}

function checkId(id: string): string {
  if (!isValidContentRequestId(id)) {
    throw new TypeError(`content_request_id must match [A-Za-z0-9_-]{1,128}, got ${JSON.stringify(id)}`);
  }
  return id;
}

function jobUrl(baseUrl: string, id?: string): string {
  const base = `${baseUrl.replace(/\/+$/, "")}/execute-workflow`;
  return id === undefined ? base : `${base}/${checkId(id)}`;
}

/** Seconds from a Retry-After value: delta-seconds or an HTTP date. */
export function parseRetryAfter(value: string | null, nowMs = Date.now()): number | null {
  if (!value) return null;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text);
  const when = Date.parse(text);
  return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - nowMs) / 1000));
}

function rejected(httpStatus: number, type: string, message: string): Rejected {
  return { kind: "rejected", httpStatus, error: { type, message }, nodeErrors: {}, retryAfterSeconds: null };
}

type Answer = { status: number; job: JobStatus } | Rejected | Unreachable;

async function readAnswer(response: Response): Promise<Answer> {
  const text = await response.text();
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = undefined;
  }
  if (response.ok) {
    const checked = validateJobStatus(body);
    if (checked.ok) return { status: response.status, job: checked.value };
    return rejected(response.status, "invalid_response", `not a courier status body: ${checked.errors.join("; ")}`);
  }
  const out = rejected(response.status, "http_error", text.slice(0, 500) || `HTTP ${response.status}`);
  if (isRejectionBody(body)) {
    out.error = body.error;
    out.nodeErrors = body.node_errors ?? {};
  }
  const fromBody = typeof out.error.retry_after === "number" ? out.error.retry_after : null;
  out.retryAfterSeconds = parseRetryAfter(response.headers.get("retry-after")) ?? fromBody;
  return out;
}

/**
 * What went wrong, from an error and its `cause` chain: Node's fetch rejects with a bare
 * "fetch failed" and puts the reason (ECONNREFUSED, ENOTFOUND, a connect or headers timeout)
 * in `cause`, sometimes an AggregateError of one failure per address tried.
 */
export function describeNetworkError(error: unknown): { message: string; code: string | null } {
  const parts: string[] = [];
  let code: string | null = null;
  let current: unknown = error;
  for (let depth = 0; current !== undefined && current !== null && depth < 6; depth++) {
    if (typeof current !== "object") {
      parts.push(String(current));
      break;
    }
    const e = current as { message?: unknown; code?: unknown; cause?: unknown; errors?: unknown; name?: unknown };
    const inner = Array.isArray(e.errors) ? (e.errors as unknown[]) : [];
    let text = typeof e.message === "string" ? e.message.trim() : "";
    if (!text && inner.length > 0) text = inner.map((x) => describeNetworkError(x).message).join("; ");
    if (!text && typeof e.name === "string") text = e.name;
    if (typeof e.code === "string" && e.code) {
      code = e.code;
      if (!text.includes(e.code)) text = text ? `${text} (${e.code})` : e.code;
    }
    if (text && parts[parts.length - 1] !== text) parts.push(text);
    current = e.cause ?? (inner.length === 1 ? inner[0] : undefined);
  }
  return { message: parts.join(": ") || "network error", code };
}

const defaultSleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

async function call(options: CourierOptions, method: string, url: string, body?: string): Promise<Answer> {
  const doFetch = options.fetch ?? globalThis.fetch;
  const sleep = options.sleep ?? defaultSleep;
  const retries = Math.max(0, Math.floor(options.retries ?? 0));
  const maxDelay = options.maxRetryDelayMs ?? 10_000;
  const headers: Record<string, string> = { "X-API-Key": options.apiKey, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";

  for (let attempt = 0; ; attempt++) {
    let answer: Answer;
    try {
      const response = await doFetch(url, { method, headers, body, signal: options.signal ?? null });
      answer = await readAnswer(response);
    } catch (error) {
      if (options.signal?.aborted) throw error;
      answer = { kind: "unreachable", ...describeNetworkError(error), cause: error };
    }
    if (attempt >= retries || !("kind" in answer)) return answer;
    if (answer.kind === "rejected" && !RETRYABLE_STATUS.has(answer.httpStatus)) return answer;
    const hinted = answer.kind === "rejected" ? answer.retryAfterSeconds : null;
    if (hinted !== null && hinted * 1000 > maxDelay) return answer;
    await sleep(hinted !== null ? hinted * 1000 : Math.min(maxDelay, 500 * 2 ** attempt * (1 + Math.random() / 4)));
  }
}

/**
 * `POST /execute-workflow`. Resolves to `accepted` (202), `replayed` (200: this id is already
 * known and not failed), `rejected` (typed error, `retryAfterSeconds` on 429) or `unreachable`.
 * Throws only on an invalid `contentRequestId` or an abort.
 */
export async function executeWorkflow(
  options: CourierOptions & { workflow: ApiWorkflow; contentRequestId: string },
): Promise<ExecuteResult> {
  const payload: ExecuteWorkflowRequest = {
    workflow_json: options.workflow,
    content_request_id: checkId(options.contentRequestId),
  };
  const answer = await call(options, "POST", jobUrl(options.baseUrl), JSON.stringify(payload));
  if ("kind" in answer) return answer;
  if (answer.status === 202) return { kind: "accepted", httpStatus: 202, job: answer.job };
  if (answer.status === 200) return { kind: "replayed", httpStatus: 200, job: answer.job };
  return rejected(answer.status, "invalid_response", `unexpected HTTP ${answer.status}`);
}

/** `GET /execute-workflow/{id}`: 404 comes back as `rejected` with `error.type` `not_found`. */
export async function getStatus(options: CourierOptions & { contentRequestId: string }): Promise<StatusResult> {
  const answer = await call(options, "GET", jobUrl(options.baseUrl, options.contentRequestId));
  if ("kind" in answer) return answer;
  if (answer.status === 200) return { kind: "found", httpStatus: 200, job: answer.job };
  return rejected(answer.status, "invalid_response", `unexpected HTTP ${answer.status}`);
}

/** `DELETE /execute-workflow/{id}`: 409 once the prompt has finished, 404 for an unknown id. */
export async function cancel(options: CourierOptions & { contentRequestId: string }): Promise<CancelResult> {
  const answer = await call(options, "DELETE", jobUrl(options.baseUrl, options.contentRequestId));
  if ("kind" in answer) return answer;
  if (answer.status === 202) return { kind: "cancelling", httpStatus: 202, job: answer.job };
  return rejected(answer.status, "invalid_response", `unexpected HTTP ${answer.status}`);
}

/** The three calls bound to one host and key. */
export function createCourierClient(options: CourierOptions) {
  return {
    executeWorkflow: (workflow: ApiWorkflow, contentRequestId: string) =>
      executeWorkflow({ ...options, workflow, contentRequestId }),
    getStatus: (contentRequestId: string) => getStatus({ ...options, contentRequestId }),
    cancel: (contentRequestId: string) => cancel({ ...options, contentRequestId }),
  };
}
