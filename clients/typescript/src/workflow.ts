/**
 * Patch helpers for API-format workflows. Every exported function returns a new workflow and
 * leaves its argument untouched, so a base workflow cached or stored by the app is never changed.
 */
import type { ApiWorkflow, NodeLink, WorkflowNode } from "./types.js";

export type WorkflowPatchErrorCode =
  | "not_api_format"
  | "node_not_found"
  | "no_prompt_node"
  | "ambiguous_prompt_node"
  | "not_a_text_node"
  | "no_size_node"
  | "no_seed_input"
  | "invalid_value";

export class WorkflowPatchError extends Error {
  override readonly name = "WorkflowPatchError";
  constructor(
    readonly code: WorkflowPatchErrorCode,
    message: string,
    /** The nodes concerned (candidates of an ambiguous match, ...). */
    readonly nodeIds: string[] = [],
  ) {
    super(message);
  }
}

/** Pick a node explicitly instead of letting the helper find it. */
export interface NodeSelector {
  nodeId?: string;
  /** Exact `_meta.title`, as set in ComfyUI's UI ("Positive prompt", ...). */
  title?: string;
}

// ---------------------------------------------------------------------------------------------
// Graph basics

function isLink(value: unknown): value is NodeLink {
  return (
    Array.isArray(value) &&
    value.length === 2 &&
    (typeof value[0] === "string" || typeof value[0] === "number") &&
    typeof value[1] === "number"
  );
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);

/** Throws `not_api_format` unless `value` looks like an API-format workflow. */
export function assertApiWorkflow(value: unknown): asserts value is ApiWorkflow {
  if (!isObject(value)) throw new WorkflowPatchError("not_api_format", "workflow must be a JSON object");
  if (Array.isArray(value.nodes) && Array.isArray(value.links)) {
    throw new WorkflowPatchError(
      "not_api_format",
      'this is a UI-format workflow (nodes/links arrays): export it with "Export (API)" in ComfyUI',
    );
  }
  for (const [id, node] of Object.entries(value)) {
    if (!isObject(node) || typeof node.class_type !== "string" || !isObject(node.inputs)) {
      throw new WorkflowPatchError("not_api_format", `node ${id} has no class_type/inputs`, [id]);
    }
  }
}

function copy(workflow: ApiWorkflow): ApiWorkflow {
  assertApiWorkflow(workflow);
  return structuredClone(workflow);
}

function describe(workflow: ApiWorkflow, id: string): string {
  const node = workflow[id];
  const title = node?._meta?.title;
  return `${id} (${node?.class_type ?? "missing"}${title ? `, "${title}"` : ""})`;
}

function select(workflow: ApiWorkflow, selector: NodeSelector): string[] {
  if (selector.nodeId !== undefined) {
    if (!workflow[selector.nodeId]) {
      throw new WorkflowPatchError("node_not_found", `no node with id ${selector.nodeId}`, [selector.nodeId]);
    }
    return [selector.nodeId];
  }
  const ids = Object.keys(workflow).filter((id) => workflow[id]?._meta?.title === selector.title);
  if (ids.length === 0) throw new WorkflowPatchError("node_not_found", `no node titled "${selector.title}"`);
  return ids;
}

const selects = (s?: NodeSelector): s is NodeSelector => s?.nodeId !== undefined || s?.title !== undefined;

// ---------------------------------------------------------------------------------------------
// Prompt text

export type Polarity = "positive" | "negative";

/** Text encoders and the string inputs that carry the prompt (all of them get the text). */
export const TEXT_ENCODERS: Readonly<Record<string, readonly string[]>> = {
  CLIPTextEncode: ["text"],
  CLIPTextEncodeSDXL: ["text_g", "text_l"],
  CLIPTextEncodeSDXLRefiner: ["text"],
  CLIPTextEncodeFlux: ["clip_l", "t5xxl"],
  CLIPTextEncodeSD3: ["clip_l", "clip_g", "t5xxl"],
  CLIPTextEncodeHiDream: ["clip_l", "clip_g", "t5xxl", "llama"],
  CLIPTextEncodeHunyuanDiT: ["bert", "mt5xl"],
  CLIPTextEncodePixArtAlpha: ["text"],
  CLIPTextEncodeLumina2: ["user_prompt"],
  TextEncodeQwenImageEdit: ["prompt"],
  TextEncodeQwenImageEditPlus: ["prompt"],
};

