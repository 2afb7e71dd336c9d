// comfy-courier front-end: shows where a "Save and Callback (courier)" node's images went.
//
// Preview images need nothing from us: the node returns {"ui": {"images": [...]}} and the
// frontend shows them as it does for SaveImage. What the frontend cannot know is the
// storage URL, which exists only once the upload is done, after the node has run. The
// server sends `comfy-courier.images` {prompt_id, node_id, content_request_id, urls} to
// the browser that queued the prompt; we show those URLs on the node (a read-only text
// widget you can copy from, and a button that opens the image) until the next run, which
// empties the line and disables the button until its own URLs arrive. Both stay where they
// were first put, after the node's inputs, for as long as the tab lives.
// Nothing here may throw into the frontend: a node that is gone, a subgraph, an older
// frontend without some method all end in doing nothing.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "SaveAndCallback";
const EVENT = "comfy-courier.images";
const TEXT_WIDGET = "delivered";
const BUTTON_WIDGET = "open delivered image";

let runningPrompt = null; // prompt_id of this tab's run in progress, from execution_start

function rootGraph() {
  return app.rootGraph ?? app.graph ?? null;
}

// "12" is a node on the canvas; "7:12" is node 12 inside the subgraph of node 7.
function findNode(executionId) {
  const parts = String(executionId ?? "").split(":").filter(Boolean);
  let graph = rootGraph();
  for (const [i, part] of parts.entries()) {
    const node = graph?.getNodeById?.(Number(part)) ?? graph?.getNodeById?.(part) ?? null;
    if (i === parts.length - 1) return node;
    graph = node?.subgraph;
  }
  return null;
}

function* courierNodes(graph, depth = 0) {
  for (const node of graph?.nodes ?? graph?._nodes ?? []) {
    if (node?.comfyClass === NODE_TYPE || node?.type === NODE_TYPE) yield node;
    if (node?.subgraph && depth < 8) yield* courierNodes(node.subgraph, depth + 1);
  }
}

function redraw(node) {
  try {
    const [width, height] = node.computeSize?.() ?? [0, 0];
    node.setSize?.([Math.max(node.size?.[0] ?? 0, width), Math.max(node.size?.[1] ?? 0, height)]);
  } catch {
    // sizing is cosmetic
  }
  (node.graph ?? app.graph)?.setDirtyCanvas?.(true, true);
}

// Widgets that are display only: never saved in the workflow, never sent as inputs.
// (`serialize` keeps it out of the saved workflow, `options.serialize` out of the prompt,
// as the frontend does for its own preview widgets.)
function displayOnly(widget) {
  widget.serialize = false;
  if (widget.options) widget.options.serialize = false;
  else widget.options = { serialize: false };
  return widget;
}

// The frontend drops a text widget's label when its value does not fit (a long URL): draw
// our line with the frontend's own "truncate values first" mode, so `delivered` stays and
// the URL ends in an ellipsis. Only for our widget, only during its own synchronous draw.
function keepLabel(widget) {
  const draw = widget.drawTruncatingText;
  const graph = globalThis.LiteGraph;
  if (typeof draw !== "function" || !graph || !("truncateWidgetValuesFirst" in graph)) return;
  widget.drawTruncatingText = function (...args) {
    const saved = graph.truncateWidgetValuesFirst;
    graph.truncateWidgetValuesFirst = true;
    try {
      return draw.apply(this, args);
    } finally {
      graph.truncateWidgetValuesFirst = saved;
    }
  };
}

// Where our line goes: right after the node's own input widgets, before the image preview
// (which the frontend adds, and may re-add, at the end), so it never moves between runs.
function placeAfterInputs(node, widgets) {
  const list = node.widgets;
  if (!Array.isArray(list)) return;
  for (const widget of widgets) {
    const index = list.indexOf(widget);
    if (index >= 0) list.splice(index, 1);
  }
  const inputs = node.constructor?.__courierInputs ?? [];
  let at = 0;
  list.forEach((widget, i) => {
    if (inputs.includes(widget?.name)) at = i + 1;
  });
  list.splice(at, 0, ...widgets);
}

