/**
 * The comfy-courier wire contracts (design.md), as TypeScript types.
 * Snake_case names are the JSON keys exactly as they travel.
 */

/** An API-format ComfyUI workflow ("Export (API)"): node id -> node. */
export type ApiWorkflow = Record<string, WorkflowNode>;

export interface WorkflowNode {
  class_type: string;
  inputs: Record<string, unknown>;
  _meta?: { title?: string; [key: string]: unknown };
  [key: string]: unknown;
}

/** A link between nodes inside an API-format workflow: [source node id, output index]. */
export type NodeLink = [nodeId: string, outputIndex: number];

/** Body of `POST /execute-workflow`. */
export interface ExecuteWorkflowRequest {
  workflow_json: ApiWorkflow;
  /** `[A-Za-z0-9_-]{1,128}`; it becomes a storage path. */
  content_request_id: string;
}

export type JobState = "queued" | "running" | "uploading" | "success" | "error";

export type ErrorType =
  | "validation"
  | "execution"
  | "interrupted"
  | "cancelled"
  | "timeout"
  | "upload"
  | "lost";

/** `error_type` as read from the wire: a known type, or a newer one this kit does not know yet. */
export type AnyErrorType = ErrorType | (string & {});

export type CallbackDeliveryState = "pending" | "delivered" | "dead" | "none";

/** Body of `GET /execute-workflow/{id}`, of the 202, of the 200 replay and of the DELETE 202. */
export interface JobStatus {
  content_request_id: string;
  attempt: number;
  prompt_id: string;
  state: JobState;
  /** 0 while running, n = jobs of ComfyUI's whole queue ahead of it; null once past running. */
  queue_position: number | null;
  /** 0..1, or null when unknown. */
  progress: number | null;
  image_url: string | null;
  image_urls: string[];
  error_message: string | null;
  error_type?: AnyErrorType | null;
  callback: {
    state: CallbackDeliveryState;
    attempts: number;
    last_error: string | null;
  };
  [key: string]: unknown;
}

/** Error types the courier itself answers with; ComfyUI's validation types pass through too. */
export type RejectionType =
  | "not_configured"
  | "unavailable"
  | "unauthorized"
  | "payload_too_large"
  | "invalid_request"
  | "not_found"
  | "conflict"
  | "idempotency_conflict"
  | "queue_full"
  | "internal_error"
  | (string & {});

/** JSON body of every rejection (4xx/5xx): `node_errors` at top level, as ComfyUI's `/prompt` has it. */
export interface RejectionBody {
  error: {
    type: RejectionType;
    message: string;
    /** The offending field (`invalid_request`). */
    field?: string;
    /** Unknown fields of the body (`invalid_request`). */
    fields?: string[];
    /** The malformed node of `workflow_json` (`invalid_request`). */
    node_id?: string;
    /** `ui_format`: a UI-format workflow was sent; export it in API format. */
    hint?: string;
    /** As the Retry-After header (`queue_full`). */
    retry_after?: number;
    [key: string]: unknown;
  };
  node_errors: Record<string, unknown>;
}

/** One delivered image, in `image_urls` order. */
export interface CallbackOutput {
  node_id: string;
  index: number;
  url: string;
  content_type: string;
  bytes: number;
  width: number;
  height: number;
  [key: string]: unknown;
}

interface CallbackCommon {
  content_request_id: string;
  /** Which run of this content_request_id (a new POST after a final error starts attempt + 1). */
  attempt: number;
  prompt_id: string;
  image_urls: string[];
  outputs?: CallbackOutput[];
  /** Milliseconds per phase, e.g. queued_ms, execution_ms, upload_ms, total_ms. */
  timings?: Record<string, number>;
  [key: string]: unknown;
}

export interface SuccessCallback extends CallbackCommon {
  status: "success";
  /** The first of `image_urls` (null only if the workflow delivered no image). */
  image_url: string | null;
  error_message: null;
}

export interface ErrorCallback extends CallbackCommon {
  status: "error";
  image_url: null;
  error_message: string;
  error_type?: AnyErrorType;
  /** The failing node, where known. */
  node_id?: string | null;
}

/** The final callback POSTed to `COURIER_CALLBACK_URL`. Unknown extra keys are kept. */
export type CallbackBody = SuccessCallback | ErrorCallback;

/** An optional intermediate update POSTed to `COURIER_STATUS_URL` (best effort). */
export interface StatusUpdateBody {
  content_request_id: string;
  status: "queued" | "running";
  progress: number | null;
  attempt?: number;
  prompt_id?: string;
  image_url?: null;
  error_message?: null;
  [key: string]: unknown;
}