/** Where samplers and guiders take their conditioning. */
const SAMPLERS: Readonly<Record<string, Partial<Record<Polarity, string>>>> = {
  KSampler: { positive: "positive", negative: "negative" },
  KSamplerAdvanced: { positive: "positive", negative: "negative" },
  SamplerCustom: { positive: "positive", negative: "negative" },
  CFGGuider: { positive: "positive", negative: "negative" }, // SamplerCustomAdvanced's guider
  PerpNegGuider: { positive: "positive", negative: "negative" },
  DualCFGGuider: { positive: "cond1", negative: "negative" },
  BasicGuider: { positive: "conditioning" },
};

/**
 * Conditioning pass-through nodes: for each output index, the input(s) it derives from.
 * Nodes that merge two conditionings list both: the trace then finds two encoders and asks
 * for a title instead of guessing. ConditioningZeroOut maps to nothing on purpose: its output
 * ignores the text, so setting a prompt behind it would silently do nothing.
 */
const PASS_THROUGH: Readonly<Record<string, readonly (readonly string[])[]>> = {
  ConditioningSetArea: [["conditioning"]],
  ConditioningSetAreaPercentage: [["conditioning"]],
  ConditioningSetAreaStrength: [["conditioning"]],
  ConditioningSetMask: [["conditioning"]],
  ConditioningSetTimestepRange: [["conditioning"]],
  FluxGuidance: [["conditioning"]],
  ReferenceLatent: [["conditioning"]],
  FluxKontextMultiReferenceLatentMethod: [["conditioning"]],
  StyleModelApply: [["conditioning"]],
  unCLIPConditioning: [["conditioning"]],
  GLIGENTextBoxApply: [["conditioning_to"]],
  ControlNetApply: [["conditioning"]],
  ControlNetApplyAdvanced: [["positive"], ["negative"]],
  ControlNetApplySD3: [["positive"], ["negative"]],
  InpaintModelConditioning: [["positive"], ["negative"]],
  InstructPixToPixConditioning: [["positive"], ["negative"]],
  ConditioningCombine: [["conditioning_1", "conditioning_2"]],
  ConditioningConcat: [["conditioning_to", "conditioning_from"]],
  ConditioningAverage: [["conditioning_to", "conditioning_from"]],
  ConditioningZeroOut: [[]],
};

/** The prompt inputs of a node, or null if it is not a text encoder. Unknown nodes with a string `text`/`prompt` count. */
function textFields(node: WorkflowNode): readonly string[] | null {
  const known = TEXT_ENCODERS[node.class_type];
  if (known) return known;
  if (PASS_THROUGH[node.class_type] || SAMPLERS[node.class_type]) return null;
  const field = ["text", "prompt"].find((name) => typeof node.inputs[name] === "string");
  return field ? [field] : null;
}

/** Inputs to follow from an unlisted node reached at `output`: a lone `conditioning`, or positive/negative by index. */
function upstreamInputs(node: WorkflowNode, output: number): readonly string[] {
  const listed = PASS_THROUGH[node.class_type];
  if (listed) return listed[output] ?? [];
  if (isLink(node.inputs.conditioning)) return ["conditioning"];
  if (isLink(node.inputs.positive) && isLink(node.inputs.negative)) return output === 0 ? ["positive"] : output === 1 ? ["negative"] : [];
  return [];
}

/** Sampler-like nodes: the known ones, plus unlisted nodes with a linked `positive`/`negative` input (FaceDetailer, ...). */
function samplerInput(node: WorkflowNode, polarity: Polarity): string | undefined {
  const known = SAMPLERS[node.class_type];
  if (known) return known[polarity];
  if (PASS_THROUGH[node.class_type] || TEXT_ENCODERS[node.class_type]) return undefined;
  return isLink(node.inputs[polarity]) ? polarity : undefined;
}

interface Trace {
  encoders: string[];
  deadEnds: string[];
  samplers: number;
}

