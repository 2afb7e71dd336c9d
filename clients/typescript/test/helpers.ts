import { fileURLToPath } from "node:url";
import { readFileSync } from "node:fs";
import type { ApiWorkflow, CallbackBody, JobStatus } from "../src/index.js";

/** test/fixtures, from dist/test at run time. */
export const FIXTURES = fileURLToPath(new URL("../../test/fixtures/", import.meta.url));

export function loadWorkflow(name: string): ApiWorkflow {
  return JSON.parse(readFileSync(FIXTURES + name, "utf8")) as ApiWorkflow;
}

export function successBody(overrides: Record<string, unknown> = {}): CallbackBody {
  return {
    content_request_id: "req-1",
    status: "success",
    image_url: "https://cdn.example/req-1/1-0.png",
    error_message: null,
    attempt: 1,
    prompt_id: "5f0c1a7e-0000-4000-8000-000000000001",
    image_urls: ["https://cdn.example/req-1/1-0.png"],
    ...overrides,
  } as CallbackBody;
}

export function errorBody(overrides: Record<string, unknown> = {}): CallbackBody {
  return {
    content_request_id: "req-2",
    status: "error",
    image_url: null,
    error_message: "KSampler failed",
    attempt: 2,
    prompt_id: "5f0c1a7e-0000-4000-8000-000000000002",
    image_urls: [],
    error_type: "execution",
    node_id: "3",
    ...overrides,
  } as CallbackBody;
}

export function jobStatus(overrides: Partial<JobStatus> = {}): JobStatus {
  return {
    content_request_id: "req-1",
    attempt: 1,
    prompt_id: "5f0c1a7e-0000-4000-8000-000000000001",
    state: "queued",
    queue_position: 2,
    progress: null,
    image_url: null,
    image_urls: [],
    error_message: null,
    error_type: null,
    callback: { state: "none", attempts: 0, last_error: null },
    ...overrides,
  };
}

/** A fresh `whsec_` secret. */
export function newSecret(): string {
  return "whsec_" + Buffer.from(crypto.getRandomValues(new Uint8Array(24))).toString("base64");
}