// The line and the button are made once per node and then only updated. Frontend 1.49
// keeps widget values in a store keyed by node id and widget name and gives a re-added
// widget its old value: removing and re-adding them showed the first run's URL forever.
function deliveredWidgets(node) {
  const made = node.__courierWidgets;
  if (made && made.every((widget) => node.widgets?.includes(widget))) return made;
  if (typeof node.addWidget !== "function") return null;
  const text = node.addWidget("text", TEXT_WIDGET, "", () => {
    text.value = node.__courier?.text ?? ""; // read-only: selecting and copying is fine, edits are undone
  }, { serialize: false });
  const button = node.addWidget("button", BUTTON_WIDGET, null, () => {
    for (const url of node.__courier?.urls ?? []) window.open(url, "_blank", "noopener");
  }, { serialize: false });
  if (!text || !button) return null;
  displayOnly(text);
  displayOnly(button);
  keepLabel(text);
  placeAfterInputs(node, [text, button]);
  node.__courierWidgets = [text, button];
  return node.__courierWidgets;
}

function show(node, state) {
  const widgets = state.text || node.__courierWidgets ? deliveredWidgets(node) : null;
  node.__courier = state;
  if (!widgets) return;
  const [text, button] = widgets;
  text.value = state.text; // after adding: a value given to addWidget may be replaced by the store's
  const count = state.urls.length;
  button.label = count > 1 ? `open ${count} delivered images` : BUTTON_WIDGET;
  button.disabled = count === 0;
  redraw(node);
}

// A new run: the line empties (its label stays), the button waits for this run's URLs.
function clearDelivered(node) {
  if (!node?.__courier?.text) return;
  show(node, { promptId: null, text: "", urls: [] });
}

function showDelivered(node, detail) {
  const urls = (Array.isArray(detail?.urls) ? detail.urls : []).filter(
    (url) => typeof url === "string" && /^https?:\/\//i.test(url)
  );
  const error = typeof detail?.error === "string" ? detail.error : "";
  if (!urls.length && !error) return;
  const text = error ? `upload failed: ${error}` : urls.join("  ");
  show(node, { promptId: detail?.prompt_id ?? null, text, urls });
}

function guarded(handler) {
  return (event) => {
    try {
      handler(event?.detail ?? {});
    } catch (error) {
      console.warn("[comfy-courier]", error);
    }
  };
}

app.registerExtension({
  name: "comfy-courier.SaveAndCallback",

  setup() {
    // A new run of this tab clears URLs left from an earlier one.
    api.addEventListener("execution_start", guarded((detail) => {
      runningPrompt = detail.prompt_id ?? null;
      for (const node of courierNodes(rootGraph())) {
        if (node.__courier && node.__courier.promptId !== runningPrompt) clearDelivered(node);
      }
    }));
    api.addEventListener(EVENT, guarded((detail) => {
      const node = findNode(detail.node_id);
      if (node && (node.comfyClass === NODE_TYPE || node.type === NODE_TYPE)) {
        showDelivered(node, detail);
      }
    }));
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    // the node's own input widgets: our line goes right after them
    nodeType.__courierInputs = [
      ...Object.keys(nodeData.input?.required ?? {}),
      ...Object.keys(nodeData.input?.optional ?? {}),
    ];
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      // The frontend's own handling (preview images) first, untouched.
      const result = onExecuted?.apply(this, arguments);
      try {
        // Covers a missed execution_start (e.g. a reconnect): old URLs never stay
        // beside new previews. URLs of this run arrive after this and are kept.
        if (this.__courier && runningPrompt && this.__courier.promptId !== runningPrompt) {
          clearDelivered(this);
        }
      } catch (error) {
        console.warn("[comfy-courier]", error);
      }
      return result;
    };
  },
});
