import { test } from "node:test";
import assert from "node:assert/strict";
import {
  FORMATS,
  WorkflowPatchError,
  findPromptNodes,
  formatSize,
  patchWorkflow,
  randomSeed,
  setFormat,
  setNegativePrompt,
  setPositivePrompt,
  setSeed,
  setSize,
  type ApiWorkflow,
} from "../src/index.js";
import { loadWorkflow } from "./helpers.js";

const node = (class_type: string, inputs: Record<string, unknown>, title?: string) =>
  title ? { class_type, inputs, _meta: { title } } : { class_type, inputs };

/** Flux: CLIPTextEncode -> FluxGuidance -> BasicGuider -> SamplerCustomAdvanced, RandomNoise, EmptySD3LatentImage. */
const flux: ApiWorkflow = {
  "6": node("CLIPTextEncode", { text: "old", clip: ["11", 0] }),
  "26": node("FluxGuidance", { guidance: 3.5, conditioning: ["6", 0] }),
  "22": node("BasicGuider", { model: ["30", 0], conditioning: ["26", 0] }),
  "25": node("RandomNoise", { noise_seed: 1 }),
  "13": node("SamplerCustomAdvanced", { noise: ["25", 0], guider: ["22", 0], sampler: ["16", 0], sigmas: ["17", 0], latent_image: ["27", 0] }),
  "27": node("EmptySD3LatentImage", { width: 1024, height: 1024, batch_size: 1 }),
  "30": node("ModelSamplingFlux", { model: ["12", 0], max_shift: 1.15, base_shift: 0.5, width: 1024, height: 1024 }),
};

/** SDXL with ControlNet: CLIPTextEncodeSDXL -> ControlNetApplyAdvanced -> KSampler. */
const sdxlControl: ApiWorkflow = {
  "1": node("CLIPTextEncodeSDXL", { text_g: "old g", text_l: "old l", clip: ["4", 1], width: 1024, height: 1024 }),
  "2": node("CLIPTextEncode", { text: "old negative", clip: ["4", 1] }),
  "10": node("ControlNetApplyAdvanced", { positive: ["1", 0], negative: ["2", 0], control_net: ["11", 0], image: ["12", 0], strength: 1 }),
  "3": node("KSampler", { seed: 5, positive: ["10", 0], negative: ["10", 1], model: ["4", 0], latent_image: ["5", 0] }),
  "5": node("EmptyLatentImage", { width: 512, height: 512, batch_size: 1 }),
};

function deepFrozen<T>(value: T): T {
  if (typeof value === "object" && value !== null) {
    Object.values(value).forEach(deepFrozen);
    Object.freeze(value);
  }
  return value;
}

test("setPositivePrompt finds the CLIPTextEncode feeding KSampler.positive and leaves the base untouched", () => {
  const base = deepFrozen(loadWorkflow("txt2img-sd15.json"));
  const before = JSON.stringify(base);
  const out = setPositivePrompt(base, "a neon city at night");
  assert.equal(out["6"]!.inputs.text, "a neon city at night");
  assert.equal(out["7"]!.inputs.text, "blurry, low quality, watermark, text");
  assert.equal(JSON.stringify(base), before);
  assert.notEqual(out, base);
  assert.deepEqual(findPromptNodes(base), ["6"]);
  assert.deepEqual(findPromptNodes(base, "negative"), ["7"]);
  assert.equal(setNegativePrompt(base, "ugly")["7"]!.inputs.text, "ugly");
});

test("prompt tracing follows guiders and FluxGuidance (Flux) and ControlNet outputs by index (SDXL)", () => {
  assert.equal(setPositivePrompt(flux, "flux prompt")["6"]!.inputs.text, "flux prompt");
  const sdxl = setPositivePrompt(sdxlControl, "sdxl prompt");
  assert.deepEqual([sdxl["1"]!.inputs.text_g, sdxl["1"]!.inputs.text_l], ["sdxl prompt", "sdxl prompt"]);
  assert.equal(sdxl["2"]!.inputs.text, "old negative");
  assert.deepEqual(findPromptNodes(sdxlControl, "negative"), ["2"]);
});

