// comfy-courier front-end: shows where a "Save and Callback (courier)" node's images went.
//
// Preview images need nothing from us: the node returns {"ui": {"images": [...]}} and the
// frontend shows them as it does for SaveImage. What the frontend cannot know is the
// storage URL, which exists only once the upload is done, after the node has run. The
// server sends `comfy-courier.images` {prompt_id, node_id, content_request_id, urls} to
// the browser that queued the prompt; we show those URLs on the node (a read-only text
// widget you can copy from, and a button that opens the image) until the next run.
// Nothing here may throw into the frontend: a node that is gone, a subgraph, an older
// frontend without some method all end in doing nothing.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "SaveAndCallback";
const EVENT = "comfy-courier.images";
const TEXT_WIDGET = "delivered";

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

function clearDelivered(node) {
  const shown = node?.__courier;
  if (!shown) return;
  node.__courier = undefined;
  for (const widget of shown.widgets) {
    const index = node.widgets?.indexOf(widget) ?? -1;
    if (index < 0) continue;
    if (typeof node.removeWidget === "function") {
      node.removeWidget(widget);
    } else {
      node.widgets.splice(index, 1);
      widget.onRemove?.();
    }
  }
  redraw(node);
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

function showDelivered(node, detail) {
  clearDelivered(node);
  const urls = (Array.isArray(detail?.urls) ? detail.urls : []).filter(
    (url) => typeof url === "string" && /^https?:\/\//i.test(url)
  );
  const error = typeof detail?.error === "string" ? detail.error : "";
  if (!urls.length && !error) return;
  const text = error ? `upload failed: ${error}` : urls.join("  ");
  const widgets = [];
  const textWidget = node.addWidget?.("text", TEXT_WIDGET, text, () => {
    textWidget.value = text; // read-only: selecting and copying is fine, edits are undone
  }, { serialize: false });
  if (textWidget) widgets.push(displayOnly(textWidget));
  if (urls.length) {
    const label = urls.length > 1 ? `open ${urls.length} delivered images` : "open delivered image";
    const button = node.addWidget?.("button", label, null, () => {
      for (const url of urls) window.open(url, "_blank", "noopener");
    }, { serialize: false });
    if (button) widgets.push(displayOnly(button));
  }
  node.__courier = { promptId: detail?.prompt_id ?? null, widgets };
  redraw(node);
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