function trace(workflow: ApiWorkflow, polarity: Polarity): Trace {
  const encoders = new Set<string>();
  const deadEnds = new Set<string>();
  const seen = new Set<string>();
  let samplers = 0;

  const follow = (link: NodeLink): void => {
    const id = String(link[0]);
    const key = `${id}:${link[1]}`;
    if (seen.has(key)) return;
    seen.add(key);
    const node = workflow[id];
    if (!node) return void deadEnds.add(`${id} (missing)`);
    if (textFields(node)) return void encoders.add(id);
    const inputs = upstreamInputs(node, link[1]).map((name) => node.inputs[name]).filter(isLink);
    if (inputs.length === 0) deadEnds.add(describe(workflow, id));
    inputs.forEach(follow);
  };

  for (const node of Object.values(workflow)) {
    const input = samplerInput(node, polarity);
    const link = input === undefined ? undefined : node.inputs[input];
    if (isLink(link)) {
      samplers++;
      follow(link);
    }
  }
  return { encoders: [...encoders].sort(), deadEnds: [...deadEnds], samplers };
}

/**
 * The text encoders feeding the samplers' `positive` (or `negative`) conditioning, found by
 * following links through common conditioning nodes (ControlNet, FluxGuidance, area/timestep, ...).
 */
export function findPromptNodes(workflow: ApiWorkflow, polarity: Polarity = "positive"): string[] {
  assertApiWorkflow(workflow);
  return trace(workflow, polarity).encoders;
}

export interface PromptOptions extends NodeSelector {
  /** Set every match instead of failing when several encoders (or titled nodes) are found. */
  all?: boolean;
}

/** How the caller picks a node, named in error messages (patchWorkflow names its own option). */
const SELECT_HINT = "{ title } or { nodeId }";

function applyPrompt(
  workflow: ApiWorkflow,
  text: string,
  polarity: Polarity,
  options: PromptOptions,
  hint = SELECT_HINT,
): void {
  if (typeof text !== "string") throw new WorkflowPatchError("invalid_value", "prompt text must be a string");
  let ids: string[];
  if (selects(options)) {
    ids = select(workflow, options);
  } else {
    const found = trace(workflow, polarity);
    ids = found.encoders;
    if (ids.length === 0) {
      const why =
        found.samplers === 0
          ? "no sampler with a linked conditioning input was found"
          : `the ${polarity} conditioning ends at ${found.deadEnds.join(", ") || "nothing"}`;
      throw new WorkflowPatchError(
        "no_prompt_node",
        `no ${polarity} text encoder: ${why}; choose the node by title or id with ${hint}`,
      );
    }
  }
  if (ids.length > 1 && !options.all) {
    throw new WorkflowPatchError(
      "ambiguous_prompt_node",
      `several ${polarity} prompt nodes: ${ids.map((id) => describe(workflow, id)).join(", ")}; ` +
        `choose one by title or id with ${hint}, or set them all with all: true`,
      ids,
    );
  }
  for (const id of ids) {
    const node = workflow[id]!;
    const fields = textFields(node);
    if (!fields) {
      throw new WorkflowPatchError("not_a_text_node", `node ${describe(workflow, id)} has no prompt text input`, [id]);
    }
    for (const field of fields) node.inputs[field] = text; // a linked text input is replaced by the literal
  }
}

/**
 * Sets the positive prompt: the text encoder feeding the samplers' `positive` input (through
 * ControlNet, FluxGuidance, area and timestep nodes), or the node chosen by `title`/`nodeId`.
 * Encoders with several text inputs (SDXL, Flux, SD3, ...) get the text in each of them.
 */
export function setPositivePrompt(workflow: ApiWorkflow, text: string, options: PromptOptions = {}): ApiWorkflow {
  const out = copy(workflow);
  applyPrompt(out, text, "positive", options);
  return out;
}