test("CLIPTextEncodeFlux gets both text fields; ConditioningSetTimestepRange is passed through", () => {
  const wf: ApiWorkflow = {
    "1": node("CLIPTextEncodeFlux", { clip_l: "a", t5xxl: "b", guidance: 3.5, clip: ["9", 0] }),
    "2": node("ConditioningSetTimestepRange", { conditioning: ["1", 0], start: 0, end: 1 }),
    "3": node("CFGGuider", { positive: ["2", 0], negative: ["4", 0], model: ["9", 0], cfg: 1 }),
    "4": node("ConditioningZeroOut", { conditioning: ["1", 0] }),
  };
  const out = setPositivePrompt(wf, "p");
  assert.deepEqual([out["1"]!.inputs.clip_l, out["1"]!.inputs.t5xxl, out["1"]!.inputs.guidance], ["p", "p", 3.5]);
  // The negative is a zeroed conditioning: there is no text to set, and the error says why.
  assert.throws(() => setNegativePrompt(wf, "n"), (e: WorkflowPatchError) => {
    assert.equal(e.code, "no_prompt_node");
    assert.match(e.message, /ConditioningZeroOut/);
    return true;
  });
});

test("two encoders behind one positive (ConditioningCombine, base+refiner) are ambiguous unless chosen", () => {
  const wf: ApiWorkflow = {
    "1": node("CLIPTextEncode", { text: "subject", clip: ["9", 1] }, "Subject"),
    "2": node("CLIPTextEncode", { text: "style", clip: ["9", 1] }, "Style"),
    "3": node("ConditioningCombine", { conditioning_1: ["1", 0], conditioning_2: ["2", 0] }),
    "4": node("KSampler", { seed: 1, positive: ["3", 0], negative: ["2", 0] }),
  };
  assert.throws(() => setPositivePrompt(wf, "x"), (e: WorkflowPatchError) => {
    assert.equal(e.code, "ambiguous_prompt_node");
    assert.deepEqual(e.nodeIds, ["1", "2"]);
    assert.match(e.message, /"Subject"/);
    return true;
  });
  assert.equal(setPositivePrompt(wf, "x", { title: "Subject" })["1"]!.inputs.text, "x");
  assert.equal(setPositivePrompt(wf, "x", { nodeId: "2" })["2"]!.inputs.text, "x");
  const all = setPositivePrompt(wf, "x", { all: true });
  assert.deepEqual([all["1"]!.inputs.text, all["2"]!.inputs.text], ["x", "x"]);
});

test("selection by title or id: missing nodes and non-text nodes are clear errors", () => {
  const base = loadWorkflow("txt2img-sd15.json");
  const byTitle = setPositivePrompt(base, "t", { title: "Positive prompt (text replaced per request)" });
  assert.equal(byTitle["6"]!.inputs.text, "t");
  const code = (fn: () => unknown) => {
    try {
      fn();
    } catch (e) {
      assert.ok(e instanceof WorkflowPatchError);
      return e.code;
    }
    return "no error";
  };
  assert.equal(code(() => setPositivePrompt(base, "t", { title: "Nope" })), "node_not_found");
  assert.equal(code(() => setPositivePrompt(base, "t", { nodeId: "99" })), "node_not_found");
  assert.equal(code(() => setPositivePrompt(base, "t", { nodeId: "3" })), "not_a_text_node");
  assert.equal(code(() => setPositivePrompt(loadWorkflow("model-free.json"), "t")), "no_prompt_node");
  assert.equal(code(() => setPositivePrompt({ nodes: [], links: [] } as unknown as ApiWorkflow, "t")), "not_api_format");
  assert.equal(code(() => setPositivePrompt({ "1": { inputs: {} } } as unknown as ApiWorkflow, "t")), "not_api_format");
});

test("a linked text input is replaced by the literal; unknown encoders with a text input are found", () => {
  const wf: ApiWorkflow = {
    "1": node("PrimitiveStringMultiline", { value: "from primitive" }),
    "2": node("CLIPTextEncode", { text: ["1", 0], clip: ["9", 1] }),
    "3": node("KSampler", { seed: 1, positive: ["2", 0], negative: ["4", 0] }),
    "4": node("BNK_CLIPTextEncodeAdvanced", { text: "neg", clip: ["9", 1], token_normalization: "none" }),
  };
  assert.equal(setPositivePrompt(wf, "literal")["2"]!.inputs.text, "literal");
  assert.equal(setNegativePrompt(wf, "n")["4"]!.inputs.text, "n");
});

