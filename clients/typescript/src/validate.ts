/** Runtime validators for the bodies that cross the wire. Unknown extra keys are accepted and kept. */
import type { CallbackBody, CallbackOutput, JobStatus, RejectionBody, StatusUpdateBody } from "./types.js";

export type ValidationResult<T> = { ok: true; value: T } | { ok: false; errors: string[] };

type Obj = Record<string, unknown>;

const isObject = (v: unknown): v is Obj => typeof v === "object" && v !== null && !Array.isArray(v);
const isString = (v: unknown): v is string => typeof v === "string";
const isNumber = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);
const isInt = (v: unknown): v is number => Number.isInteger(v);
const isNullableString = (v: unknown): v is string | null => v === null || isString(v);
const isFraction = (v: unknown): boolean => v === null || (isNumber(v) && v >= 0 && v <= 1);

/** Collects "key: expected ..." messages for one object. */
class Checker {
  readonly errors: string[] = [];
  constructor(readonly obj: Obj, readonly path = "") {}

  check(key: string, ok: (v: unknown) => boolean, expected: string, optional = false): void {
    if (!(key in this.obj)) {
      if (!optional) this.errors.push(`${this.path}${key}: missing`);
      return;
    }
    if (!ok(this.obj[key])) this.errors.push(`${this.path}${key}: expected ${expected}`);
  }
}

const stringArray = (v: unknown): boolean => Array.isArray(v) && v.every(isString);

function checkOutput(v: unknown, path: string, errors: string[]): v is CallbackOutput {
  if (!isObject(v)) {
    errors.push(`${path}: expected an object`);
    return false;
  }
  const c = new Checker(v, `${path}.`);
  c.check("node_id", isString, "a string");
  c.check("index", isInt, "an integer");
  c.check("url", isString, "a string");
  c.check("content_type", isString, "a string");
  for (const key of ["bytes", "width", "height"]) c.check(key, isInt, "an integer");
  errors.push(...c.errors);
  return c.errors.length === 0;
}

function result<T>(value: unknown, errors: string[]): ValidationResult<T> {
  return errors.length === 0 ? { ok: true, value: value as T } : { ok: false, errors };
}

/**
 * Validates a final callback body (design.md, "Callback contract"): the four customer keys
 * exactly so, plus `attempt`, `prompt_id`, `image_urls`; `error_type`, `node_id`, `outputs`
 * and `timings` are checked when present.
 */
export function validateCallbackBody(value: unknown): ValidationResult<CallbackBody> {
  if (!isObject(value)) return { ok: false, errors: ["body: expected a JSON object"] };
  const c = new Checker(value);
  c.check("content_request_id", isString, "a string");
  c.check("status", (v) => v === "success" || v === "error", '"success" or "error"');
  c.check("attempt", (v) => isInt(v) && v >= 1, "an integer >= 1");
  c.check("prompt_id", isString, "a string");
  c.check("image_urls", stringArray, "an array of strings");
  if (value.status === "error") {
    c.check("image_url", (v) => v === null, "null when status is error");
    c.check("error_message", isString, "a string when status is error");
    c.check("error_type", isString, "a string", true);
    c.check("node_id", isNullableString, "a string or null", true);
  } else {
    c.check("image_url", isNullableString, "a string or null");
    c.check("error_message", (v) => v === null, "null when status is success");
  }
  c.check("timings", (v) => isObject(v) && Object.values(v).every(isNumber), "an object of numbers", true);
  const errors = c.errors;
  if ("outputs" in value) {
    if (Array.isArray(value.outputs)) value.outputs.forEach((o, i) => checkOutput(o, `outputs[${i}]`, errors));
    else errors.push("outputs: expected an array");
  }
  return result(value, errors);
}

/** Validates an intermediate update sent to `COURIER_STATUS_URL` (status `queued` or `running`). */
export function validateStatusUpdate(value: unknown): ValidationResult<StatusUpdateBody> {
  if (!isObject(value)) return { ok: false, errors: ["body: expected a JSON object"] };
  const c = new Checker(value);
  c.check("content_request_id", isString, "a string");
  c.check("status", (v) => v === "queued" || v === "running", '"queued" or "running"');
  c.check("progress", isFraction, "a number in 0..1 or null");
  c.check("attempt", (v) => isInt(v) && v >= 1, "an integer >= 1", true);
  c.check("prompt_id", isString, "a string", true);
  return result(value, c.errors);
}

const JOB_STATES = new Set(["queued", "running", "uploading", "success", "error"]);
const DELIVERY_STATES = new Set(["pending", "delivered", "dead", "none"]);

/** Validates the status body of `GET /execute-workflow/{id}` (also the 202/200 of POST and DELETE). */
export function validateJobStatus(value: unknown): ValidationResult<JobStatus> {
  if (!isObject(value)) return { ok: false, errors: ["body: expected a JSON object"] };
  const c = new Checker(value);
  c.check("content_request_id", isString, "a string");
  c.check("attempt", isInt, "an integer");
  c.check("prompt_id", isString, "a string");
  c.check("state", (v) => isString(v) && JOB_STATES.has(v), "a job state");
  c.check("queue_position", (v) => v === null || (isInt(v) && v >= 0), "an integer >= 0 or null");
  c.check("progress", isFraction, "a number in 0..1 or null");
  c.check("image_url", isNullableString, "a string or null");
  c.check("image_urls", stringArray, "an array of strings");
  c.check("error_message", isNullableString, "a string or null");
  c.check("error_type", isNullableString, "a string or null", true);
  c.check("callback", isObject, "an object");
  const errors = c.errors;
  if (isObject(value.callback)) {
    const cb = new Checker(value.callback, "callback.");
    cb.check("state", (v) => isString(v) && DELIVERY_STATES.has(v), "pending, delivered, dead or none");
    cb.check("attempts", isInt, "an integer");
    cb.check("last_error", isNullableString, "a string or null");
    errors.push(...cb.errors);
  }
  return result(value, errors);
}

/** True for a rejection body `{error: {type, message}, node_errors}`. */
export function isRejectionBody(value: unknown): value is RejectionBody {
  return (
    isObject(value) &&
    isObject(value.error) &&
    isString(value.error.type) &&
    isString(value.error.message)
  );
}