/** Sets the negative prompt, found like the positive one through the samplers' `negative` input. */
export function setNegativePrompt(workflow: ApiWorkflow, text: string, options: PromptOptions = {}): ApiWorkflow {
  const out = copy(workflow);
  applyPrompt(out, text, "negative", options);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Image size

/** Aspect ratios (width:height) of the named social formats. */
export const FORMATS = {
  story: [9, 16],
  post: [1, 1],
  landscape: [1.91, 1],
  portrait: [4, 5],
} as const satisfies Record<string, readonly [number, number]>;

export type FormatName = keyof typeof FORMATS;
/** A named format or an aspect ratio `[width, height]`. */
export type Format = FormatName | readonly [number, number];

export interface Size {
  width: number;
  height: number;
}

export interface SizeOptions {
  /** Pixel budget in ComfyUI's megapixels (1 = 1024 x 1024). Default 1. Ignored when `longSide` is set. */
  megapixels?: number;
  /** Length of the longer side instead of a pixel budget (e.g. 1080). */
  longSide?: number;
  /** Both sides are rounded to the nearest multiple of this. Default 8 (64 gives SDXL's buckets). */
  multiple?: number;
}

/**
 * Nodes whose `width`/`height` set the image size: the latent nodes, nodes that must agree with
 * them, and EmptyImage, which sets the size of a model-free workflow (the courier's sample).
 */
export const SIZE_NODES: readonly string[] = [
  "EmptyLatentImage",
  "EmptySD3LatentImage",
  "EmptyHunyuanImageLatent",
  "EmptyChromaRadianceLatentImage",
  "ModelSamplingFlux", // its shift depends on the image size
  "EmptyImage", // only when there is no latent node: beside one it is a mask or canvas of its own
];
const LATENT_NODES = SIZE_NODES.filter((name) => name.startsWith("Empty") && name !== "EmptyImage");
const LATENT_SIZED = SIZE_NODES.filter((name) => name !== "EmptyImage");

const positive = (v: number | undefined): boolean => v === undefined || (Number.isFinite(v) && v > 0);

/**
 * Width and height for a format, rounded to multiples of 8. With the defaults (1 megapixel):
 * post 1024x1024, story 768x1368, landscape 1416x744, portrait 912x1144.
 */
export function formatSize(format: Format, options: SizeOptions = {}): Size {
  const ratio = typeof format === "string" ? FORMATS[format] : format;
  if (!ratio || !(ratio[0] > 0 && ratio[1] > 0)) {
    throw new WorkflowPatchError("invalid_value", `unknown format ${JSON.stringify(format)}`);
  }
  const { megapixels = 1, longSide, multiple = 8 } = options;
  if (!positive(megapixels) || !positive(longSide) || !Number.isInteger(multiple) || multiple < 1) {
    throw new WorkflowPatchError("invalid_value", "megapixels, longSide and multiple must be positive");
  }
  const aspect = ratio[0] / ratio[1];
  let width: number;
  let height: number;
  if (longSide !== undefined) {
    [width, height] = aspect >= 1 ? [longSide, longSide / aspect] : [longSide * aspect, longSide];
  } else {
    const pixels = megapixels * 1024 * 1024;
    [width, height] = [Math.sqrt(pixels * aspect), Math.sqrt(pixels / aspect)];
  }
  const round = (v: number) => Math.max(multiple, Math.round(v / multiple) * multiple);
  return { width: round(width), height: round(height) };
}

/**
 * Sets `width`/`height` on the latent nodes (EmptyLatentImage, EmptySD3LatentImage, ...; and
 * ModelSamplingFlux) or on the node chosen by `title`/`nodeId`.
 */
export function setSize(workflow: ApiWorkflow, size: Size, options: NodeSelector = {}): ApiWorkflow {
  const out = copy(workflow);
  applySize(out, size, options);
  return out;
}

function applySize(workflow: ApiWorkflow, size: Size, options: NodeSelector, hint = SELECT_HINT): void {
  for (const v of [size.width, size.height]) {
    if (!Number.isInteger(v) || v < 16 || v % 8 !== 0) {
      throw new WorkflowPatchError("invalid_value", `width and height must be integers >= 16 and multiples of 8, got ${v}`);
    }
  }
  let ids: string[];
  if (selects(options)) {
    ids = select(workflow, options);
  } else {
    const ofClass = (names: readonly string[]) => Object.keys(workflow).filter((id) => names.includes(workflow[id]!.class_type));
    ids = ofClass(LATENT_SIZED);
    if (!ids.some((id) => LATENT_NODES.includes(workflow[id]!.class_type))) ids = ofClass(["EmptyImage"]);
    if (ids.length === 0) {
      throw new WorkflowPatchError(
        "no_size_node",
        `no ${LATENT_NODES.join("/")} or EmptyImage node; choose the node by title or id with ${hint}`,
      );
    }
  }
  for (const id of ids) {
    const inputs = workflow[id]!.inputs;
    if (!("width" in inputs) || !("height" in inputs)) {
      throw new WorkflowPatchError("no_size_node", `node ${describe(workflow, id)} has no width/height`, [id]);
    }
    inputs.width = size.width;
    inputs.height = size.height;
  }
}

/** Sets the image size from a named format (see {@link formatSize} for the sizes). */
export function setFormat(workflow: ApiWorkflow, format: Format, options: SizeOptions & NodeSelector = {}): ApiWorkflow {
  return setSize(workflow, formatSize(format, options), options);
}

// ---------------------------------------------------------------------------------------------
// Seeds

const SEED_INPUTS = ["seed", "noise_seed"];

/** A random seed in 0..2^53-1 (JSON-safe; ComfyUI accepts up to 2^64-1). */
export function randomSeed(): number {
  const [hi, lo] = crypto.getRandomValues(new Uint32Array(2));
  return (hi! & 0x1fffff) * 2 ** 32 + lo!;
}

function applySeed(workflow: ApiWorkflow, seed: number, options: NodeSelector): void {
  if (!Number.isSafeInteger(seed) || seed < 0) {
    throw new WorkflowPatchError("invalid_value", `seed must be an integer in 0..${Number.MAX_SAFE_INTEGER}`);
  }
  const ids = selects(options) ? select(workflow, options) : Object.keys(workflow);
  let count = 0;
  for (const id of ids) {
    const inputs = workflow[id]!.inputs;
    for (const name of SEED_INPUTS) {
      if (typeof inputs[name] === "number") {
        inputs[name] = seed;
        count++;
      }
    }
  }
  if (count === 0) {
    throw new WorkflowPatchError(
      "no_seed_input",
      `no literal seed/noise_seed input (KSampler, SamplerCustom, RandomNoise, ...)${selects(options) ? " on the chosen node" : ""}`,
    );
  }
}

/** Sets every literal `seed`/`noise_seed` input (KSampler, KSamplerAdvanced, SamplerCustom, RandomNoise, ...). */
export function setSeed(workflow: ApiWorkflow, seed: number, options: NodeSelector = {}): ApiWorkflow {
  const out = copy(workflow);
  applySeed(out, seed, options);
  return out;
}

// ---------------------------------------------------------------------------------------------
// All at once

export interface WorkflowPatch {
  /** Positive prompt text (found as {@link setPositivePrompt} does). */
  prompt?: string;
  negativePrompt?: string;
  /** A named format or aspect ratio, sized by `sizeOptions`. */
  format?: Format;
  sizeOptions?: SizeOptions;
  /** An exact size instead of `format`. */
  size?: Size;
  /** A seed, or "random" for {@link randomSeed}. */
  seed?: number | "random";
  /** Which node gets `prompt`, when the trace finds none or several: `{ title }`, `{ nodeId }`, `{ all: true }`. */
  promptNode?: PromptOptions;
  /** Which node gets `negativePrompt`. */
  negativePromptNode?: PromptOptions;
  /** Which node gets `format`/`size` instead of the latent (or EmptyImage) nodes. */
  sizeNode?: NodeSelector;
  /** Which node gets `seed` instead of every literal seed input. */
  seedNode?: NodeSelector;
}

const patchHint = (field: string): string => `patchWorkflow's ${field}: ${SELECT_HINT}`;

/**
 * Applies several patches to one copy of `base`; `base` is left untouched. Each patch finds its
 * node as the matching set* helper does, or takes the one chosen in `promptNode`,
 * `negativePromptNode`, `sizeNode` or `seedNode` (`{ title }` is the robust choice).
 */
export function patchWorkflow(base: ApiWorkflow, patch: WorkflowPatch): ApiWorkflow {
  const out = copy(base);
  if (patch.prompt !== undefined) {
    applyPrompt(out, patch.prompt, "positive", patch.promptNode ?? {}, patchHint("promptNode"));
  }
  if (patch.negativePrompt !== undefined) {
    applyPrompt(out, patch.negativePrompt, "negative", patch.negativePromptNode ?? {}, patchHint("negativePromptNode"));
  }
  const size = patch.size ?? (patch.format !== undefined ? formatSize(patch.format, patch.sizeOptions) : undefined);
  if (size !== undefined) applySize(out, size, patch.sizeNode ?? {}, patchHint("sizeNode"));
  if (patch.seed !== undefined) {
    applySeed(out, patch.seed === "random" ? randomSeed() : patch.seed, patch.seedNode ?? {});
  }
  return out;
}