test("formatSize: the documented default sizes, all multiples of 8, close to the named ratios", () => {
  const expected = { post: [1024, 1024], story: [768, 1368], landscape: [1416, 744], portrait: [912, 1144] };
  for (const [name, [w, h]] of Object.entries(expected)) {
    const size = formatSize(name as keyof typeof FORMATS);
    assert.deepEqual([size.width, size.height], [w, h], name);
    const [rw, rh] = FORMATS[name as keyof typeof FORMATS];
    assert.ok(Math.abs(size.width / size.height - rw / rh) < 0.01, name);
    assert.ok(Math.abs((size.width * size.height) / 2 ** 20 - 1) < 0.02, name);
  }
  assert.deepEqual(formatSize("story", { longSide: 1080 }), { width: 608, height: 1080 });
  assert.deepEqual(formatSize("landscape", { longSide: 1200 }), { width: 1200, height: 632 });
  assert.deepEqual(formatSize("portrait", { multiple: 64 }), { width: 896, height: 1152 });
  assert.deepEqual(formatSize("story", { multiple: 64 }), { width: 768, height: 1344 });
  assert.deepEqual(formatSize("post", { megapixels: 0.25 }), { width: 512, height: 512 });
  assert.deepEqual(formatSize([3, 2]), { width: 1256, height: 840 });
  assert.throws(() => formatSize("banner" as never), WorkflowPatchError);
  assert.throws(() => formatSize("post", { megapixels: -1 }), WorkflowPatchError);
});

test("setFormat sets EmptyLatentImage / EmptySD3LatentImage (and ModelSamplingFlux) without mutating", () => {
  const base = deepFrozen(loadWorkflow("txt2img-sd15.json"));
  const story = setFormat(base, "story");
  assert.deepEqual([story["5"]!.inputs.width, story["5"]!.inputs.height, story["5"]!.inputs.batch_size], [768, 1368, 1]);
  assert.equal(base["5"]!.inputs.width, 64);
  const f = setFormat(flux, "landscape");
  assert.deepEqual([f["27"]!.inputs.width, f["27"]!.inputs.height], [1416, 744]);
  assert.deepEqual([f["30"]!.inputs.width, f["30"]!.inputs.height], [1416, 744]);
  assert.equal(flux["27"]!.inputs.width, 1024);
  const titled = setSize(base, { width: 512, height: 640 }, { title: "Empty Latent Image (size set per format)" });
  assert.deepEqual([titled["5"]!.inputs.width, titled["5"]!.inputs.height], [512, 640]);
  assert.throws(() => setFormat({ "1": node("KSampler", { seed: 1 }) }, "post"), (e: WorkflowPatchError) => {
    assert.equal(e.code, "no_size_node");
    assert.match(e.message, /EmptyImage/);
    assert.match(e.message, /\{ title \}/);
    return true;
  });
  assert.throws(() => setSize(base, { width: 500, height: 512 }), { code: "invalid_value" });
  assert.throws(() => setSize(base, { width: 512, height: 512 }, { nodeId: "6" }), { code: "no_size_node" });
});

test("setSeed sets seed / noise_seed on samplers and RandomNoise", () => {
  const base = deepFrozen(loadWorkflow("txt2img-sd15.json"));
  assert.equal(setSeed(base, 42)["3"]!.inputs.seed, 42);
  assert.equal(base["3"]!.inputs.seed, 156680208700286);
  assert.equal(setSeed(flux, 7)["25"]!.inputs.noise_seed, 7);
  const advanced: ApiWorkflow = { "1": node("KSamplerAdvanced", { noise_seed: 1, add_noise: "enable" }), "2": node("KSampler", { seed: 2 }) };
  const both = setSeed(advanced, 9);
  assert.deepEqual([both["1"]!.inputs.noise_seed, both["2"]!.inputs.seed], [9, 9]);
  assert.equal(setSeed(advanced, 3, { nodeId: "2" })["1"]!.inputs.noise_seed, 1);
  assert.throws(() => setSeed(base, -1), { code: "invalid_value" });
  assert.throws(() => setSeed(base, 1.5), { code: "invalid_value" });
  assert.throws(() => setSeed(base, 2 ** 60), { code: "invalid_value" });
  assert.throws(() => setSeed(loadWorkflow("model-free.json"), 1), { code: "no_seed_input" });
  for (let i = 0; i < 100; i++) {
    const seed = randomSeed();
    assert.ok(Number.isSafeInteger(seed) && seed >= 0);
  }
});

test("patchWorkflow applies prompt, format and seed to one copy", () => {
  const base = deepFrozen(loadWorkflow("txt2img-sd15.json"));
  const out = patchWorkflow(base, { prompt: "p", negativePrompt: "n", format: "portrait", seed: 11 });
  assert.deepEqual(
    [out["6"]!.inputs.text, out["7"]!.inputs.text, out["5"]!.inputs.width, out["5"]!.inputs.height, out["3"]!.inputs.seed],
    ["p", "n", 912, 1144, 11],
  );
  const sized = patchWorkflow(base, { size: { width: 256, height: 384 }, format: "post", seed: "random" });
  assert.deepEqual([sized["5"]!.inputs.width, sized["5"]!.inputs.height], [256, 384]);
  assert.ok(Number.isSafeInteger(sized["3"]!.inputs.seed));
  assert.deepEqual(patchWorkflow(base, {}), base);
});

test("setFormat sizes EmptyImage in a model-free workflow, and leaves it alone beside a latent node", () => {
  const modelFree = deepFrozen(loadWorkflow("model-free.json"));
  const story = setFormat(modelFree, "story", { longSide: 1080 });
  assert.deepEqual([story["1"]!.inputs.width, story["1"]!.inputs.height, story["1"]!.inputs.color], [608, 1080, 16753920]);
  assert.equal(modelFree["1"]!.inputs.width, 64);
  const patched = patchWorkflow(modelFree, { format: "post", sizeOptions: { megapixels: 0.25 } });
  assert.deepEqual([patched["1"]!.inputs.width, patched["1"]!.inputs.height], [512, 512]);

  const withLatent: ApiWorkflow = {
    ...structuredClone(loadWorkflow("txt2img-sd15.json")),
    "20": node("EmptyImage", { width: 64, height: 64, batch_size: 1, color: 0 }, "Mask canvas"),
  };
  const sized = setFormat(withLatent, "post");
  assert.deepEqual([sized["5"]!.inputs.width, sized["20"]!.inputs.width], [1024, 64]);
  const chosen = setFormat(withLatent, "post", { title: "Mask canvas" });
  assert.deepEqual([chosen["5"]!.inputs.width, chosen["20"]!.inputs.width], [64, 1024]);
});

test("patchWorkflow takes the node chosen by title (or id) for each patch, as its errors suggest", () => {
  const wf: ApiWorkflow = {
    "1": node("CLIPTextEncode", { text: "subject", clip: ["9", 1] }, "Subject"),
    "2": node("CLIPTextEncode", { text: "style", clip: ["9", 1] }, "Style"),
    "3": node("ConditioningCombine", { conditioning_1: ["1", 0], conditioning_2: ["2", 0] }),
    "4": node("KSampler", { seed: 1, positive: ["3", 0], negative: ["7", 0] }),
    "5": node("EmptyLatentImage", { width: 512, height: 512, batch_size: 1 }, "Latent"),
    "6": node("EmptyLatentImage", { width: 512, height: 512, batch_size: 1 }, "Second pass"),
    "7": node("CLIPTextEncode", { text: "blurry", clip: ["9", 1] }, "Negative"),
    "8": node("RandomNoise", { noise_seed: 5 }, "Noise"),
  };
  const frozen = deepFrozen(wf);
  assert.throws(() => patchWorkflow(frozen, { prompt: "x" }), (e: WorkflowPatchError) => {
    assert.equal(e.code, "ambiguous_prompt_node");
    assert.match(e.message, /patchWorkflow's promptNode: \{ title \} or \{ nodeId \}/);
    return true;
  });
  const out = patchWorkflow(frozen, {
    prompt: "a fox",
    promptNode: { title: "Subject" },
    negativePrompt: "noise",
    negativePromptNode: { nodeId: "7" },
    format: "story",
    sizeNode: { title: "Latent" },
    seed: 42,
    seedNode: { title: "Noise" },
  });
  assert.deepEqual(
    [out["1"]!.inputs.text, out["2"]!.inputs.text, out["7"]!.inputs.text],
    ["a fox", "style", "noise"],
  );
  assert.deepEqual([out["5"]!.inputs.width, out["5"]!.inputs.height, out["6"]!.inputs.width], [768, 1368, 512]);
  assert.deepEqual([out["4"]!.inputs.seed, out["8"]!.inputs.noise_seed], [1, 42]);
  const all = patchWorkflow(frozen, { prompt: "both", promptNode: { all: true } });
  assert.deepEqual([all["1"]!.inputs.text, all["2"]!.inputs.text], ["both", "both"]);
  assert.throws(() => patchWorkflow(frozen, { prompt: "x", promptNode: { title: "Nope" } }), { code: "node_not_found" });
  assert.throws(() => patchWorkflow(frozen, { seed: 1, seedNode: { title: "Latent" } }), { code: "no_seed_input" });
  assert.throws(
    () => patchWorkflow({ "1": node("KSampler", { seed: 1 }) }, { format: "post" }),
    (e: WorkflowPatchError) => e.code === "no_size_node" && /patchWorkflow's sizeNode/.test(e.message),
  );
});
